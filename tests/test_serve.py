"""serve.py through the real openai client, against a server this test starts on a free local port with the demo
model (stories260K) on the CPU: the same text as generate.py's greedy decoding, concurrency, errors."""

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import ROOT, STORIES

import generate
from tokenizer import get_tokenizer

openai = pytest.importorskip("openai")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

PROMPTS = ["Once upon a time", "Lily", "The dog ran to the park and saw a big red ball. He", "One day,", "Tom"]


def start_server(*flags: str):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [sys.executable, str(ROOT / "serve.py"), "--device", "cpu", "--port", str(port), *flags]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            with urllib.request.urlopen(url + "/health", timeout=1) as r:
                if r.status == 200:
                    return proc, url
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.1)
        if proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"the server did not start:\n{proc.stdout.read()}")


@pytest.fixture(scope="module")
def server():
    proc, url = start_server("--max_batch_size", "8")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def client(url: str):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def health(url: str) -> dict:
    with urllib.request.urlopen(url + "/health") as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def greedy():
    """Greedy text as generate.py makes it, one prompt at a time: the reference for the server's replies."""
    tok = get_tokenizer(STORIES / "tokenizer.model")
    model = generate.load_model(STORIES / "model.pth", "cpu", torch.float32)

    def run(ids: list[int], max_tokens: int, chat: bool, seed: int = 0, **sampling) -> str:
        model.max_seq_length = -1
        torch.manual_seed(seed)
        sampling = sampling or dict(temperature=0)
        y, _ = generate.generate(
            model, torch.tensor(ids, dtype=torch.int), max_tokens, top_k=None, stop_ids=tok.stop_ids(), **sampling
        )
        if chat:  # a reply is decoded alone
            return tok.decode([t for t in y[0, len(ids) :].tolist() if t not in tok.stop_ids()])
        return generate.completions(tok, y, len(ids), [0], tok.stop_ids())[0]

    run.tok = tok
    return run


def test_completions_and_chat_match_generate_greedy_streamed_or_not(server, greedy):
    c = client(server)
    for stream in (False, True):
        r = c.completions.create(model="m", prompt=PROMPTS[0], max_tokens=40, temperature=0, stream=stream)
        text = "".join(ch.choices[0].text for ch in r) if stream else r.choices[0].text
        assert text == greedy(greedy.tok.encode(PROMPTS[0]), 40, chat=False) and len(text) > 50
        messages = [{"role": "system", "content": "Tell stories."}, {"role": "user", "content": PROMPTS[1]}]
        r = c.chat.completions.create(model="m", messages=messages, max_tokens=40, temperature=0, stream=stream)
        text = "".join(ch.choices[0].delta.content or "" for ch in r) if stream else r.choices[0].message.content
        assert text == greedy(greedy.tok.encode_dialog(messages), 40, chat=True)
    r = c.completions.create(model="m", prompt=PROMPTS[0], max_tokens=40, temperature=0, stop=["park"])
    assert r.choices[0].finish_reason == "stop" and "park" not in r.choices[0].text
    assert r.usage.prompt_tokens == len(greedy.tok.encode(PROMPTS[0])) and 0 < r.usage.completion_tokens < 40
    assert [m.id for m in c.models.list().data] == ["stories260K"]


def test_a_seeded_sampled_request_draws_what_generate_draws(server, greedy):
    """temperature and top_p reach the compiled steps as tensors (one graph for every value): the same draws as
    generate() with the same seed and the values as floats."""
    ids = greedy.tok.encode(PROMPTS[0])
    for temperature, top_p in ((0.8, 0.9), (1.3, 1.0)):
        r = client(server).completions.create(
            model="m", prompt=PROMPTS[0], max_tokens=40, temperature=temperature, top_p=top_p, seed=7
        )
        want = greedy(ids, 40, chat=False, seed=7, temperature=temperature, top_p=top_p)
        assert r.choices[0].text == want and want != greedy(ids, 40, chat=False)


def test_32_concurrent_requests_are_answered_each_with_its_own_text(server, greedy):
    c = client(server)
    jobs = [(PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS)), 16 + i) for i in range(32)]  # 32 distinct
    before = health(server)["batches"]

    def ask(job):
        prompt, max_tokens = job
        return c.completions.create(model="m", prompt=prompt, max_tokens=max_tokens, temperature=0).choices[0].text

    with ThreadPoolExecutor(32) as pool:
        texts = list(pool.map(ask, jobs))
    assert texts == [greedy(greedy.tok.encode(p), n, chat=False) for p, n in jobs]
    assert health(server)["batches"] - before < 32  # requests that came together were decoded together


def test_bad_requests_get_openai_errors_and_the_server_goes_on(server):
    c = client(server)
    bad = [
        dict(prompt="Hi", temperature=5),
        dict(prompt="Hi", n=2),
        dict(prompt="Hi", max_tokens=0),
        dict(prompt="Hi", stop=[""]),
        dict(prompt="word " * 600),  # over the context of 512
        dict(prompt="Hi", max_tokens=600),
    ]
    for kwargs in bad:
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(model="m", **kwargs)
        assert e.value.status_code == 400 and e.value.body["message"], kwargs
    with pytest.raises(openai.BadRequestError, match="unknown role"):
        c.chat.completions.create(model="m", messages=[{"role": "robot", "content": "Hi"}])
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="m", prompt="word " * 600)
    assert e.value.code == "context_length_exceeded"
    for path, data, status in (("/v1/completions", b"{not json", 400), ("/v1/nothing", None, 404)):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(server + path, data=data)
        assert e.value.code == status and "message" in json.loads(e.value.read())["error"]
    assert c.completions.create(model="m", prompt="Lily", max_tokens=8).choices[0].text  # still serving


def test_a_full_queue_answers_503_and_a_client_that_leaves_frees_its_row():
    proc, url = start_server("--max_batch_size", "1", "--queue_size", "1")
    try:
        c = client(url)

        def ask(_):
            try:
                return c.completions.create(model="m", prompt="Once upon a time", max_tokens=400, temperature=0)
            except openai.APIStatusError as e:
                return e.status_code

        with ThreadPoolExecutor(6) as pool:
            results = list(pool.map(ask, range(6)))
        refused = [r for r in results if r == 503]
        assert refused and all(r == 503 or r.choices[0].text for r in results), results
        stream = c.completions.create(model="m", prompt="Once upon a time", max_tokens=500, stream=True)
        next(iter(stream))
        stream.close()  # the client leaves after its first chunk
        for _ in range(100):
            if health(url)["cancelled"] >= 1:
                break
            time.sleep(0.1)
        assert health(url)["cancelled"] == 1
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_the_warm_up_runs_every_batch_size_and_prefill_bucket_a_round_can_have(capsys):
    import serve

    tok = get_tokenizer(STORIES / "tokenizer.model")
    model = generate.load_model(STORIES / "model.pth", "cpu", torch.float32)
    model.setup_caches(6, 64)
    engine = serve.Engine(model, tok, {}, max_batch=6, queue_size=4, context=64)
    seen = []
    run = engine.generate
    engine.generate = lambda jobs: seen.append((len(jobs), len(jobs[0].ids))) or run(jobs)
    engine.warm_up()
    # each prefill bucket that fits the context with room to decode, twice (CUDA graphs record on the second call)
    assert seen == [(size, n) for size in (1, 2, 4, 6) for n in (16, 32, 16, 32)]
    assert engine.counts["batches"] == len(seen)
    assert [line.split(" in ")[0] for line in capsys.readouterr().out.splitlines()] == [
        f"Compiled batch size {size}" for size in (1, 2, 4, 6)
    ]  # progress a user sees while a large model compiles
