import os
import subprocess
import sys

import pytest
import torch
import torch._dynamo.testing
from conftest import ROOT, random_transformer, save_checkpoint, tiny_args

import bench
import generate
import kernels
from generate import generate as gen
from generate import logits_to_probs, ngram_proposal, sample, speculative_decode


def greedy_by_full_forward(model, prompt, n):
    """Reference greedy decoding with no KV cache reuse: a fresh full forward per token."""
    seq = prompt.tolist()
    for _ in range(n):
        model.max_seq_length = -1  # fresh caches each time
        model.setup_caches(1, len(seq))
        with torch.no_grad():
            seq.append(int(model(torch.tensor([seq]), torch.arange(len(seq)))[0, -1].argmax()))
    return seq


@pytest.fixture(scope="module")
def target():
    return random_transformer(tiny_args(), seed=0)


@pytest.fixture(scope="module")
def draft():
    return random_transformer(tiny_args(n_layer=1), seed=1)  # a different model: many rejections


def prompt_ids(n=12, seed=0):
    return torch.randint(3, 32000, (n,), generator=torch.Generator().manual_seed(seed)).int()


# ---------------------------------------------------------------- sampling


def test_temperature_zero_is_one_hot_argmax():
    logits = torch.randn(3, 50)
    probs = logits_to_probs(logits, temperature=0)
    assert torch.equal(probs.argmax(-1), logits.argmax(-1)) and torch.equal(probs.sum(-1), torch.ones(3))


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.1, 0.06, 0.04]]))
    assert (logits_to_probs(logits, 1.0, top_k=2) > 0).sum() == 2
    p = logits_to_probs(logits, 1.0, top_p=0.85)  # 0.5 + 0.3 < 0.85 <= 0.5 + 0.3 + 0.1
    assert (p > 0).sum() == 3 and torch.allclose(p[0, :3], torch.tensor([0.5, 0.3, 0.1]) / 0.9)


def test_top_k_sampling_draws_from_the_top_k_distribution():
    """sample() draws among the k candidates alone: its probs and its draws follow logits_to_probs's (no ties)."""
    torch.manual_seed(0)
    logits = torch.randn(1, 2, 1000).expand(4000, 2, 1000)  # one distribution, 4000 draws in one call
    tokens, probs = sample(logits, temperature=0.8, top_k=5, top_p=0.9)
    want = logits_to_probs(logits[0, -1], 0.8, top_k=5, top_p=0.9)
    assert torch.allclose(probs, want.expand_as(probs), atol=1e-6)
    freq = torch.bincount(tokens.view(-1).long(), minlength=1000) / tokens.numel()
    assert set(freq.nonzero().view(-1).tolist()) <= set(want.nonzero().view(-1).tolist())
    assert (freq - want).abs().max() < 0.03  # 4000 draws: one standard deviation is at most 0.008


def test_tensor_temperatures_sample_as_floats_and_share_one_compiled_step(target):
    """serve.py passes temperature and top_p as 0-d tensors: the same draws as the floats (0: the argmax), and one
    compiled graph for every value, where a float is baked into the graph (a compile per value a client sends)."""
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 1000)
    draws = []
    for t, p in ((0.7, 0.9), (torch.tensor(0.7), torch.tensor(0.9))):
        torch.manual_seed(1)
        draws.append(sample(logits, temperature=t, top_p=p))
    assert torch.equal(draws[0][0], draws[1][0]) and torch.allclose(draws[0][1], draws[1][1])
    greedy, _ = sample(logits, temperature=torch.tensor(0.0), top_p=torch.tensor(1.0))
    assert torch.equal(greedy, logits[:, -1].argmax(-1, keepdim=True).int())
    tokens, probs = sample(logits, temperature=torch.tensor(0.8), top_k=5)
    assert torch.allclose(probs, logits_to_probs(logits[:, -1], 0.8, top_k=5)) and bool(
        probs.gather(-1, tokens.long()).all()
    )

    target.max_seq_length = -1
    target.setup_caches(1, 16)
    x, pos = prompt_ids(1)[None], torch.tensor([0])
    for kind in (torch.tensor, float):
        torch._dynamo.reset()
        counter = torch._dynamo.testing.CompileCounter()
        step = torch.compile(generate.decode_one_token, backend=counter, dynamic=False, fullgraph=True)
        for t, p in ((0.0, 1.0), (0.8, 0.95), (1.3, 1.0)):  # greedy, top-p, plain
            with torch.no_grad():
                step(target, x, pos, temperature=kind(t), top_k=None, top_p=kind(p))
        assert counter.frame_count == (1 if kind is torch.tensor else 3), kind
    torch._dynamo.reset()


# ---------------------------------------------------------------- the generation loop


def test_greedy_generation_equals_full_forward_decoding(target):
    prompt = prompt_ids()
    y, _ = gen(target, prompt, 16, temperature=0)
    assert y[0].tolist() == greedy_by_full_forward(target, prompt, 16)


def test_batched_generation_gives_the_same_rows(target):
    y, _ = gen(target, prompt_ids(), 10, batch_size=3, temperature=0)
    assert y.shape == (3, 22) and (y == y[:1]).all()


def test_generation_stops_at_a_stop_token(target):
    prompt = prompt_ids()
    full, _ = gen(target, prompt, 16, temperature=0)
    stop = int(full[0, prompt.numel() + 4])
    y, _ = gen(target, prompt, 16, temperature=0, stop_ids=[stop])
    assert y[0].tolist() == full[0, : prompt.numel() + 5].tolist()


def test_a_prompt_in_chunks_fills_the_cache_and_continues_as_at_once(target):
    prompt = prompt_ids(40)
    target.max_seq_length = -1  # fresh caches of one row
    whole, _ = gen(target, prompt, 12, temperature=0, prefill_chunk=0)
    caches = [layer.attention.kv_cache.kv[:, :, :, :40].clone() for layer in target.layers]  # [2, B, H, 40, D]
    for chunk in (7, 16, 39, 40, 64):  # ragged, one short last chunk, exact, larger than the prompt
        target.max_seq_length = -1
        y, _ = gen(target, prompt, 12, temperature=0, prefill_chunk=chunk)
        assert torch.equal(y, whole), chunk
        for layer, kv in zip(target.layers, caches, strict=True):
            assert torch.allclose(layer.attention.kv_cache.kv[:, :, :, :40], kv, atol=1e-5), chunk
    target.max_seq_length = -1  # a left-padded batch in chunks: each row as alone
    prompts = [prompt_ids(n, seed=n) for n in (3, 17, 9)]
    y, stats = gen(target, prompts, 8, temperature=0, prefill_chunk=5)
    for b, p in enumerate(prompts):
        target.max_seq_length = -1
        assert torch.equal(y[b, stats["start"][b] :], gen(target, p, 8, temperature=0)[0][0]), b


def test_short_prompts_padded_to_a_bucket_give_the_plain_prefills_tokens_and_cache(target):
    """bucketed_prefill (eager here; under --compile on CUDA a CUDA graph per bucket): the padding's cache entries
    lie past the prompt and are overwritten before they are read, so tokens and cache are the plain prefill's, for
    one row, a left-padded batch and chunks; more positions than a bucket go to the fallback."""
    shapes = []

    def padded(model, x, *args, **kwargs):
        shapes.append(tuple(x.shape))
        return generate.prefill_padded(model, x, *args, **kwargs)

    bucketed = generate.bucketed_prefill(padded, generate.prefill)
    cases = [([prompt_ids(n)], 0, [(1, b)] if b else []) for n, b in ((1, 16), (9, 16), (16, 16), (17, 32), (40, 64),
                                                                     (64, 64), (65, 0))]  # fmt: skip
    cases += [([prompt_ids(n, seed=n) for n in (3, 12, 9)], 0, [(3, 16)]), ([prompt_ids(40)], 20, [(1, 32)] * 2)]
    cases += [([prompt_ids(80)], 70, [(1, 16)])]  # a first chunk past the buckets, a last one in
    cases += [([prompt_ids(n, seed=n) for n in (3, 17, 9)], 0, [])]  # 3 rows of 32: past dequant_matmul's rows
    for prompts, chunk, expected in cases:
        T = max(p.numel() for p in prompts)
        target.max_seq_length = -1
        ref, _ = gen(target, prompts, 10, temperature=0, prefill_chunk=chunk)
        cache = [layer.attention.kv_cache.kv[..., : T + 9, :].clone() for layer in target.layers]
        target.max_seq_length, shapes[:] = -1, []
        y, _ = gen(target, prompts, 10, temperature=0, prefill_chunk=chunk, prefill_fn=bucketed)
        assert torch.equal(y, ref) and shapes == expected, (T, shapes)
        for layer, kv in zip(target.layers, cache, strict=True):
            assert torch.allclose(layer.attention.kv_cache.kv[..., : T + 9, :], kv, atol=1e-5), T


def test_a_prompt_that_extends_the_cached_one_prefills_only_its_new_tokens(target):
    """A chat's next turn (cached=): the cache already holds the earlier turns, so prefill starts after them (in a
    padded bucket step too), and the tokens are those of the whole prompt from scratch; a cache that must be
    allocated anew holds nothing, and the whole prompt is prefilled."""
    starts = []

    def recording(model, x, input_pos, **kwargs):
        starts.append(int(input_pos[0]))
        return bucketed(model, x, input_pos, **kwargs)

    bucketed = generate.bucketed_prefill(generate.prefill_padded, generate.prefill)
    target.max_seq_length = -1
    target.setup_caches(1, 128)
    first, _ = gen(target, prompt_ids(9), 8, temperature=0)
    second = torch.cat([first[0], prompt_ids(5, seed=3)])  # the reply's last token was never fed
    y, _ = gen(target, second, 8, temperature=0, cached=first.shape[1] - 1, prefill_fn=recording)
    assert starts == [first.shape[1] - 1]
    target.max_seq_length = -1
    assert torch.equal(y, gen(target, second, 8, temperature=0)[0])
    target.max_seq_length, starts[:] = 16, []  # too short for the prompt: a new cache
    assert torch.equal(y, gen(target, second, 8, temperature=0, cached=16, prefill_fn=recording)[0])
    assert starts == [0]
    with pytest.raises(ValueError, match="one row"):
        gen(target, [second, second], 8, temperature=0, cached=4)


def test_a_compiled_chat_warms_every_prompt_bucket_at_the_cache_its_first_turns_use(target, draft):
    """warm_up_chat (before the first prompt, under --compile on CUDA): each bucket's prompt twice (a CUDA graph
    records on a step's second call), target and draft caches at one length, which a first turn of up to 64 tokens
    then reuses: the first reply compiles nothing again."""
    lengths = []

    def recording(model, x, input_pos, **kwargs):
        lengths.extend([x.shape[1]] if model is target else [])
        return generate.prefill(model, x, input_pos, **kwargs)

    steps = {"prefill_fn": recording, "decode_fn": generate.decode_one_token, "verify_fn": generate.model_forward}
    args = generate.parse_args(["--max_new_tokens", "100", "--temperature", "0"])
    args.speculate, args.speculate_k = "draft", 4
    target.max_seq_length = draft.max_seq_length = -1
    generate.warm_up_chat(target, args, steps, draft, torch.device("cpu"))
    assert lengths == [16, 32, 64] * 2 + [65]
    assert target.max_seq_length == draft.max_seq_length == 192  # 64 + 100 + k + 1, in rows of 64
    kv = target.layers[0].attention.kv_cache.kv
    gen(target, prompt_ids(40), 100, draft_model=draft, speculate="draft", speculate_k=4, temperature=0, **steps)
    assert target.layers[0].attention.kv_cache.kv is kv and draft.max_seq_length == 192


def test_a_compiled_prefill_layer_serves_every_layer_and_length_and_gives_the_eager_tokens(target):
    """--compile_prefill's one layer graph, over prompts of several lengths in chunks (the first from position 0, the
    later ones through the cache's mask), against the eager prompt at once: the same tokens, from two graphs (one per
    mask kind) for all the layers and lengths."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    try:
        for n in (45, 23, 57):
            prompt = prompt_ids(n)
            target.prefill_layer, target.max_seq_length = generate.run_layer, -1
            ref, _ = gen(target, prompt, 6, temperature=0, prefill_chunk=0)
            target.prefill_layer, target.max_seq_length = generate.compile_prefill_layer(), -1
            y, _ = gen(target, prompt, 6, temperature=0, prefill_chunk=32)  # 45: 32 + 13, 23 at once, 57: 32 + 25
            assert torch.equal(y, ref), n
    finally:
        target.prefill_layer = generate.run_layer
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2


def test_compile_gives_prefill_its_compiled_layer_but_a_mixture_of_experts_keeps_an_eager_one(tmp_path):
    """A mixture of experts' prefill loops over experts with routing-dependent shapes: compiled, each prompt length
    would compile anew."""
    for overrides, compiled in (({}, True), (dict(num_experts=4, num_activated_experts=2), False)):
        path = save_checkpoint(random_transformer(tiny_args(**overrides)), tmp_path / str(compiled))
        args = generate.parse_args(["--checkpoint_path", str(path), "--compile", "--device", "cpu"])
        _, model, _, _ = generate.setup(args)
        assert (model.prefill_layer is not generate.run_layer) is compiled


def test_prefill_makes_the_last_positions_logits_alone(target):
    """A long prompt never holds a [B, S, V] logits tensor: the output layer sees one position per row."""
    seen = []
    hook = target.output.register_forward_hook(lambda m, args, out: seen.append(tuple(out.shape)))
    try:
        gen(target, prompt_ids(30), 3, batch_size=2, temperature=0, prefill_chunk=8)
    finally:
        hook.remove()
    assert seen[:4] == [(2, 1, target.config.vocab_size)] * 4  # four prefill chunks, then decode steps


def test_greedy_sampling_draws_no_random_numbers():
    logits = torch.randn(2, 1, 50)
    state = torch.get_rng_state()
    token, probs = sample(logits, temperature=0)
    assert torch.equal(torch.get_rng_state(), state)
    assert token.view(-1).tolist() == logits[:, -1].argmax(-1).tolist() and torch.equal(probs.argmax(-1), token[:, 0])


# ---------------------------------------------------------------- speculative decoding


def test_greedy_speculative_with_draft_equals_plain_greedy(target, draft):
    prompt = prompt_ids()
    plain, _ = gen(target, prompt, 30, temperature=0)
    spec, stats = gen(target, prompt, 30, draft_model=draft, speculate="draft", speculate_k=4, temperature=0)
    assert spec.tolist() == plain.tolist()
    assert stats["accept_counts"][0] > 0, "the draft should be rejected sometimes, or this test checks nothing"


def test_greedy_speculative_with_a_quantized_draft_equals_plain_greedy(target):
    import quantize

    prompt = prompt_ids()
    draft = quantize.quantize_model(random_transformer(tiny_args(), seed=0), "int8", device="cpu")  # target's int8 copy
    spec, stats = gen(target, prompt, 30, draft_model=draft, speculate="draft", speculate_k=4, temperature=0)
    assert spec.tolist() == gen(target, prompt, 30, temperature=0)[0].tolist()
    assert sum(stats["accept_counts"]) < 29  # an int8 copy agrees often: fewer target forwards than tokens


def test_greedy_speculative_with_itself_accepts_everything(target):
    prompt = prompt_ids()
    spec, stats = gen(target, prompt, 21, draft_model=target, speculate="draft", speculate_k=4, temperature=0)
    assert spec.tolist() == gen(target, prompt, 21, temperature=0)[0].tolist()
    assert stats["accept_counts"] == [0, 0, 0, 0, 4]  # 1 + 4 steps of 5 tokens


def test_greedy_ngram_speculation_equals_plain_greedy(target):
    prompt = torch.cat([prompt_ids(6)] * 3)  # repetitive text gives the lookup something to find
    plain, _ = gen(target, prompt, 30, temperature=0)
    spec, stats = gen(target, prompt, 30, speculate="ngram", speculate_k=4, temperature=0)
    assert spec.tolist() == plain.tolist()
    assert sum(stats["accept_counts"]) < 29, "steps should accept more than one token on average"


def test_speculative_steps_verify_a_fixed_k_and_stop_at_max_new_tokens(target):
    """Every verification sees k+1 tokens (one compiled shape, no recompiles); the output is cut at max_new_tokens."""
    prompt = prompt_ids()
    widths = []

    def verify(model, x, input_pos):
        widths.append(x.shape[1])
        return generate.model_forward(model, x, input_pos)

    spec, _ = gen(
        target, prompt, 23, draft_model=target, speculate="draft", speculate_k=4, temperature=0, verify_fn=verify
    )
    assert spec.tolist() == gen(target, prompt, 23, temperature=0)[0].tolist()  # 1 + 5 x 5 = 26 would overshoot 23
    assert set(widths) == {5}


def test_gb_per_token_counts_only_the_activated_experts():
    dense = random_transformer(tiny_args(), seed=0)
    moe = random_transformer(tiny_args(num_experts=4, num_activated_experts=2), seed=0)
    expert_bytes = sum(p.numel() * 4 for n, p in moe.named_parameters() if ".cond_ffn." in n)
    gate_bytes = sum(p.numel() * 4 for n, p in moe.named_parameters() if n.endswith(".gate.weight"))
    ffn_bytes = sum(p.numel() * 4 for n, p in dense.named_parameters() if ".feed_forward." in n)
    assert expert_bytes == 4 * ffn_bytes  # sanity: 4 experts of the dense FFN's shape
    expected = bench.weight_bytes_per_token(dense) - ffn_bytes + expert_bytes // 2 + gate_bytes
    assert bench.weight_bytes_per_token(moe) == expected


def test_gb_per_token_leaves_out_the_kv_cache_and_rope_table():
    """The GB/s figure counts weights: the caches, RoPE table and mask that setup_caches adds are not weights."""
    model = random_transformer(tiny_args(), seed=0)
    before = bench.weight_bytes_per_token(model)
    model.setup_caches(2, 64)
    assert bench.weight_bytes_per_token(model) == before


@pytest.mark.parametrize("mode", [None, "int8"])
def test_gb_per_token_counts_stacked_w1_w3_once(mode):
    """kernels="auto" stacks w1 and w3 into one matrix (their modules keep views of it): the same bytes per token."""
    pytest.importorskip("triton")
    import quantize

    model = random_transformer(tiny_args(), seed=0)
    model = quantize.quantize_model(model, mode) if mode else model
    before = bench.weight_bytes_per_token(model)
    kernels.use_triton_kernels(model, "auto", pdl=False)  # what use_kernels does on CUDA
    assert all(type(layer.feed_forward) is kernels.GatedFeedForward for layer in model.layers)
    assert bench.weight_bytes_per_token(model) == before


def test_pdl_is_off_where_it_cannot_run_and_the_environment_decides_when_set(monkeypatch):
    """Programmatic dependent launch is a CUDA (Hopper) launch attribute: never asked for on the CPU or, unmeasured,
    under TP."""
    monkeypatch.delenv("TORCHINDUCTOR_ENABLE_PDL", raising=False)
    assert generate.use_pdl(torch.device("cpu"), use_tp=False) is False
    monkeypatch.setenv("TORCHINDUCTOR_ENABLE_PDL", "1")
    assert generate.use_pdl(torch.device("cpu"), use_tp=False) is False
    monkeypatch.setenv("TORCHINDUCTOR_ENABLE_PDL", "0")
    assert generate.use_pdl(torch.device("cuda"), use_tp=False) is False


def test_ngram_proposal_finds_the_latest_longest_match():
    t = torch.tensor([5, 1, 2, 9, 9, 1, 2, 7, 8, 3, 1, 2])
    assert ngram_proposal(t, 2).tolist() == [7, 8]  # latest earlier "1 2" is followed by 7 8
    assert ngram_proposal(torch.tensor([1, 2, 3]), 2).tolist() == []


def test_kv_caches_stay_consistent_after_rejections(target, draft):
    """After speculative steps with rejections, the target's cache equals a fresh prefill of the output."""
    prompt = prompt_ids()
    y, stats = gen(target, prompt, 20, draft_model=draft, speculate="draft", speculate_k=4, temperature=0)
    assert stats["accept_counts"][0] > 0
    n = y.shape[1] - 1  # the last token was sampled but not yet fed
    spec_cache = [b.attention.kv_cache.k_cache[0, :, :n].clone() for b in target.layers]
    target.max_seq_length = -1
    target.setup_caches(1, n)
    with torch.no_grad():
        target(y[:, :n], torch.arange(n))
    for layer, cache in zip(target.layers, spec_cache, strict=True):
        assert torch.allclose(layer.attention.kv_cache.k_cache[0, :, :n], cache, atol=1e-5)


def test_speculative_sampling_follows_the_target_distribution():
    """Rejection sampling keeps the target's distribution: draw the first speculated token many times."""
    vocab = 8
    tgt = random_transformer(tiny_args(vocab_size=vocab), seed=3)
    drf = random_transformer(tiny_args(vocab_size=vocab, n_layer=1), seed=4)
    for m in (tgt, drf):
        with torch.no_grad():
            m.output.weight.mul_(20)  # peaked, different distributions: a real test of the correction
    prompt = torch.tensor([1, 5, 2, 7, 3], dtype=torch.int)
    for m in (tgt, drf):
        m.setup_caches(1, 16)
        with torch.no_grad():
            m(prompt.view(1, -1), torch.arange(5))
    cur, pos = torch.tensor(4, dtype=torch.int), 5
    with torch.no_grad():
        want = logits_to_probs(tgt(cur.view(1, 1), torch.tensor([pos]))[0, -1], temperature=1.0)
        got_draft = logits_to_probs(drf(cur.view(1, 1), torch.tensor([pos]))[0, -1], temperature=1.0)
    assert 0.5 * (want - got_draft).abs().sum() > 0.3, "draft and target must differ for the test to mean anything"
    torch.manual_seed(0)
    n = 3000
    counts = torch.zeros(vocab)
    with torch.no_grad():
        for _ in range(n):
            counts[int(speculative_decode(tgt, drf, cur, pos, 3, temperature=1.0)[0])] += 1
    tv = 0.5 * (counts / n - want).abs().sum()
    assert tv < 0.04, f"total variation {tv:.3f}; sampling error at n=3000 over 8 tokens is about 0.02"


# ---------------------------------------------------------------- the command line


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_checkpoint(random_transformer(tiny_args(block_size=64)), tmp_path_factory.mktemp("tiny"))


def run_cli(capsys, *argv):
    generate.main([str(a) for a in argv])
    return capsys.readouterr().out


def test_cli_greedy_is_deterministic_and_matches_the_library(capsys, checkpoint, llama2_tokenizer_path, target):
    argv = ["--checkpoint_path", checkpoint, "--tokenizer_path", llama2_tokenizer_path, "--prompt", "Once upon a time"]
    argv += ["--temperature", "0", "--max_new_tokens", "12", "--num_samples", "2", "--ignore_eos"]
    out1, out2 = run_cli(capsys, *argv, "--seed", "1"), run_cli(capsys, *argv, "--seed", "2")
    texts = [line for line in out1.splitlines() if line.startswith("Once upon a time")]
    assert len(texts) == 2 and texts[0] == texts[1] and len(texts[0]) > len("Once upon a time")
    assert texts == [line for line in out2.splitlines() if line.startswith("Once upon a time")]
    model = generate.load_model(checkpoint, "cpu", torch.float32)
    from tokenizer import get_tokenizer

    tok = get_tokenizer(llama2_tokenizer_path)
    y, _ = gen(model, torch.tensor(tok.encode("Once upon a time"), dtype=torch.int), 12, temperature=0)
    assert texts[0] == tok.decode(y[0].tolist())
    assert "decode" in out1 and "tokens/s" in out1


def greedy_argv(checkpoint, tokenizer_path) -> list:
    """generate.py as a subprocess: 6 greedy tokens after "Once upon a time", on the CPU."""
    argv = [sys.executable, str(ROOT / "generate.py"), "--checkpoint_path", str(checkpoint)]
    argv += ["--tokenizer_path", str(tokenizer_path), "--prompt", "Once upon a time", "--temperature", "0"]
    return argv + ["--max_new_tokens", "6", "--num_samples", "1", "--ignore_eos", "--device", "cpu"]


def test_compile_compiles_one_layer_by_default_and_gives_the_eager_tokens(checkpoint, llama2_tokenizer_path, tmp_path):
    """--compile's default (one compiled layer, reused for every layer; prefill's own compiled layer) decodes the
    eager greedy text, from two graphs."""
    assert generate.parse_args(["--compile"]).compile_layer_once is True
    assert generate.parse_args(["--compile", "--no-compile_layer_once"]).compile_layer_once is False
    assert generate.parse_args([]).compile_layer_once is False
    assert generate.parse_args(["--compile"]).prefill_graphs is True  # short prompts' CUDA graphs, on CUDA
    assert generate.parse_args(["--compile", "--no-prefill_graphs"]).prefill_graphs is False
    assert generate.parse_args(["--compile"]).compile_prefill is True
    assert generate.parse_args(["--compile", "--no-compile_prefill"]).compile_prefill is False
    assert generate.parse_args([]).compile_prefill is False
    argv = greedy_argv(checkpoint, llama2_tokenizer_path)
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    outs = [
        subprocess.run(argv + extra, capture_output=True, text=True, env=env, timeout=600)
        for extra in ([], ["--compile"])
    ]
    assert all(o.returncode == 0 for o in outs), [o.stderr[-2000:] for o in outs]
    texts = [[line for line in o.stdout.splitlines() if line.startswith("Once upon a time")] for o in outs]
    assert texts[0] == texts[1] and len(texts[0]) == 1
    assert "graphs: 0 from cache, 2 compiled" in outs[1].stdout  # the decode step, prefill's layer


def test_compiled_prefill_alone_gives_the_eager_tokens_and_a_warm_start_reuses_it(
    checkpoint, llama2_tokenizer_path, tmp_path
):
    """--compile_prefill without --compile: prefill's layer compiled (dynamic shapes), decode eager, same greedy text;
    a second run with the same cache directory compiles nothing."""
    argv = greedy_argv(checkpoint, llama2_tokenizer_path)
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    outs = [
        subprocess.run(argv + extra, capture_output=True, text=True, env=env, timeout=600)
        for extra in ([], ["--compile_prefill"], ["--compile_prefill"])
    ]
    assert all(o.returncode == 0 for o in outs), [o.stderr[-2000:] for o in outs]
    texts = [[line for line in o.stdout.splitlines() if line.startswith("Once upon a time")] for o in outs]
    assert texts[0] == texts[1] == texts[2] and len(texts[0]) == 1
    assert "Compilation" not in outs[0].stdout
    assert "graphs: 0 from cache, 1 compiled" in outs[1].stdout
    assert "graphs: 1 from cache, 0 compiled" in outs[2].stdout


def cli_error(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as e:
        generate.main([str(a) for a in argv])
    msg = str(e.value.code)
    assert "\n" not in msg and msg.startswith("error: ")
    return msg


def test_cli_errors_are_one_line(capsys, checkpoint, llama2_tokenizer_path, tmp_path):
    tok = ["--tokenizer_path", llama2_tokenizer_path]
    assert "checkpoint not found" in cli_error(capsys, "--checkpoint_path", tmp_path / "nope.pth", *tok)
    assert "tokenizer file not found" in cli_error(
        capsys, "--checkpoint_path", checkpoint, "--tokenizer_path", tmp_path / "nope.model"
    )
    assert "unknown model name 'Llama-9'" in cli_error(capsys, "--random_init", "Llama-9", "--prompt", "5")
    msg = cli_error(capsys, "--checkpoint_path", checkpoint, *tok, "--prompt", "60", "--max_new_tokens", "10")
    assert "exceeds the context length 64" in msg
    assert "lower --batch_size" in cli_error(
        capsys, "--checkpoint_path", checkpoint, *tok, "--max_new_tokens", "10", "--batch_size", str(10**9)
    )
    truncated = tmp_path / "model.pth"
    truncated.write_bytes(checkpoint.read_bytes()[:2000])
    (tmp_path / "model_config.json").write_bytes((checkpoint.parent / "model_config.json").read_bytes())
    assert "corrupt, truncated" in cli_error(capsys, "--checkpoint_path", truncated, *tok)
    assert "the prompt is empty" in cli_error(capsys, "--checkpoint_path", checkpoint, *tok, "--prompt", "0")
    assert "--temperature -1.0 is negative" in cli_error(capsys, "--checkpoint_path", checkpoint, "--temperature", "-1")
    assert "--top_k -3 is negative" in cli_error(capsys, "--checkpoint_path", checkpoint, "--top_k", "-3")
    assert "--top_p 0.0 is outside" in cli_error(capsys, "--checkpoint_path", checkpoint, "--top_p", "0")
    assert "--speculate_k -2 must be at least 1" in cli_error(
        capsys, "--checkpoint_path", checkpoint, "--speculate", "ngram", "--speculate_k", "-2"
    )
    assert "add --compile" in cli_error(capsys, "--checkpoint_path", checkpoint, "--compile_layer_once")
    assert "add --compile" in cli_error(capsys, "--checkpoint_path", checkpoint, "--prefill_graphs")
    assert "--attention_kernel is a CUDA kernel" in cli_error(
        capsys, "--checkpoint_path", checkpoint, "--attention_kernel", "--device", "cpu"
    )


class Boom:
    def __reduce__(self):
        return (print, ("code ran while loading",))


def test_checkpoint_cannot_run_code(capsys, checkpoint, llama2_tokenizer_path, tmp_path):
    evil = tmp_path / "model.pth"
    torch.save({"x": Boom()}, evil)
    (tmp_path / "model_config.json").write_bytes((checkpoint.parent / "model_config.json").read_bytes())
    msg = cli_error(capsys, "--checkpoint_path", evil, "--tokenizer_path", llama2_tokenizer_path)
    assert "cannot read checkpoint" in msg and "code ran" not in capsys.readouterr().out


def test_cli_error_has_no_traceback(checkpoint, llama2_tokenizer_path):
    p = subprocess.run(
        [sys.executable, "generate.py", "--checkpoint_path", str(checkpoint), "--prompt", "70"]
        + ["--tokenizer_path", str(llama2_tokenizer_path)],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert p.returncode == 1 and "Traceback" not in p.stderr and p.stderr.count("\n") == 1


def test_interactive_chat_streams_replies_and_keeps_the_conversation(
    capsys, monkeypatch, checkpoint, llama2_tokenizer_path
):
    """--interactive wraps each message in the chat template, streams exactly the greedy reply, and the
    second reply is generated from the whole conversation (turn 1 + reply + end of turn + turn 2), of which the
    cache already holds turn 1 and the reply."""
    from tokenizer import get_tokenizer

    answers = iter(["Tell me a story", "Another one"])

    def fake_input(prompt=""):
        try:
            return next(answers)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", fake_input)
    cached = []
    monkeypatch.setattr(generate, "generate", lambda *a, **kw: cached.append(kw["cached"]) or gen(*a, **kw))
    generate.main(["--checkpoint_path", str(checkpoint), "--tokenizer_path", str(llama2_tokenizer_path)]
                  + ["--interactive"]
                  + ["--temperature", "0", "--max_new_tokens", "6"])  # fmt: skip
    streamed = capsys.readouterr().out.split("\n")[1:3]  # the two reply lines, after the model-load line
    tok = get_tokenizer(llama2_tokenizer_path)
    model = generate.load_model(checkpoint, "cpu", torch.float32)
    history, fed = [], 0
    for message, line in zip(["Tell me a story", "Another one"], streamed, strict=True):
        prompt = torch.tensor(history + tok.encode_chat(message, first_turn=not history), dtype=torch.int)
        y, _ = gen(model, prompt, 6, temperature=0, stop_ids=tok.stop_ids())
        reply = [t for t in y[0, prompt.numel() :].tolist() if t not in tok.stop_ids()]
        assert line == tok.decode(reply) and reply
        assert cached[len(history) > 0] == fed  # the earlier turns, but for the last token sampled
        history, fed = prompt.tolist() + reply + tok.end_of_turn(), y.shape[1] - 1


def test_the_decode_rows_that_pick_the_int4_kernel():
    """int4 layers load for the rows of the decode steps (kernels.use_kernels): the batch size, k + 1 for a speculative
    target, and one for a server, whose batches vary."""
    import serve

    assert generate.decode_rows(generate.parse_args(["--batch_size", "8"])) == 8
    assert generate.decode_rows(generate.parse_args(["--speculate", "ngram", "--speculate_k", "3"])) == 4
    assert generate.decode_rows(serve.parse_args(["--max_batch_size", "8"])) == 1
    # batch 4 on tinygemm, 8 on ours: tests/test_gpu.py checks both on a GPU
    assert 2 <= 4 <= kernels.TINYGEMM_MAX_ROWS < 8
