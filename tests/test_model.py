import json

import pytest
import torch
from conftest import full_logits, random_transformer, rel_err, run_in_triton_interpreter, tiny_args
from convert_hf_checkpoint import convert_state_dict

from generate import run_layer_once
from model import ModelArgs, Transformer

HF_CONFIGS = {
    "llama2": dict(model_type="llama", num_key_value_heads=4),
    "gqa": dict(model_type="llama", num_key_value_heads=2),
    "llama3.1-rope-scaling": dict(
        model_type="llama",
        num_key_value_heads=2,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
    "mistral": dict(model_type="mistral", num_key_value_heads=2, sliding_window=None),
    "tied-embeddings": dict(model_type="llama", num_key_value_heads=2, tie_word_embeddings=True),
}


def hf_model(kind: str, seed: int = 0):
    """A tiny transformers model with random weights (the independent reference)."""
    import transformers

    extra = dict(HF_CONFIGS.get(kind, {}))
    model_type = extra.pop("model_type", "mixtral")
    cls_config, cls_model = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM),
    }[model_type]
    cfg = cls_config(
        vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
        max_position_embeddings=256, rms_norm_eps=1e-5, **extra,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = cls_model(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)  # the default all-ones norms would hide a mix-up of the two norms
            elif "embed" not in name:
                p.normal_(0.0, 0.05)
    return model, json.loads(cfg.to_json_string())


def ours_from_hf(model, cfg_dict) -> Transformer:
    args = ModelArgs.from_hf_config(cfg_dict)
    ours = Transformer(args)
    ours.load_state_dict(convert_state_dict(model.state_dict().items(), args), strict=not args.tie_embeddings)
    if args.tie_embeddings:
        ours.output.weight = ours.tok_embeddings.weight
    return ours.eval()


@pytest.mark.parametrize("kind", [*HF_CONFIGS, "mixtral"])
def test_logits_match_transformers(kind):
    hf, cfg = hf_model(kind)
    ours = ours_from_hf(hf, cfg)
    idx = torch.randint(
        0, 320, (2, 200), generator=torch.Generator().manual_seed(1)
    )  # 200 > 64: past the llama3 rope threshold
    with torch.no_grad():
        ref = hf(idx).logits
    assert rel_err(full_logits(ours, idx), ref) < 1e-4


def test_rope_scaling_changes_logits():
    """Guard for the test above: the Llama 3.1 scaling must matter at these lengths, or the test proves nothing."""
    hf, cfg = hf_model("llama3.1-rope-scaling")
    ours = ours_from_hf(hf, cfg)
    idx = torch.randint(0, 320, (1, 200), generator=torch.Generator().manual_seed(1))
    scaled = full_logits(ours, idx)
    ours.config.rope_scaling = None
    ours.max_seq_length = -1  # rebuild the RoPE table without scaling
    assert rel_err(full_logits(ours, idx), scaled) > 1e-3


@pytest.mark.parametrize("overrides", [{}, dict(num_experts=4, num_activated_experts=2)], ids=["llama", "moe"])
def test_kv_cache_decode_equals_full_forward(overrides):
    model = random_transformer(tiny_args(**overrides))
    idx = torch.randint(0, 32000, (2, 40), generator=torch.Generator().manual_seed(0))  # batch 2
    full = full_logits(model, idx)
    model.setup_caches(2, 64)
    with torch.no_grad():
        steps = [model(idx[:, :24], torch.arange(24), prefill=True)]  # prefill (causal path), then one token at a time
        steps += [model(idx[:, i : i + 1], torch.tensor([i])) for i in range(24, 40)]
    assert rel_err(torch.cat(steps, dim=1), full) < 1e-5


@pytest.mark.parametrize(
    "name, field, value",
    [
        ("meta-llama/Llama-2-7b-chat-hf", "n_layer", 32),
        ("codellama/CodeLlama-7b-Instruct-hf", "rope_base", 1e6),
        ("mistralai/Mistral-7B-Instruct-v0.2", "n_local_heads", 8),
        ("meta-llama/Meta-Llama-3.1-8B-Instruct", "block_size", 131072),
        ("meta-llama/Meta-Llama-3-70B", "vocab_size", 128256),
        ("stories15M", "dim", 288),
        ("Mixtral-8x7B-v0.1", "num_experts", 8),
    ],
)
def test_named_configs(name, field, value):
    assert getattr(ModelArgs.from_name(name), field) == value


def test_unknown_model_name_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown model name 'gpt2'"):
        ModelArgs.from_name("gpt2")


def test_config_json_beside_checkpoint_wins_over_folder_name(tmp_path):
    folder = tmp_path / "Llama-2-7b"  # the name says 7B; the config says otherwise
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps(
            dict(
                model_type="llama",
                vocab_size=100,
                hidden_size=64,
                intermediate_size=96,
                num_hidden_layers=3,
                num_attention_heads=4,
            )
        )
    )
    args = ModelArgs.from_checkpoint(folder / "model.pth")
    assert (args.n_layer, args.dim, args.vocab_size) == (3, 64, 100)
    (folder / "model_config.json").write_text(json.dumps(dict(n_layer=5, dim=32, n_head=2, vocab_size=50)))
    assert ModelArgs.from_checkpoint(folder / "model.pth").n_layer == 5  # ours wins over HF's


def test_unsupported_hf_architecture_is_refused():
    with pytest.raises(ValueError, match="unsupported model_type 'qwen2'"):
        ModelArgs.from_hf_config(dict(model_type="qwen2"))


def test_sequence_past_block_size_is_refused():
    model = random_transformer(tiny_args(block_size=32))
    with pytest.raises(ValueError, match="exceeds the model's block_size=32"):
        model.setup_caches(1, 33)


def test_compile_layer_once_traces_one_layer_graph_and_matches_eager():
    model = random_transformer(tiny_args(n_layer=3))
    model.decode_layer = run_layer_once
    prompt, pos = torch.randint(3, 32000, (1, 6), generator=torch.Generator().manual_seed(0)), torch.arange(6)
    ref = full_logits(model, prompt)
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=record, fullgraph=True)(prompt, pos)
    calls = [n for n in graphs[0].graph.nodes if n.target is torch.ops.higher_order.invoke_subgraph]
    assert len(calls) == 3 and len({n.args[0].target for n in calls}) == 1  # three calls of one layer graph
    torch._dynamo.reset()
    with torch.no_grad():
        assert (
            rel_err(torch.compile(model, fullgraph=True)(prompt, pos), ref) < 1e-5
        )  # inductor, as generate.py compiles


def test_materialize_compiles_to_a_stored_buffer_without_a_copy():
    """generate.py's inductor settings lower materialize to "store it": the compiled SwiGLU calls no copy op."""
    from torch._inductor.utils import run_and_get_code

    import kernels as k
    from model import FeedForward

    ff = FeedForward(tiny_args())
    k.store_hidden(ff)
    x = torch.randn(1, 1, ff.w1.in_features)
    k.lower_materialize_to_a_buffer()
    torch._dynamo.reset()
    with (
        torch.no_grad(),
        torch._inductor.config.patch(force_disable_caches=True),
    ):  # a cached graph may predate the lowering
        out, code = run_and_get_code(torch.compile(ff, fullgraph=True), x)
        assert "gptfast.materialize" not in "".join(code) and rel_err(out, ff(x)) < 1e-6


ATTENTION_CHECK = """
import copy, torch, generate, kernels as k
from conftest import random_transformer, tiny_args
def rel(a, b): return float((a - b).norm() / b.norm())
torch.set_grad_enabled(False)
for kw in (dict(n_head=4, n_local_heads=4, dim=128), dict(n_head=8, n_local_heads=2, dim=256)):  # MHA, GQA
    plain = random_transformer(tiny_args(vocab_size=512, **kw))
    fast = copy.deepcopy(plain)
    assert k.use_decode_attention_kernel(fast, pdl=False)
    tokens = torch.randint(0, 512, (2, 40))
    for m in (plain, fast):
        m.setup_caches(2, 64)  # 64 cache rows: 2 (MHA) and 4 (GQA) ranges, some empty, combined by a second kernel
        m(tokens[:, :30], torch.arange(30), prefill=True)  # prefill: SDPA in both
    for i in range(30, 33):
        pos = torch.tensor([i])
        assert rel(fast(tokens[:, i : i + 1], pos), plain(tokens[:, i : i + 1], pos)) < 1e-5, (kw, i)
    for a, b in zip(fast.layers, plain.layers):  # the caches the kernel's path wrote (in PyTorch) and read
        assert rel(a.attention.kv_cache.k_cache, b.attention.kv_cache.k_cache) < 1e-6
        assert rel(a.attention.kv_cache.v_cache, b.attention.kv_cache.v_cache) < 1e-6
    fast.decode_layer = generate.run_layer_once  # as generate.py compiles the decode step
    step = torch.compile(lambda m, x, pos: m(x, pos), fullgraph=True)
    pos = torch.tensor([33])
    assert rel(step(fast, tokens[:, 33:34], pos), plain(tokens[:, 33:34], pos)) < 1e-5, kw
    assert rel(fast.layers[1].attention.kv_cache.k_cache, plain.layers[1].attention.kv_cache.k_cache) < 1e-6
head_48 = random_transformer(tiny_args(dim=96, n_head=2, n_local_heads=2))
assert not k.use_decode_attention_kernel(head_48, pdl=False)
print("ok")
"""


def test_decode_attention_kernel_matches_sdpa():
    """--attention_kernel's Triton decode step, in Triton's interpreter: logits and the KV caches of its path against
    the SDPA path, for MHA and GQA at batch 2, eager and compiled as generate.py compiles it."""
    pytest.importorskip("triton")
    run_in_triton_interpreter(ATTENTION_CHECK)


INT8_BATCH_CHECK = """
import copy, torch, generate, kernels as k
from conftest import random_transformer, tiny_args
from quantize import quantize_model
torch.set_grad_enabled(False)
B = 4
model = quantize_model(random_transformer(tiny_args(vocab_size=512, n_head=8, dim=256)), "int8").to(torch.bfloat16)
assert k.use_decode_attention_kernel(model, pdl=False)
tokens = torch.randint(0, 512, (B, 20))
model.setup_caches(B, 64)
model(tokens[:, :16], torch.arange(16), prefill=True)
eager = copy.deepcopy(model)
model.decode_layer = generate.run_layer_once
step = torch.compile(lambda m, x, pos: m(x, pos), fullgraph=True)
for i in range(16, 19):
    pos = torch.tensor([i])
    got, want = step(model, tokens[:, i : i + 1], pos), eager(tokens[:, i : i + 1], pos)
    assert got.shape == want.shape == (B, 1, 512), got.shape
    assert float((got - want).float().norm() / want.float().norm()) < 2e-2, i
print("ok")
"""


def test_compiled_int8_decode_with_the_attention_kernel_keeps_each_rows_shape():
    """`--kernels torch` with int8 weights at batch 8 crashed on the GPU: inductor's weight-only-int8 pattern, fed a
    view of a 2-D attention output, dropped the sequence dimension and wo's output broadcast across rows. In bf16 (the
    pattern's dtype) on the CPU, the compiled batch-4 step must give the eager step's logits."""
    pytest.importorskip("triton")
    run_in_triton_interpreter(INT8_BATCH_CHECK)


CUDA = pytest.param(
    "cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
)


@pytest.mark.parametrize("device", ["cpu", CUDA])
@torch.no_grad()
def test_a_compiled_int8_layer_of_many_rows_stays_off_atens_int8_matmul(device):
    """A long prompt's prefill (compiled, over 64 rows) on an int8 layer of the kernels' path. Written as gpt-fast's
    F.linear(x, w) * scales, inductor sends it to ATen's _weight_int8pack_mm, whose CUDA kernel computes each output
    on its own thread, far slower than cuBLAS for many rows. Its code must not call it, and its output must be the
    dequantized weights' matmul."""
    from torch._inductor.utils import run_and_get_code

    import kernels as k
    from quantize import WeightOnlyInt8Linear, quantize_int8

    torch.manual_seed(0)
    lin = WeightOnlyInt8Linear(256, 512).to(device)
    weight, scales = quantize_int8(torch.randn(512, 256, device=device))
    lin.weight.copy_(weight)
    lin.scales.copy_(scales)
    lin.__class__, lin.use_triton = k.Int8GemvLinear, True  # as use_triton_kernels makes it
    x = torch.randn(1, 100, 256, dtype=torch.bfloat16, device=device)
    torch._dynamo.reset()
    out, code = run_and_get_code(torch.compile(lin, dynamic=True, fullgraph=True), x)
    assert "_weight_int8pack_mm" not in "".join(code)
    assert rel_err(out.float(), x.float() @ (weight.float() * scales.float()[:, None]).T) < 1e-2
