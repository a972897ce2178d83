"""An OpenAI-compatible HTTP server: /v1/chat/completions, /v1/completions, /v1/models, on generate.py's model.

One thread runs the model. Requests wait in a bounded queue; each round takes the oldest and every waiting request
that samples the same way, up to --max_batch_size, and decodes them together as one batch of different prompts
(generate.generate with a list). Needs starlette and uvicorn (pip install starlette uvicorn).
"""

import argparse
import asyncio
import collections
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from functools import partial
from typing import Optional

import torch

import generate

try:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route
except ImportError:  # an optional dependency: main() says what to install
    uvicorn = None

GATHER_S = 0.005  # requests sent together arrive a few ms apart: wait this long for them before a round starts


class ApiError(Exception):
    """An error the client sees as OpenAI's JSON: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> "JSONResponse":
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        error = {"message": self.message, "type": kind, "param": self.param, "code": self.code}
        return JSONResponse({"error": error}, status_code=self.status)


@dataclass
class Job:
    """One request's generation: its prompt and sampling, and the events the model thread sends back to it."""

    ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    stop: list[str]
    seed: Optional[int]
    text_context: list[int]  # tokens its text is decoded after: the prompt's tail for a completion, none for chat
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False  # the client left: its row stops at the next step

    def send(self, *event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def sampling(self, device: torch.device) -> dict:
        """generate()'s sampling arguments, as tensors (generate.sample_any): every value a client sends, greedy
        too, runs on the same compiled steps."""
        t, p = (torch.tensor(v, dtype=torch.float, device=device) for v in (self.temperature, self.top_p))
        return dict(temperature=t, top_k=None, top_p=p)

    def samples_like(self, other: "Job") -> bool:
        """Whether both can share a batch: one temperature and top_p, and no seed (a seeded request runs alone)."""
        return (self.temperature, self.top_p, self.seed, other.seed) == (other.temperature, other.top_p, None, None)


class Engine:
    """The model thread: rounds of batched generation over the waiting jobs."""

    def __init__(self, model, tokenizer, steps: dict, max_batch: int, queue_size: int, context: int):
        self.model, self.tokenizer, self.steps = model, tokenizer, steps
        self.max_batch, self.queue_size, self.context = max_batch, queue_size, context
        self.stop_ids = set(tokenizer.stop_ids())
        self.waiting: collections.deque[Job] = collections.deque()
        self.cond = threading.Condition()
        self.counts = {"served": 0, "cancelled": 0, "batches": 0}
        self.device = model.norm.weight.device
        self.ready = False  # set once warm: /health answers 503 before

    def submit(self, job: Job) -> None:
        with self.cond:
            if len(self.waiting) >= self.queue_size:
                raise ApiError(503, "the server is busy: too many requests are waiting, retry later", code="busy")
            self.waiting.append(job)
            self.cond.notify()

    def warm_up(self) -> None:
        """Run each batch size a round can have (powers of two, and max_batch) with prompts of each prefill bucket
        (generate.warm_up_prompt_lengths), so that compiling is done before the first request."""
        loop = asyncio.new_event_loop()  # never run: the warm-up's events are dropped
        for size in sorted({min(1 << i, self.max_batch) for i in range(self.max_batch.bit_length() + 1)}):
            t0 = time.perf_counter()
            for n in generate.warm_up_prompt_lengths(self.context, 8):
                self.generate([Job([1] * n, 8, 1.0, 1.0, [], None, [], loop, asyncio.Queue()) for _ in range(size)])
            # a line per size: on a large model each takes a while
            print(f"Compiled batch size {size} in {time.perf_counter() - t0:.1f} s", flush=True)
        loop.close()

    def serve_forever(self, warm_up: bool) -> None:
        if warm_up:
            t0 = time.perf_counter()
            self.warm_up()
            self.counts = dict.fromkeys(self.counts, 0)  # /health counts requests, not the warm-up
            print(f"Compiled every batch size and prompt bucket in {time.perf_counter() - t0:.1f} s: ready", flush=True)
        self.ready = True
        while True:
            jobs = self.next_round()
            try:
                self.generate(jobs)
            except Exception as e:  # a failed round answers its requests and the server goes on
                for job in jobs:
                    job.send("error", f"generation failed: {e}")

    def next_round(self) -> list[Job]:
        """The oldest waiting job and every later one that can share its batch and still fit the context."""
        with self.cond:
            self.cond.wait_for(lambda: self.waiting)
        time.sleep(GATHER_S)
        with self.cond:
            jobs = [self.waiting.popleft()]
            for job in list(self.waiting):
                longest = max(len(j.ids) for j in jobs + [job])
                if len(jobs) == self.max_batch:
                    break
                if job.samples_like(jobs[0]) and longest + max(j.max_tokens for j in jobs + [job]) <= self.context:
                    jobs.append(job)
                    self.waiting.remove(job)
        for job in [j for j in jobs if j.cancelled]:  # left while waiting
            job.send("done", "cancelled", 0)
            self.counts["cancelled"] += 1
        return [j for j in jobs if not j.cancelled]

    def generate(self, jobs: list[Job]) -> None:
        """One batch: each job's text streamed to it as it comes; a row finishes at an end-of-sequence token, a stop
        string, its max_tokens or its client's leaving, and the batch when every row has."""
        if not jobs:
            return
        rows = [torch.tensor(j.ids, dtype=torch.int, device=self.device) for j in jobs]
        size = min(self.max_batch, 1 << (len(rows) - 1).bit_length())  # a few batch sizes: a few compiled steps
        rows += rows[-1:] * (size - len(rows))
        streams = [
            generate.TextStream(self.tokenizer, (), j.stop, emit=partial(j.send, "text"), context=j.text_context)
            for j in jobs
        ]
        made, finish = [0] * len(jobs), [None] * len(jobs)

        def on_tokens(tokens: torch.Tensor) -> bool:
            for b, t in enumerate(tokens.view(-1).tolist()[: len(jobs)]):
                if finish[b] is not None:
                    continue
                if jobs[b].cancelled:
                    finish[b] = "cancelled"
                elif t in self.stop_ids:
                    finish[b] = "stop"
                else:
                    made[b] += 1
                    if streams[b].add(t):
                        finish[b] = "stop"
                    elif made[b] >= jobs[b].max_tokens:
                        finish[b] = "length"
                if finish[b] is not None:
                    self.finish(jobs[b], streams[b], finish[b], made[b])
            return all(f is not None for f in finish)

        if jobs[0].seed is not None:
            torch.manual_seed(jobs[0].seed)
        generate.generate(
            self.model, rows, max(j.max_tokens for j in jobs), callback=on_tokens, **jobs[0].sampling(self.device),
            **self.steps,
        )  # fmt: skip
        for b, job in enumerate(jobs):
            if finish[b] is None:
                self.finish(job, streams[b], "length", made[b])
        self.counts["batches"] += 1

    def finish(self, job: Job, stream, reason: str, made: int) -> None:
        stream.finish()  # the characters held back for a stop string that did not come
        job.send("done", reason, made)
        self.counts["cancelled" if reason == "cancelled" else "served"] += 1


# ---------------------------------------------------------------- requests


def number(body: dict, name: str, default, low: float, high: float, kind=float):
    value = body.get(name, default)
    if value is None:
        value = default
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ApiError(400, f"{name} must be an integer", name)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
        raise ApiError(400, f"{name} must be a number in [{low}, {high}], got {value!r}", name)
    return kind(value)


def sampling(body: dict, prompt_len: int, context: int, default_max: Optional[int]) -> dict:
    """The request's sampling fields, checked: OpenAI's names, defaults and ranges."""
    if body.get("n", 1) != 1:
        raise ApiError(400, "n must be 1: one completion per request", "n")
    if body.get("logprobs") or body.get("echo"):
        raise ApiError(400, "logprobs and echo are not supported", "logprobs")
    room = context - prompt_len
    if room < 1:
        raise ApiError(
            400, f"the prompt is {prompt_len} tokens; this model's context is {context}", "messages",
            "context_length_exceeded",
        )  # fmt: skip
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = number({"max_tokens": limit}, "max_tokens", default_max or room, 1, 10**9, int)
    if max_tokens > room:
        raise ApiError(
            400, f"the prompt ({prompt_len} tokens) and max_tokens ({max_tokens}) exceed the context of {context}",
            "max_tokens", "context_length_exceeded",
        )  # fmt: skip
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "stop must be a string or a list of up to 4 non-empty strings", "stop")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ApiError(400, "seed must be an integer", "seed")
    return dict(
        max_tokens=max_tokens,
        temperature=number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=number(body, "top_p", 1.0, 1e-9, 1.0),
        stop=stop,
        seed=seed,
    )


def message_text(content) -> str:
    """A message's content: a string, or a list of {"type": "text", "text": ...} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    raise ApiError(400, "a message's content must be a string or a list of text parts", "messages")


def chat_prompt(tokenizer, body: dict) -> list[int]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise ApiError(400, "messages must be a non-empty list of {role, content} objects", "messages")
    turns = []
    for m in messages:
        if m.get("role") not in ("system", "user", "assistant"):
            raise ApiError(400, f"unknown role {m.get('role')!r}: use system, user or assistant", "messages")
        turns.append({"role": m["role"], "content": message_text(m.get("content"))})
    try:
        return tokenizer.encode_dialog(turns)
    except ValueError as e:
        raise ApiError(400, str(e), "messages") from None


def completion_prompt(tokenizer, body: dict) -> list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise ApiError(400, "prompt must be a non-empty string", "prompt")
    return tokenizer.encode(prompt)


# ---------------------------------------------------------------- the app


def make_app(engine: Engine, tokenizer, model_id: str) -> "Starlette":
    created = int(time.time())

    async def read_body(request: Request) -> dict:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ApiError(400, "the request body is not JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return body

    async def models(request: Request) -> JSONResponse:
        card = {"id": model_id, "object": "model", "created": created, "owned_by": "local"}
        return JSONResponse({"object": "list", "data": [card]})

    async def health(request: Request) -> JSONResponse:
        body = {"status": "ok" if engine.ready else "loading", "waiting": len(engine.waiting), **engine.counts}
        return JSONResponse(body, status_code=200 if engine.ready else 503)

    async def chat(request: Request):
        body = await read_body(request)
        ids = chat_prompt(tokenizer, body)
        return await respond(request, body, ids, sampling(body, len(ids), engine.context, None), [], chat=True)

    async def completions(request: Request):
        body = await read_body(request)
        ids = completion_prompt(tokenizer, body)
        return await respond(request, body, ids, sampling(body, len(ids), engine.context, 16), ids[-8:], chat=False)

    async def respond(request: Request, body: dict, ids: list[int], params: dict, context: list[int], chat: bool):
        job = Job(ids, **params, text_context=context, loop=asyncio.get_running_loop())
        engine.submit(job)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        head = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time())}
        head["model"] = model_id

        def usage(made: int) -> dict:
            return {"prompt_tokens": len(ids), "completion_tokens": made, "total_tokens": len(ids) + made}

        def choice(text: Optional[str], reason: Optional[str], delta: bool) -> dict:
            """A choice of a response (delta=False) or of a streamed chunk, in the endpoint's shape."""
            out = {"index": 0, "logprobs": None, "finish_reason": reason}
            if not chat:
                return {**out, "text": text or ""}
            if delta:
                return {**out, "delta": {} if text is None else {"content": text}}
            return {**out, "message": {"role": "assistant", "content": text}}

        if body.get("stream"):
            chunk = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}
            with_usage = bool((body.get("stream_options") or {}).get("include_usage"))

            async def events():
                done = False
                try:
                    if chat:
                        yield sse({**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
                    while True:
                        event = await job.events.get()
                        if event[0] == "text":
                            yield sse({**chunk, "choices": [choice(event[1], None, True)]})
                            continue
                        done = True
                        if event[0] == "error":
                            yield sse({"error": {"message": event[1], "type": "server_error"}})
                        else:
                            yield sse({**chunk, "choices": [choice(None, event[1], True)]})
                            if with_usage:
                                yield sse({**chunk, "choices": [], "usage": usage(event[2])})
                        yield "data: [DONE]\n\n"
                        return
                finally:
                    job.cancelled = not done  # the client left mid-stream: its row stops

            return StreamingResponse(events(), media_type="text/event-stream")

        parts = []
        while True:
            try:
                event = await asyncio.wait_for(job.events.get(), timeout=1.0)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    job.cancelled = True
                    raise ApiError(499, "the client left") from None
                continue
            if event[0] == "text":
                parts.append(event[1])
            elif event[0] == "error":
                raise ApiError(500, event[1])
            else:
                return JSONResponse(
                    {**head, "choices": [choice("".join(parts), event[1], False)], "usage": usage(event[2])}
                )

    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return e.response()

    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        return ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}").response()

    routes = [
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
    ]
    return Starlette(routes=routes, exception_handlers={ApiError: api_error, HTTPException: http_error})


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


# ---------------------------------------------------------------- command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Serve a model over an OpenAI-compatible HTTP API.")
    generate.add_model_flags(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 opens the server to the network)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--max_batch_size", type=int, default=8, help="requests decoded together, at most")
    p.add_argument("--queue_size", type=int, default=64, help="requests that may wait; more are answered 503")
    p.add_argument(
        "--max_seq_length", type=int, default=None, help="context per request, prompt and reply (default: the model's)"
    )
    p.add_argument("--model_name", default=None, help="the id /v1/models reports (default: the checkpoint's folder)")
    args = p.parse_args(argv)
    generate.check_model_args(args)
    if args.max_batch_size < 1 or args.queue_size < 1 or not 0 < args.port < 65536:
        raise SystemExit("error: --max_batch_size and --queue_size must be at least 1, --port in 1..65535")
    if args.max_seq_length is not None and args.max_seq_length < 2:
        raise SystemExit("error: --max_seq_length must be at least 2")
    generate.finish_model_args(args)
    # generate.py's flags that a server does not take
    args.draft_checkpoint_path = args.draft_quantize = args.speculate = None
    args.prompt, args.speculate_k, args.num_samples = "", 0, 1
    return args


def main(argv=None):
    args = parse_args(argv)
    if uvicorn is None:
        raise SystemExit("error: serve.py needs starlette and uvicorn: pip install starlette uvicorn")
    torch.manual_seed(args.seed)
    try:
        config, weight_bytes = generate.model_config(args)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    context = min(args.max_seq_length or config.block_size, config.block_size)
    args.batch_size, args.max_new_tokens = args.max_batch_size, context - 1
    generate.check_fits(args, config, weight_bytes, 1, torch.device(args.device))  # weights and the full KV cache
    tokenizer = generate.load_tokenizer(args, config.vocab_size)
    if tokenizer is None:
        raise SystemExit("error: a server needs a tokenizer: pass --tokenizer_path")
    _, model, _, steps = generate.setup(args)
    model.setup_caches(args.max_batch_size, context)  # once, at the largest: every round reuses it
    engine = Engine(model, tokenizer, steps, args.max_batch_size, args.queue_size, context)
    warm_up = args.compile or args.compile_prefill
    threading.Thread(target=engine.serve_forever, args=(warm_up,), daemon=True).start()
    name = args.model_name or (args.random_init or args.checkpoint_path.parent.name)
    note = "; compiling first: /health answers 503 until it prints ready" if warm_up else ""
    print(f"Serving {name} on http://{args.host}:{args.port}/v1 (context {context}, batches of up to "
          f"{args.max_batch_size}){note}", flush=True)  # fmt: skip
    uvicorn.run(make_app(engine, tokenizer, name), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
