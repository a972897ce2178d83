"""What only a GPU can show: the CUDA kernels, the compiled defaults and the command-line tools on CUDA, each
against the CPU or the plain eager model. Run with `python -m pytest -m gpu` on a machine with a CUDA GPU."""

import subprocess
import sys

import pytest
import torch
from conftest import ROOT, STORY, rel_err

import generate
import quantize as q

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
PROMPT = "Once upon a time"


def cli(*args: str, timeout: int = 600) -> str:
    """Run one of the project's scripts as a user would; its stdout, or the failure with stderr."""
    p = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{' '.join(args)}\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}"
    return p.stdout


def greedy_text(checkpoint, device: str, *flags: str, new_tokens: int = 60) -> str:
    out = cli("generate.py", "--checkpoint_path", str(checkpoint), "--device", device, "--prompt", PROMPT,
              "--temperature", "0",
              "--num_samples", "1", "--max_new_tokens", str(new_tokens), *flags)  # fmt: skip
    return out[out.index(PROMPT) : out.index("\nSample 0:")]  # the text, between the start-up lines and the figures


@pytest.fixture(autouse=True)
def fresh_compiler():
    """Each test compiles its own models: compiled step functions share one code object, whose recompilations
    (one per model dtype and shape) would otherwise add up across tests to dynamo's limit."""
    torch._dynamo.reset()


def setup(checkpoint, *flags: str):
    """(model, draft, step functions) exactly as generate.py sets them up for these flags, on CUDA."""
    args = generate.parse_args(["--checkpoint_path", str(checkpoint), "--device", "cuda", *flags])
    _, model, draft, steps = generate.setup(args)
    return model, draft, steps


def story_ids(tokenizer_path) -> torch.Tensor:
    from tokenizer import get_tokenizer

    return torch.tensor(get_tokenizer(tokenizer_path).encode(STORY), dtype=torch.int, device="cuda")


# ---------------------------------------------------------------- quantize.py, then generate.py


def quantize_on(stories, device: str, mode: str, calibration=None) -> dict:
    folder = stories.parent / device
    folder.mkdir()
    for f in stories.parent.iterdir():
        if f.is_file():
            (folder / f.name).write_bytes(f.read_bytes())
    extra = (
        ["--calibration_file", str(calibration), "--calibration_seq_len", "128", "--calibration_samples", "8"]
        if calibration
        else []
    )
    cli(
        "quantize.py",
        "--checkpoint_path",
        str(folder / "model.pth"),
        "--mode",
        mode,
        "--groupsize",
        "32",
        "--device",
        device,
        *extra,
    )
    out = q.output_path(folder / "model.pth", mode, 32)
    return out, torch.load(out, weights_only=True)


@pytest.mark.parametrize("mode", ["int8", "int4", "int4-gptq"])
def test_quantize_on_cuda_equals_the_cpu_and_generates(stories, tmp_path, mode):
    """The same file on either device: int8 identical, int4 round-to-nearest identical codes and scales, GPTQ (its
    Cholesky factors differ in the last bits between devices) at least 95% identical codes. Then generate.py on
    CUDA (our kernels, eager) gives the CPU's greedy text for the file (float32 on both)."""
    calibration = None
    if mode == "int4-gptq":
        calibration = tmp_path / "calibration.txt"
        calibration.write_text((STORY + "\n") * 30)
    cuda_path, on_cuda = quantize_on(stories, "cuda", mode, calibration)
    _, on_cpu = quantize_on(stories, "cpu", mode, calibration)
    assert on_cuda.keys() == on_cpu.keys()
    assert q.unquantized_weights(on_cuda, mode, 32) == []
    codes = [k for k, v in on_cuda.items() if not v.is_floating_point()]
    assert codes and all(on_cuda[k].dtype == (torch.int8 if mode == "int8" else torch.uint8) for k in codes)
    if mode == "int4-gptq":
        same = sum(int((q.unpack_int4(on_cuda[k]) == q.unpack_int4(on_cpu[k])).sum()) for k in codes)
        assert same / sum(on_cuda[k].numel() * 2 for k in codes) > 0.95
    else:
        for k in on_cuda:
            assert torch.equal(on_cuda[k], on_cpu[k]), k
    cuda_text = greedy_text(cuda_path, "cuda", "--precision", "fp32")
    assert cuda_text == greedy_text(cuda_path, "cpu")
    assert cuda_text.startswith(PROMPT) and len(cuda_text) > 150


# ---------------------------------------------------------------- the compiled defaults against eager


def test_compiled_decode_and_prefill_in_float32_give_the_reference_story():
    flags = ["--compile", "--compile_prefill", "--precision", "fp32"]
    assert greedy_text(ROOT / "models/stories260K/model.pth", "cuda", *flags, new_tokens=64).startswith(STORY)


def test_a_compiled_chat_compiles_before_the_first_prompt_and_replies_as_eager():
    """--interactive --compile: the chat compiles before it asks for the first prompt, and its greedy float32 replies
    over two turns are the eager chat's (the warm-up's dummy prompts leave nothing behind in the cache)."""

    def chat(*flags: str) -> str:
        args = ["generate.py", "--interactive", "--device", "cuda", "--precision", "fp32", "--temperature", "0",
                "--max_new_tokens", "40", *flags]  # fmt: skip
        p = subprocess.run([sys.executable, *args], cwd=ROOT, input="Once upon a time\nThe end\n", capture_output=True,
                           text=True, timeout=600)  # fmt: skip
        assert p.returncode == 0, p.stderr[-3000:]
        return p.stdout

    compiled, eager = chat("--compile").split("What is your prompt?"), chat().split("What is your prompt?")
    assert "Compiled for the chat" in compiled[0] and len(compiled) == 4  # two replies, then the EOF
    assert compiled[1:] == eager[1:] and len(eager[1].strip()) > 40


@pytest.mark.parametrize("mode", ["bf16", "int8", "int4"])
@torch.no_grad()
def test_compiled_default_decode_steps_match_eager_teacher_forced(stories, mode):
    """Every decode step of the compiled default (our GEMVs, fused blocks, the attention kernel, PDL, one compiled
    layer) against the plain eager model (kernels torch, no attention kernel) on the same bf16 weights, teacher-forced
    along the reference story: next-token distributions within 2% (bf16 rounding), the same argmax nearly always."""
    path = stories
    if mode != "bf16":
        cli("quantize.py", "--checkpoint_path", str(stories), "--mode", mode, "--device", "cuda")
        path = q.output_path(stories, mode, 32)
    ids = story_ids(stories.parent / "tokenizer.model")
    sampling = dict(temperature=1.0, top_k=None)
    probs = {}
    for name, flags in (("compiled", ["--compile"]), ("eager", ["--kernels", "torch", "--no-attention_kernel"])):
        model, _, steps = setup(path, *flags)
        model.setup_caches(1, len(ids) + 1)
        steps["prefill_fn"](model, ids[None, :4], torch.arange(4, device="cuda"), **sampling)
        rows = []
        for i in range(4, len(ids)):
            _, p = steps["decode_fn"](model, ids[None, i : i + 1], torch.tensor([i], device="cuda"), **sampling)
            rows.append(p.clone())
        probs[name] = torch.cat(rows)
    assert rel_err(probs["compiled"], probs["eager"]) < 2e-2
    assert (probs["compiled"].argmax(-1) == probs["eager"].argmax(-1)).float().mean() > 0.95


@pytest.mark.parametrize("mode", ["bf16", "int8", "int4"])
@torch.no_grad()
def test_compiled_prefill_matches_eager(stories, mode):
    """The compiled defaults' prefill (a CUDA graph per bucket up to 64 positions, then --compile_prefill's dynamic
    shapes) after prompts of 1 to 100 tokens, against the plain eager model on the same weights: the next-token
    distribution and the cache it leaves are within bf16 rounding of the float32 model: no further from it than
    twice the plain bf16 model is, or 2%."""
    path = stories
    if mode != "bf16":
        cli("quantize.py", "--checkpoint_path", str(stories), "--mode", mode, "--device", "cuda")
        path = q.output_path(stories, mode, 32)
    ids = story_ids(stories.parent / "tokenizer.model").repeat(3)
    sampling = dict(temperature=1.0, top_k=None)
    plain = ["--kernels", "torch", "--no-attention_kernel"]
    models = [
        setup(path, "--compile", "--compile_prefill"),
        setup(path, *plain),
        setup(path, *plain, "--precision", "fp32"),
    ]
    for model, _, _ in models:
        model.setup_caches(1, 128)
    errors = []
    for n in (1, 5, 16, 17, 25, 40, 64, 100):
        pos, out = torch.arange(n, device="cuda"), []
        for model, _, steps in models:
            probs = steps["prefill_fn"](model, ids[None, :n], pos, **sampling)[1].clone()
            out.append([probs] + [layer.attention.kv_cache.kv[..., :n, :].float() for layer in model.layers])
        for i, (compiled, eager, ref) in enumerate(zip(*out, strict=True)):  # the distribution, then each layer's cache
            errors.append((n, i, rel_err(compiled, ref), rel_err(eager, ref)))
    print("largest error, compiled and eager:", max(e[2] for e in errors), max(e[3] for e in errors))
    bad = [e for e in errors if e[2] > max(2e-2, 2 * e[3])]
    assert not bad, f"(prompt length, 0: distribution / i: layer i-1's cache, compiled's error, eager's): {bad}"


@torch.no_grad()
def test_a_long_prompt_in_chunks_through_the_compiled_prefill_layer_gives_the_eager_tokens():
    """Chunks of more than 64 positions take prefill's compiled layer, the later ones attending through the cache's
    mask: in float32 the compiled defaults' greedy tokens equal the eager model's, the prompt run at once."""
    path = ROOT / "models/stories260K/model.pth"
    ids = story_ids(path.parent / "tokenizer.model").repeat(5)[:300]
    out = []
    for flags, chunk in ((["--compile"], 100), ([], 0)):
        model, _, steps = setup(path, "--precision", "fp32", *flags)
        out.append(generate.generate(model, ids, 40, temperature=0, prefill_chunk=chunk, **steps)[0])
    assert torch.equal(out[0], out[1])


# ---------------------------------------------------------------- batches and speculative decoding


@pytest.mark.parametrize(
    "mode,batch_size,kernels",
    [("bf16", 1, "auto"), ("int8", 1, "auto"), ("int8", 1, "torch"), ("int4", 1, "auto"), ("int4", 4, "auto")],
)
@torch.no_grad()
def test_every_row_of_a_batch_is_its_prompts_greedy_continuation(stories, mode, batch_size, kernels):
    """Batches of 2, 8 and 16 rows on the compiled defaults (dequant_matmul, where batch 1 takes the GEMVs; int4
    loaded for batch 4 puts its layers on tinygemm), and int8 on inductor's own kernels (`--kernels torch`, beside the
    attention kernel): one prompt repeated, and prompts of different lengths (left padding). Each generated token
    must be the greedy choice of the plain eager model run on that row alone, up to bf16 near-ties: its logit within
    0.25 of the top one, and the top one 9 times in 10."""
    path = stories
    if mode != "bf16":
        cli("quantize.py", "--checkpoint_path", str(stories), "--mode", mode, "--device", "cuda")
        path = q.output_path(stories, mode, 32)
    ids = story_ids(stories.parent / "tokenizer.model")
    model, _, steps = setup(path, "--compile", "--batch_size", str(batch_size), "--kernels", kernels)
    if mode == "int4":  # loaded for batch 4: tinygemm (for the layers it takes, N % 16 == 0), for batch 1: ours
        kinds = {m.kernel for m in model.modules() if isinstance(m, q.WeightOnlyInt4Linear)}
        assert ("tinygemm" in kinds, "triton" in kinds) == (batch_size == 4, batch_size == 1), kinds
    plain, _, _ = setup(path, "--kernels", "torch", "--no-attention_kernel")
    for prompts in ([ids[:5]] * 2, [ids[: 2 + 3 * b] for b in range(8)], [ids[: 2 + 2 * b] for b in range(16)]):
        model.max_seq_length = -1  # fresh caches
        y, stats = generate.generate(model, prompts, 40, temperature=0, **steps)
        T = max(p.numel() for p in prompts)
        for b, start in enumerate(stats["start"]):
            row = y[b, start:]
            plain.max_seq_length = -1
            plain.setup_caches(1, row.numel())
            logits = plain(row[None, :-1], torch.arange(row.numel() - 1, device="cuda"), prefill=True)[0].float()
            chosen = logits[T - start - 1 :]  # the logits that chose each new token: [40, V]
            gap = chosen.max(-1).values - chosen.gather(-1, row[T - start :, None].long())[:, 0]
            assert gap.max() <= 0.25 and (gap == 0).float().mean() >= 0.9, (len(prompts), b, gap)
            assert torch.equal(row[: T - start], prompts[b])  # the prompt itself, unpadded


@pytest.mark.parametrize("kernels", ["auto", "torch"])
def test_a_batch_of_different_prompts_equals_each_alone_in_float32(kernels):
    """Left padding changes nothing a row computes: in float32, compiled, each row's greedy tokens equal its
    prompt's alone."""
    path = ROOT / "models/stories260K/model.pth"
    model, _, steps = setup(path, "--compile", "--precision", "fp32", "--kernels", kernels)
    ids = story_ids(path.parent / "tokenizer.model")
    prompts = [ids[:n] for n in (1, 9, 4, 17)]
    y, stats = generate.generate(model, prompts, 48, temperature=0, **steps)
    for b, p in enumerate(prompts):
        model.max_seq_length = -1
        alone, _ = generate.generate(model, p, 48, temperature=0, **steps)
        assert torch.equal(y[b, stats["start"][b] :], alone[0]), b


@pytest.mark.parametrize("method", ["draft", "ngram"])
def test_greedy_speculative_decoding_equals_plain_greedy(stories, method):
    """float32, so that the verify step's wider matmuls cannot flip a near-tie that plain decoding resolves."""
    cli("quantize.py", "--checkpoint_path", str(stories), "--mode", "int8", "--device", "cuda")
    flags = ["--compile", "--precision", "fp32", "--speculate", method, "--speculate_k", "4"]
    if method == "draft":
        flags += ["--draft_checkpoint_path", str(q.output_path(stories, "int8", 32))]
    model, draft, steps = setup(stories, *flags)
    prompt = story_ids(stories.parent / "tokenizer.model")[:5]
    plain, _ = generate.generate(model, prompt, 80, temperature=0, **steps)
    model.max_seq_length = -1
    spec, stats = generate.generate(
        model, prompt, 80, draft_model=draft, speculate=method, speculate_k=4, temperature=0, **steps
    )
    assert torch.equal(spec, plain)
    assert sum(stats["accept_counts"][1:]) > 0  # some proposals were accepted: the verify path ran


# ---------------------------------------------------------------- eval.py and the compiled prefill


def test_eval_perplexity_on_cuda_equals_the_cpu(tmp_path):
    text = tmp_path / "story.txt"
    text.write_text((STORY + "\n") * 20)
    ppl = {}
    for device in ("cuda", "cpu"):
        out = cli("eval.py", "--checkpoint_path", str(ROOT / "models/stories260K/model.pth"), "--text_file", str(text),
                  "--device", device, "--seq_len", "256", "--stride", "128")  # fmt: skip
        ppl[device] = float(out.split("perplexity")[1].split()[0].strip(":= "))
    assert abs(ppl["cuda"] / ppl["cpu"] - 1) < 1e-2, ppl  # bf16 on CUDA, float32 on the CPU
