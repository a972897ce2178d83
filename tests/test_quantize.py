import itertools
import weakref

import pytest
import torch
from conftest import full_logits, random_transformer, rel_err, run_in_triton_interpreter, save_checkpoint, tiny_args
from hypothesis import given, settings
from hypothesis import strategies as st

import kernels as k
import quantize as q
from generate import generate as gen
from generate import load_model, run_layer_once
from model import FeedForward, TransformerBlock

shapes = st.tuples(
    st.integers(1, 24), st.sampled_from([32, 64, 128, 256]), st.floats(1e-3, 1e3), st.integers(0, 2**31 - 1)
)


@settings(max_examples=40, deadline=None)
@given(shapes)
def test_int8_round_trip_within_half_a_step(case):
    n, k, scale, seed = case
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * scale
    codes, scales = q.quantize_int8(w)
    err = (codes.float() * scales[:, None] - w).abs()
    assert (err <= scales[:, None] / 2 * (1 + 1e-5)).all()


@settings(max_examples=40, deadline=None)
@given(shapes, st.sampled_from([32, 64, 128]))
def test_int4_round_trip_within_half_a_step(case, groupsize):
    n, k, scale, seed = case
    k = max(k, groupsize)
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * scale
    packed, sz = q.quantize_int4(w, groupsize)
    step = sz[..., 0].t().repeat_interleave(groupsize, dim=1)  # [N, K]
    err = (q.dequantize_int4(packed, sz, torch.float32) - w).abs()
    assert (err <= step / 2 * (1 + 1e-4) + 1e-6 * scale).all()


def test_int4_pack_unpack_is_exact():
    codes = torch.randint(0, 16, (7, 64), dtype=torch.int32)
    packed, _ = q.pack_int4(codes, torch.ones(7, 2), torch.zeros(7, 2))
    assert packed.dtype == torch.uint8 and packed.shape == (7, 32)
    assert torch.equal(q.unpack_int4(packed), codes)


def tinygemm_pack_reference(packed: torch.Tensor, inner_k_tiles: int) -> torch.Tensor:
    """torch's CUDA _convert_weight_to_int4pack, its index arithmetic written out as loops (the op needs a GPU)."""
    N, K = packed.shape[0], packed.shape[1] * 2
    out = torch.zeros(N // 8, K // (inner_k_tiles * 16), 32, inner_k_tiles // 2, dtype=torch.int64)
    for n_tile, k_tile, lane, inner in itertools.product(*(range(d) for d in out.shape)):
        base = (k_tile * inner_k_tiles + 2 * inner) * 8 + lane % 4  # bytes of k: 2 k-tiles of 16 codes per word
        v = [int(packed[n_tile * 8 + lane // 4, base + off]) for off in (0, 4, 8, 12)]
        out[n_tile, k_tile, lane, inner] = sum((b >> 4) << (4 * i) | (b & 15) << (16 + 4 * i) for i, b in enumerate(v))
    return (out - (out >= 2**31) * 2**32).to(torch.int32)


@pytest.mark.parametrize("inner_k_tiles", [2, 4, 8])
def test_int4_prefill_reads_codes_back_out_of_the_cuda_layout(inner_k_tiles):
    """Long prompts dequantize from torch's CUDA int4 layout (tinygemm re-reads the weights per 16 rows): the codes
    read back are the checkpoint's, and an 80-row input gives the reference layer's output."""
    w, x = torch.randn(16, 256), torch.randn(80, 256)
    layer = q.int4_layer(torch.nn.Linear(256, 16, bias=False), *q.quantize_int4(w, 32))
    layer.packed = tinygemm_pack_reference(layer.weight, inner_k_tiles)
    assert torch.equal(q.tinygemm_codes(layer.packed), q.unpack_int4(layer.weight).to(torch.uint8))
    ref = layer(x)  # "reference" kernel: plain PyTorch dequantize + matmul
    layer.kernel, layer.dequant_prefill = "tinygemm", True
    assert rel_err(layer(x), ref) < 1e-6


def test_cpu_int4_kernel_matches_the_reference():
    w, x = torch.randn(48, 256), torch.randn(5, 256)
    layer = q.int4_layer(torch.nn.Linear(256, 48, bias=False), *q.quantize_int4(w, 64))
    ref = layer(x)  # "reference" kernel: plain PyTorch dequantize + matmul
    q.prepare_for_device(layer, torch.device("cpu"))
    assert layer.kernel == "cpu"
    assert rel_err(layer(x), ref) < 1e-5


@torch.no_grad()
def test_cpu_int4_model_compiles_with_one_layer_graph_and_matches_eager():
    """--compile's default on the CPU with int4 weights: inductor's own lowering of the CPU int4 matmul fails inside a
    layer region (torch 2.11-2.13), so the layers call it as an opaque op; the logits must be eager's."""
    model = q.quantize_model(random_transformer(tiny_args(vocab_size=512)), "int4", 32)
    q.prepare_for_device(model, torch.device("cpu"))
    model.setup_caches(1, 16)
    model.decode_layer = run_layer_once
    tokens, pos = torch.randint(0, 512, (1, 1)), torch.tensor([3])
    ref = model(tokens, pos)
    assert rel_err(torch.compile(model, fullgraph=True)(tokens, pos), ref) < 1e-5


TRITON_CHECK = """
import torch, kernels as k, quantize as q
from torch.nn.functional import linear, silu
def rel(a, b): return float((a - b).norm() / b.norm())
torch.manual_seed(0)
tile = dict(BLOCK_N=8, BLOCK_K=128)
for M, N, K in [(1, 37, 320), (3, 24, 512), (8, 16, 256)]:  # ragged N and K
    w, w3, x = torch.randn(N, K), torch.randn(N, K), torch.randn(M, K)
    (c, s), (c3, s3) = q.quantize_int8(w), q.quantize_int8(w3)
    ref, ref3 = linear(x, c.float()) * s, linear(x, c3.float()) * s3
    assert rel(k.gemv(x, c, s, **tile), ref) < 1e-5, (M, N, K)
    y = k.gemv(x, torch.cat([c, c3]), torch.cat([s, s3]), gated=True, **tile)
    assert rel(y, silu(ref) * ref3) < 1e-5, ("gated", M, N, K)
    assert rel(k.gemv(x, w, **tile), x @ w.t()) < 1e-6, ("float", M, N, K)  # float weights: no conversion, no scales
    y = k.gemv(x, torch.cat([w, w3]), gated=True, **tile)
    assert rel(y, silu(x @ w.t()) * (x @ w3.t())) < 1e-5, ("float gated", M, N, K)
codes = torch.arange(-128, 128, dtype=torch.int8).view(2, 128)  # every int8 value, each read back exactly
assert torch.equal(k.gemv(torch.eye(128), codes, torch.ones(2), BLOCK_N=2, BLOCK_K=128), codes.t().float())
print("ok")
"""


def test_triton_int8_and_float_gemv_match_the_plain_pytorch_fallback():
    """The CUDA fast path for int8 and float weights, plain and gated, run by Triton's interpreter on the CPU, against
    the reference."""
    pytest.importorskip("triton")
    run_in_triton_interpreter(TRITON_CHECK)


def test_int4_gemv_layout_round_trips_and_places_code_i_at_bit_4i_plus_3():
    codes = torch.randint(0, 16, (5, 96), dtype=torch.int32)
    packed, _ = q.pack_int4(codes, torch.ones(5, 3), torch.zeros(5, 3))
    words = k.pack_int4_gemv(packed)
    assert words.dtype == torch.int32 and words.shape == (5, 12)
    assert torch.equal(k.unpack_int4_gemv(words).int(), codes)
    one = torch.zeros(1, 32, dtype=torch.int32)
    one[0, 4 * 7 + 2] = 15  # k = 4 i + j: code 7 of word 2, at bits 31, 0, 1, 2 (it wraps round)
    word = int(k.pack_int4_gemv(q.pack_int4(one, torch.ones(1, 1), torch.zeros(1, 1))[0])[0, 2]) & 0xFFFFFFFF
    assert word == 0x80000007


MATMUL_CHECK = """
import torch, kernels as k, quantize as q
def rel(a, b): return float((a - b).norm() / b.norm())
torch.manual_seed(0)
tile = dict(BLOCK_N=16, BLOCK_K=128)
for M, N, K, G in [(2, 37, 320, 32), (5, 24, 512, 64), (17, 16, 256, 128), (70, 24, 320, 32)]:  # ragged; 64-row blocks
    w, x = torch.randn(2 * N, K), torch.randn(M, K).half()  # fp16: the interpreter's bf16 dot is wrong
    ref = lambda wf: x.float() @ wf.t()  # noqa: E731
    assert rel(k.dequant_matmul(x, w.half(), **tile).float(), ref(w.half().float())) < 1e-3, ("float", M)
    c, s = q.quantize_int8(w)
    assert rel(k.dequant_matmul(x, c, s.half(), **tile).float(), ref(c.float() * s.half().float()[:, None])) < 1e-3
    packed, sz = q.quantize_int4(w, G)
    sz = sz.to(torch.bfloat16)
    wf = q.dequantize_int4(packed, sz, torch.float32)
    y = k.dequant_matmul(x, k.pack_int4_gemv(packed)[:N], sz[:, :N], G, **tile)  # w1 of a gated pair: strided scales
    assert rel(y.float(), ref(wf[:N])) < 1e-3, ("int4", M, N, K, G)
print("ok")
"""


def test_triton_dequant_matmul_matches_the_plain_pytorch_reference():
    """The batched-decode kernel (a few rows, each weight tile dequantized once) for float, int8 and int4 weights, in
    Triton's interpreter (fp16: its bf16 dot is wrong), against the dequantized matmul."""
    pytest.importorskip("triton")
    run_in_triton_interpreter(MATMUL_CHECK)


BATCHED_STEP_CHECK = """
import copy, torch, triton, generate, kernels as k, quantize as q
from conftest import random_transformer, tiny_args
one = [triton.Config({"BLOCK_N": 16, "BLOCK_K": 128})]
k.dequant_matmul_tuned = triton.autotune(one, key=["N"])(k.dequant_matmul_kernel)
k.Int4GemvLinear.max_rows = 8  # the eager 24-row prefill dequantizes rather than crawl through the interpreted GEMV
calls, matmul = [], k.dequant_matmul
k.dequant_matmul = lambda *a, **kw: calls.append(a[1].dtype) or matmul(*a, **kw)  # the op's body looks it up here
def rel(a, b): return float((a.float() - b.float()).norm() / b.float().norm())
torch.manual_seed(0)
torch.set_grad_enabled(False)
tokens = torch.randint(0, 64, (2, 16))
for kind in ("float", "int8", "int4"):
    plain = random_transformer(tiny_args(vocab_size=64))
    if kind != "float":
        plain = q.quantize_model(plain, kind, 32)
    plain = plain.half()
    for m in list(plain.modules()):
        if isinstance(m, q.WeightOnlyInt4Linear):
            k.to_int4_gemv(m, m.weight.device)
    fused = copy.deepcopy(plain)
    k.use_triton_kernels(fused, "auto", pdl=False)
    for m in (plain, fused):
        m.setup_caches(2, 32)
        m(tokens[:, :12], torch.arange(12), prefill=True)
    fused.decode_layer = generate.run_layer_once
    step = torch.compile(lambda m, x, pos: m(x, pos), fullgraph=True)
    pos = torch.tensor([12])
    a, b = step(fused, tokens[:, 12:13], pos), plain(tokens[:, 12:13], pos)
    assert rel(a, b) < 3e-3, (kind, rel(a, b))
    assert len(calls) == 4 * len(fused.layers) + 1, (kind, calls)  # wqkv, wo, [w1; w3], w2 per layer; the output
    calls.clear()
print("ok")
"""


def test_a_compiled_batched_decode_step_on_dequant_matmul_equals_the_plain_model():
    """Two rows of decode (fp16) through kernels="auto" for float, int8 and int4 weights, compiled as generate.py
    does (one layer region): w1 and w3 on dequant_matmul through their stacked tensor (two views of one buffer are
    not allowed into a compiled region), against the plain model."""
    pytest.importorskip("triton")
    run_in_triton_interpreter(BATCHED_STEP_CHECK)


TRITON_INT4_CHECK = """
import torch, triton, kernels as k, quantize as q
from conftest import prefill_then_decode, random_transformer, tiny_args
one = [triton.Config({"BLOCK_N": 4, "BLOCK_C": 32}, num_warps=1)]  # one config: the autotuner runs without benchmarking
k.int4_gemv_tuned = triton.autotune(one, key=["M", "N", "K"])(k.int4_gemv_kernel)
def rel(a, b): return float((a - b).norm() / b.norm())
torch.manual_seed(0)
shapes = [(1, 37, 320, 32, 1), (3, 10, 512, 64, 2), (2, 8, 256, 128, 1), (1, 5, 768, 256, 2)]  # ragged N, K
for M, N, K, G, warps in shapes:
    packed, sz = q.quantize_int4(torch.randn(2 * N, K), G)
    x, sz = torch.randn(M, K), sz.to(torch.bfloat16)  # the kernel reads the scales as bf16, as on the GPU
    ref = torch.nn.functional.linear(x, q.dequantize_int4(packed, sz, torch.float32))  # [M, 2N]
    words, tile = k.pack_int4_gemv(packed), dict(BLOCK_N=4, BLOCK_C=32 * warps, num_warps=warps)
    y = k.gemv(x, words[:N], sz[:, :N], G, **tile)  # w1 of a gated pair: a strided view of the scales
    assert rel(y, ref[:, :N]) < 2e-5, (M, N, K, G, rel(y, ref[:, :N]))
    y = k.gemv(x, words, sz, G, gated=True, **tile)  # silu(w1 x) * w3 x, w1 and w3 stacked
    gated = torch.nn.functional.silu(ref[:, :N]) * ref[:, N:]
    assert rel(y, gated) < 1e-4, ("gated", M, N, K, G, rel(y, gated))
codes = torch.stack([(torch.arange(32, dtype=torch.int32) % 16).roll(r) for r in range(16)])  # every code at every k
ones = torch.ones(16, 1)
packed, sz = q.pack_int4(codes, ones, 8 * ones)  # scale 1, zero 8: the weight is the code
y = k.gemv(torch.eye(32), k.pack_int4_gemv(packed), sz.to(torch.bfloat16), 32, BLOCK_N=4, BLOCK_C=32)
assert torch.equal(y, codes.t().float()), "every code read back exactly"
w = k.dequantize_int4_gemv(k.pack_int4_gemv(packed), sz.to(torch.bfloat16), 32, torch.float32)
assert torch.equal(w, codes.float()), "every code dequantized exactly"
for N, K, G in ((37, 320, 32), (10, 512, 64), (8, 256, 128), (5, 768, 256)):  # a long prompt's weights
    packed, sz = q.quantize_int4(torch.randn(2 * N, K), G)
    words, sz = k.pack_int4_gemv(packed), sz.to(torch.bfloat16)
    for rows, scales in ((words, sz), (words[N:], sz[:, N:])):  # both, and w3 of a gated pair: strided scales
        want = q.dequantize_codes(k.unpack_int4_gemv(rows), scales, torch.float32)
        assert torch.allclose(k.dequantize_int4_gemv(rows, scales, G, torch.float32), want, rtol=1e-6), (N, K, G)
model = q.quantize_model(random_transformer(tiny_args(vocab_size=64)), "int4", 32)
int4 = [m for m in model.modules() if isinstance(m, q.WeightOnlyInt4Linear)]
for m in int4:
    m.scales_and_zeros = m.scales_and_zeros.to(torch.bfloat16)  # as repack_int4 keeps them for the kernel
torch.set_grad_enabled(False)
tokens = torch.randint(0, 64, (1, 14))
ref = prefill_then_decode(model, tokens, 12)
for m in int4:  # what use_kernels does on CUDA
    k.to_int4_gemv(m, m.weight.device)
    m.weight = m.weight.new_empty(0)
k.use_triton_kernels(model, "auto", pdl=False)
assert all(type(layer.feed_forward) is k.GatedFeedForward for layer in model.layers)
k.Int4GemvLinear.max_rows = 8  # prefill dequantizes from the kernel's layout (the interpreter is slow)
for i, (a, b) in enumerate(zip(prefill_then_decode(model, tokens, 12), ref)):
    assert rel(a, b) < 1e-4, (i, rel(a, b))
print("ok")
"""


def test_triton_int4_gemv_matches_the_plain_pytorch_fallback():
    """The CUDA int4 kernels in Triton's interpreter: plain and gated (SwiGLU) against the dequantize-matmul reference
    (all group sizes, ragged shapes, every code value exactly), the long-prompt dequantization against the PyTorch
    one, then a quantized model's logits, prefill and decode, on the kernels and with prefill dequantized from their
    layout."""
    pytest.importorskip("triton")
    run_in_triton_interpreter(TRITON_INT4_CHECK)


FLOAT_CHECK = """
import torch, triton, kernels as k, quantize as q
from conftest import prefill_then_decode, random_transformer, tiny_args
k.int8_gemv_tuned = triton.autotune([triton.Config({"BLOCK_N": 8, "BLOCK_K": 128})], key=["N", "K"])(k.int8_gemv_kernel)
def rel(a, b): return float((a - b).norm() / b.norm())
torch.manual_seed(0)
model = random_transformer(tiny_args(vocab_size=512))
tokens = torch.randint(0, 512, (1, 14))
torch.set_grad_enabled(False)
ref = prefill_then_decode(model, tokens, 12)
k.use_triton_kernels(model, "gemv", pdl=False)  # wo and w2 alone (kernels="auto" fuses float blocks: FUSED_CHECK)
for b in model.layers:
    assert type(b.attention.wo) is k.FloatGemvLinear and type(b.feed_forward.w2) is k.FloatGemvLinear
    assert type(b.attention.wqkv) is torch.nn.Linear and type(b.feed_forward.w1) is torch.nn.Linear
assert type(model.output) is k.FloatGemvLinear
for i, (a, b) in enumerate(zip(prefill_then_decode(model, tokens, 12), ref)):  # prefill on F.linear, decode on the GEMV
    assert rel(a, b) < 1e-5, (i, rel(a, b))
print("ok")
"""


def test_float_wo_and_w2_decode_on_the_triton_gemv_as_on_f_linear():
    """bf16 models on CUDA with kernels="gemv": wo, w2 and the output layer become FloatGemvLinear (inductor's
    reductions read them below 90%); in Triton's interpreter a float model's logits on them against the plain
    model's."""
    pytest.importorskip("triton")
    run_in_triton_interpreter(FLOAT_CHECK)


FUSED_CHECK = """
import copy, torch, triton, generate, kernels as k, quantize as q
from torch.nn.functional import linear, silu
from conftest import random_transformer, tiny_args
one = [triton.Config({"BLOCK_N": 8, "BLOCK_K": 128})]  # one config each: the autotuners run without benchmarking
k.int8_gemv_tuned = triton.autotune(one, key=["N"])(k.int8_gemv_kernel)
k.int8_gated_gemv_tuned = triton.autotune(one, key=["N"])(k.int8_gated_gemv_kernel)
one4 = [triton.Config({"BLOCK_N": 4, "BLOCK_C": 32}, num_warps=1)]
k.int4_gemv_tuned = triton.autotune(one4, key=["N"])(k.int4_gemv_kernel)
def rel(a, b): return float((a - b).norm() / b.norm())
torch.manual_seed(0)
x, g, r = torch.randn(3, 320), torch.rand(320) + 0.5, torch.randn(3, 80)
xn = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * g
w = torch.randn(80, 320)  # [w1; w3] for the gated kernel
(c, s), (packed, sz) = q.quantize_int8(w), q.quantize_int4(w, 32)
sz = sz.to(torch.bfloat16)  # the int4 kernel reads the scales as bf16, as on the GPU
kinds = {"float": (w, None, 0, w), "int8": (c, s, 0, c.float() * s[:, None]),
         "int4": (k.pack_int4_gemv(packed), sz, 32, q.dequantize_int4(packed, sz, torch.float32))}
for kind, (wk, sk, G, wf) in kinds.items():  # norm on the way in, residual on the way out; gated with norm
    ref, tol = linear(xn, wf), 1e-4 if kind == "int4" else 1e-5  # [3, 80]; int4 subtracts its codes' offsets late
    assert rel(k.gemv(x, wk, sk, G, norm=g, eps=1e-5, residual=r), ref + r) < tol, kind
    assert rel(k.gemv(x, wk, sk, G, gated=True, norm=g, eps=1e-5), silu(ref[:, :40]) * ref[:, 40:]) < tol, kind
def int4_for_the_kernel(model):  # what use_kernels does on CUDA
    for m in list(model.modules()):
        if isinstance(m, q.WeightOnlyInt4Linear):
            k.to_int4_gemv(m, m.weight.device)
    return model
tokens = torch.randint(0, 64, (1, 16))
torch.set_grad_enabled(False)  # as generate() runs
k.Int4GemvLinear.max_rows = 8  # the 12-row prefill dequantizes rather than crawl through the interpreted kernel
for kind in ("float", "int8", "int4"):
    plain = random_transformer(tiny_args(vocab_size=64))  # a small output layer: the interpreter is slow
    plain = plain if kind == "float" else int4_for_the_kernel(q.quantize_model(plain, kind, 32))
    fused = copy.deepcopy(plain)
    k.use_triton_kernels(fused, "auto", pdl=False)
    assert all(type(b) is k.FusedBlock and type(b.feed_forward) is k.GatedFeedForward for b in fused.layers), kind
    for m in (plain, fused):
        m.setup_caches(1, 32)
        m(tokens[:, :12], torch.arange(12), prefill=True)  # 12 rows: the plain path
    for i in range(12, 15):  # decode: one row, the fused kernels
        pos = torch.tensor([i])
        assert rel(fused(tokens[:, i : i + 1], pos), plain(tokens[:, i : i + 1], pos)) < 1e-4, (kind, i)
    fused.decode_layer = generate.run_layer_once  # as generate.py compiles it: the op's fake function, one layer graph
    step = torch.compile(lambda m, x, pos: m(x, pos), fullgraph=True)
    pos = torch.tensor([15])
    assert rel(step(fused, tokens[:, 15:16], pos), plain(tokens[:, 15:16], pos)) < 1e-4, kind
print("ok")
"""


def test_fused_blocks_decode_as_the_plain_model():
    """Fused blocks (the default; int4 normalizes before its kernel), in Triton's interpreter: norms in the GEMV
    prologue and the residual adds in the epilogue against the reference, then decode logits (eager and compiled)
    against the plain model."""
    pytest.importorskip("triton")
    run_in_triton_interpreter(FUSED_CHECK)


def kernel_layer(lin: torch.nn.Linear, kind: str) -> torch.nn.Module:
    """lin as use_kernels leaves it on CUDA (float, int8, or int4 in the GEMV's layout)."""
    if kind == "float":
        return k.FloatGemvLinear(lin)
    if kind == "int8":
        qlin = q.WeightOnlyInt8Linear(lin.in_features, lin.out_features, torch.float32)
        qlin.weight, qlin.scales = q.quantize_int8(lin.weight.data)
        qlin.__class__ = k.Int8GemvLinear  # as use_triton_kernels does
        return qlin
    qlin = q.int4_layer(lin, *q.quantize_int4(lin.weight.data, 32))
    k.to_int4_gemv(qlin, qlin.weight.device)
    return qlin


@pytest.mark.parametrize("kind", ["float", "int8", "int4"])
def test_gated_feed_forward_keeps_one_copy_of_w1_w3_and_the_checkpoint_keys(kind):
    """The CUDA decode module: w1 and w3 (and their scales) become views of one stacked copy; prefill-sized inputs
    take the plain path."""
    ff = FeedForward(tiny_args(dim=64, intermediate_size=96))
    torch.nn.init.normal_(ff.w1.weight), torch.nn.init.normal_(ff.w3.weight)
    ff.w1, ff.w3 = kernel_layer(ff.w1, kind), kernel_layer(ff.w3, kind)
    x = torch.randn(2, 9, 64)  # 18 rows: above the GEMV limit
    with torch.no_grad():  # ref's autograd graph would hold the weights
        ref, keys = ff(x), set(ff.state_dict())
    separate = weakref.ref(getattr(ff.w1, ff.w1.kernel_tensors[0]))
    gated = k.GatedFeedForward(ff)
    assert separate() is None, (
        "the separate w1 is freed"
    )  # float: a cat with autograd on would keep it (+5.7 GB, 7B bf16)
    w_name, s_name, s_dim = gated.w1.kernel_tensors
    w1, w3 = getattr(gated.w1, w_name), getattr(gated.w3, w_name)
    assert w1.data_ptr() == gated.w13.data_ptr() and w3.data_ptr() == gated.w13[96:].data_ptr()
    if s_name:
        s3 = getattr(gated.w3, s_name)
        assert s3.data_ptr() == gated.s13.select(s_dim, 96).data_ptr() and s3.shape == getattr(gated.w1, s_name).shape
    assert set(gated.state_dict()) == keys
    assert torch.equal(gated(x), ref)


def test_kernel_modules_keep_tensor_parallels_all_reduce_hook():
    """use_triton_kernels swaps FeedForward for the gated module: under tensor parallel the FeedForward carries the
    all-reduce of its output as a forward hook, which the swap must keep (without it, ranks would not sum)."""
    pytest.importorskip("triton")
    model = q.quantize_model(random_transformer(tiny_args()), "int8")
    summed = []
    for layer in model.layers:
        layer.feed_forward.register_forward_hook(lambda _m, _i, out: summed.append(out.shape) or out)
    k.use_triton_kernels(model, "auto", pdl=False)
    assert all(type(layer.feed_forward) is k.GatedFeedForward for layer in model.layers)
    k.use_triton_kernels(model, "torch", pdl=False)  # the swapped modules stay; their plain paths run on the CPU
    model.setup_caches(1, 8)
    model(torch.randint(0, 64, (1, 4)), torch.arange(4))
    assert len(summed) == len(model.layers)


def test_default_kernels_fuse_blocks_but_never_under_tensor_parallel():
    """kernels="auto": float, int8 and int4 blocks fused (H100 +3.5%, +4.0%, +3.7%, README), the int4 ones with the norm
    before the kernel; a block with tensor parallel's all-reduce hooks keeps its plain structure and inductor's wqkv,
    w1 and w3."""
    pytest.importorskip("triton")
    float_model, int8_model = random_transformer(tiny_args()), q.quantize_model(random_transformer(tiny_args()), "int8")
    int4_model, tp_model = (
        q.quantize_model(random_transformer(tiny_args()), "int4", 32),
        random_transformer(tiny_args()),
    )
    for m in list(int4_model.modules()):  # as use_kernels leaves them on CUDA
        if isinstance(m, q.WeightOnlyInt4Linear):
            k.to_int4_gemv(m, m.weight.device)
    for layer in tp_model.layers:
        layer.attention.register_forward_hook(lambda _m, _i, out: out)
    for m in (float_model, int8_model, int4_model, tp_model):
        k.use_triton_kernels(m, "auto", pdl=False)
    assert all(type(b) is k.FusedBlock for b in float_model.layers + int8_model.layers + int4_model.layers)
    assert (
        not int4_model.layers[0].attention.wqkv.norm_in_kernel and float_model.layers[0].attention.wqkv.norm_in_kernel
    )
    assert all(type(b) is TransformerBlock and type(b.attention.wqkv) is torch.nn.Linear for b in tp_model.layers)
    assert (
        all(type(b.attention.wo) is k.FloatGemvLinear for b in tp_model.layers)
        and type(tp_model.output) is k.FloatGemvLinear
    )


def test_gemv_ops_trace_with_the_output_shape_of_the_kernels():
    """torch.compile traces the custom ops through their fake functions: a wrong shape there breaks every compiled
    run."""
    pytest.importorskip("triton")
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x, w, s = (
            torch.empty(3, 64, dtype=torch.bfloat16),
            torch.empty(40, 64, dtype=torch.int8),
            torch.empty(40, dtype=torch.bfloat16),
        )
        words, sz = (
            torch.empty(40, 8, dtype=torch.int32),
            torch.empty(2, 40, 2, dtype=torch.bfloat16),
        )  # int4, K = 64, g32
        for pdl in (False, True):
            for weights in ((w, s, 0), (w.to(torch.bfloat16), None, 0), (words, sz, 32)):
                assert k.gemv_op(x, *weights, pdl).shape == (3, 40)
                y = k.gemv_op(x, *weights, pdl, True, x[0], 1e-5)  # gated, with a norm
                assert y.shape == (3, 20) and y.dtype == torch.bfloat16


def test_unknown_kernels_choice_is_a_clear_error():
    with pytest.raises(ValueError, match="kernels='gated': use auto, gemv or torch"):
        k.use_kernels(FeedForward(tiny_args()), torch.device("cpu"), "gated")


@pytest.fixture(scope="module")
def model_pair():
    args = tiny_args(dim=256, n_head=4, intermediate_size=512, n_layer=2, vocab_size=1000)
    return args, random_transformer(args, seed=0)


@pytest.mark.parametrize("mode, groupsize, bound", [("int8", 32, 0.012), ("int4", 32, 0.10), ("int4", 128, 0.13)])
def test_quantized_linear_error_matches_its_step_size(mode, groupsize, bound):
    """Rounding noise is uniform in +-step/2, std step/sqrt(12). For Gaussian weights the int8 step is
    ~3.5 sigma / 127 (row max over 256) -> 0.8% of the output; the int4 step is ~4 sigma / 15 (group range)
    -> 7.7% for g32, ~9.5% for g128. The bounds allow ~30% over these."""
    w, x = torch.randn(512, 256), torch.randn(64, 256)
    lin = torch.nn.Linear(256, 512, bias=False)
    lin.weight.data = w
    qlin = q.quantize_model(torch.nn.Sequential(lin), mode, groupsize)[0]
    err = rel_err(qlin(x), x @ w.t())
    assert bound / 4 < err < bound


@pytest.mark.parametrize("mode, groupsize, bound", [("int8", 32, 0.05), ("int4", 32, 0.4), ("int4", 128, 0.5)])
def test_quantized_model_logits_stay_close(model_pair, mode, groupsize, bound):
    """About 3x the per-layer noise above: 2 blocks of 5 quantized matmuls, plus the output layer."""
    args, model = model_pair
    idx = torch.randint(0, 1000, (1, 48), generator=torch.Generator().manual_seed(0))
    ref = full_logits(model, idx)
    qlogits = full_logits(q.quantize_model(random_transformer(args, seed=0), mode, groupsize, "cpu"), idx)
    assert 1e-3 < rel_err(qlogits, ref) < bound
    if mode == "int8":
        assert (qlogits.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


def test_quantized_checkpoints_load_by_content_and_match(model_pair, tmp_path):
    args, model = model_pair
    path = save_checkpoint(model, tmp_path)
    idx = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(1))
    for mode in ("int8", "int4"):
        q.main(["--checkpoint_path", str(path), "--mode", mode, "--groupsize", "64", "--device", "cpu"])
        out = q.output_path(path, mode, 64)
        assert out.name == ("model_int8.pth" if mode == "int8" else "model_int4.g64.pth")
        renamed = out.rename(tmp_path / f"renamed_{mode}.pth")  # recognised from the tensors, not the name
        loaded = load_model(renamed, "cpu", torch.float32)
        kinds = {type(m).__name__ for m in loaded.modules()}
        assert ("WeightOnlyInt8Linear" if mode == "int8" else "WeightOnlyInt4Linear") in kinds
        ref = q.quantize_model(random_transformer(args, seed=0), mode, 64, "cpu")
        assert rel_err(full_logits(loaded, idx), full_logits(ref, idx)) < 1e-2  # bf16 scales on disk


def test_mixtral_int8_experts(tmp_path):
    args = tiny_args(num_experts=4, num_activated_experts=2, vocab_size=500)
    model = random_transformer(args, seed=2)
    idx = torch.randint(0, 500, (1, 20), generator=torch.Generator().manual_seed(0))
    ref = full_logits(model, idx)
    qm = q.quantize_model(random_transformer(args, seed=2), "int8", device="cpu")
    assert isinstance(qm.layers[0].block_sparse_moe.cond_ffn, q.ConditionalFeedForwardInt8)
    assert 1e-4 < rel_err(full_logits(qm, idx), ref) < 0.02


def test_gptq_beats_round_to_nearest_on_correlated_inputs():
    torch.manual_seed(0)
    K, N = 256, 64
    mix = torch.randn(K, K) / K**0.5 + torch.eye(K)  # correlated features, as in real activations
    X = torch.randn(2048, K) @ mix
    W = torch.randn(N, K)
    H = 2 * X.t() @ X / X.shape[0]
    err = {}
    for name, (packed, sz) in {"rtn": q.quantize_int4(W, 32), "gptq": q.gptq_quantize(W, H, 32)}.items():
        err[name] = rel_err(X @ q.dequantize_int4(packed, sz, torch.float32).t(), X @ W.t())
    assert err["gptq"] < 0.8 * err["rtn"], err


def test_gptq_quantizes_a_whole_model(model_pair):
    args, model = model_pair
    calib = torch.randint(0, 1000, (4, 64), generator=torch.Generator().manual_seed(3))
    idx = torch.randint(0, 1000, (1, 48), generator=torch.Generator().manual_seed(0))
    qm = q.quantize_model(random_transformer(args, seed=0), "int4-gptq", 32, "cpu", gptq_inputs=calib)
    assert all(not isinstance(m, torch.nn.Linear) for m in qm.modules())
    assert 1e-3 < rel_err(full_logits(qm, idx), full_logits(model, idx)) < 0.4


def test_group_size_errors_and_notes(capsys):
    model = random_transformer(tiny_args(dim=96, n_head=4, intermediate_size=176), seed=0)
    with pytest.raises(ValueError, match="groupsize 48 is not one of"):
        q.quantize_model(model, "int4", 48)
    with pytest.raises(ValueError, match="groupsize 256 divides none of the layer widths"):
        q.quantize_model(model, "int4", 256)
    q.quantize_model(model, "int4", 32)  # 96 fits, 176 (w2 input) does not
    out = capsys.readouterr().out
    assert "note: 2 layers have input widths not a multiple of 32 (layers.0.feed_forward.w2: 176, ...)" in out
    assert isinstance(model.layers[0].feed_forward.w2, torch.nn.Linear)
    assert isinstance(model.layers[0].feed_forward.w1, q.WeightOnlyInt4Linear)


def test_old_device_packed_int4_checkpoint_is_a_clear_error(model_pair, tmp_path):
    args, model = model_pair
    sd = model.state_dict()
    w = sd.pop("layers.0.attention.wo.weight")
    sd["layers.0.attention.wo.weight"] = torch.zeros(w.shape[0] // 8, w.shape[1] // 256, 32, 4, dtype=torch.int32)
    sd["layers.0.attention.wo.scales_and_zeros"] = torch.zeros(w.shape[1] // 32, w.shape[0], 2)
    save_checkpoint(model, tmp_path)
    torch.save(sd, tmp_path / "model.pth")
    with pytest.raises(ValueError, match="re-run quantize.py on model.pth"):
        load_model(tmp_path / "model.pth", "cpu", torch.float32)


# ---------------------------------------------------------------- no command destroys a file


def file_bytes(path):
    return path.read_bytes() if path.exists() else None


def test_a_float_file_under_the_output_name_is_refused_not_overwritten(model_pair, tmp_path):
    """quantize.py --mode int8 on a float model_int8.pth would write its output onto its own memory-mapped input."""
    args, model = model_pair
    path = save_checkpoint(model, tmp_path, "model_int8.pth")
    before = path.read_bytes()
    with pytest.raises(SystemExit, match="would overwrite the input"):
        q.main(["--checkpoint_path", str(path), "--mode", "int8", "--device", "cpu"])
    assert path.read_bytes() == before


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_a_quantized_input_is_refused_up_front(model_pair, tmp_path, mode):
    args, model = model_pair
    path = save_checkpoint(model, tmp_path)
    q.main(["--checkpoint_path", str(path), "--mode", "int8", "--device", "cpu"])
    int8 = tmp_path / "model_int8.pth"
    before = int8.read_bytes()
    with pytest.raises(SystemExit, match="is already quantized"):
        q.main(["--checkpoint_path", str(int8), "--mode", mode, "--groupsize", "32", "--device", "cpu"])
    assert int8.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pth", "model_config.json", "model_int8.pth"]


def test_an_interrupted_write_leaves_the_old_file_and_no_temporary(model_pair, tmp_path, monkeypatch):
    args, model = model_pair
    path = save_checkpoint(model, tmp_path)
    q.main(["--checkpoint_path", str(path), "--mode", "int8", "--device", "cpu"])
    out = tmp_path / "model_int8.pth"
    before = out.read_bytes()

    def save_half_then_stop(obj, f):
        f.write(before[: len(before) // 2])
        raise KeyboardInterrupt  # Ctrl-C, or a full disk, halfway through the write

    monkeypatch.setattr(torch, "save", save_half_then_stop)
    with pytest.raises(KeyboardInterrupt):
        q.main(["--checkpoint_path", str(path), "--mode", "int8", "--device", "cpu"])
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pth", "model_config.json", "model_int8.pth"]


def test_weights_the_quantizer_did_not_see_stop_the_save(model_pair, tmp_path, monkeypatch):
    """On CUDA the GEMV kernels' layers replace nn.Linear; a model with them swapped in must not be saved as int8."""
    args, model = model_pair
    path = save_checkpoint(model, tmp_path)
    load = q.load_checkpoint_model

    def load_with_kernel_layers(p):
        m = load(p)
        k.use_triton_kernels(m, "gemv", pdl=False)  # wo, w2 and output become FloatGemvLinear
        return m

    monkeypatch.setattr(q, "load_checkpoint_model", load_with_kernel_layers)
    with pytest.raises(SystemExit, match="weights were not quantized to int8"):
        q.main(["--checkpoint_path", str(path), "--mode", "int8", "--device", "cpu"])
    assert not (tmp_path / "model_int8.pth").exists()


def test_a_folder_as_checkpoint_path_names_the_file_to_pass(tmp_path):
    with pytest.raises(SystemExit, match="is a folder: pass the model file in it"):
        q.main(["--checkpoint_path", str(tmp_path), "--mode", "int8", "--device", "cpu"])


def test_the_demo_model_quantized_keeps_its_story(stories):
    """stories260K ties its output layer to the embedding; quantized, the output layer has weights of its own, which
    loading must not replace with the float embedding."""
    from conftest import STORY

    from tokenizer import get_tokenizer

    tok = get_tokenizer(stories.parent / "tokenizer.model")
    prompt = torch.tensor(tok.encode("Once upon a time"), dtype=torch.int)
    for mode in ("int8", "int4"):
        q.main(["--checkpoint_path", str(stories), "--mode", mode, "--device", "cpu"])
        model = load_model(q.output_path(stories, mode, 32), "cpu", torch.float32)
        assert model.output.weight is not model.tok_embeddings.weight
        y, _ = gen(model, prompt, 40, temperature=0)
        text = tok.decode(y[0].tolist())
        assert text.startswith(STORY[:60]) if mode == "int8" else text.startswith("Once upon a time, there was a")
