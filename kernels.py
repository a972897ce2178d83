"""The fast path: our Triton kernels, their custom ops, and use_kernels, which swaps the model's modules for them.

model.py and quantize.py are plain PyTorch and run anywhere. After loading (and tensor-parallel sharding), on a
CUDA GPU, use_kernels gives batch-1 decode steps our Triton GEMVs: float, int8 and int4 weights, w1 and w3 as one
gated kernel, the RMSNorms and residual adds inside the GEMVs (FusedBlock); batched steps (2 to 64 rows) run on
dequant_matmul, which dequantizes each weight tile once for all rows (int4 at 2 to TINYGEMM_MAX_ROWS rows: torch's
tinygemm); use_decode_attention_kernel runs a decode step's attention as one kernel. Each kernel sits next to the
PyTorch it must equal (the tests compare them).
"""

import copy
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from model import Attention, ConditionalFeedForward, FeedForward, Transformer, TransformerBlock
from quantize import (
    DEQUANT_MIN_ROWS,
    WeightOnlyInt4Linear,
    WeightOnlyInt8Linear,
    dequantize_codes,
    int4_fits,
    set_module,
    unpack_int4,
)

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the plain path
    triton = None

GEMV_MAX_ROWS = 1  # one row (decode at batch 1) takes the GEMV kernels; from 2 rows dequant_matmul is as fast or faster
MATMUL_MAX_ROWS = 64  # up to this many rows (batched decode, speculative verify) take dequant_matmul
FLOAT_MATMUL_MAX_ROWS = 32  # float weights: from 64 rows cuBLAS is as fast or faster
TINYGEMM_MAX_ROWS = 4  # int4 decode steps of 2 to this many rows: torch's tinygemm is faster than dequant_matmul


# ---------------------------------------------------------------- the int4 GEMV's weight layout


def int4_gemv_shift(i: int) -> int:
    """Bit position of code i in a word of the Triton int4 GEMV's layout: 4 i + 3, mod 32 (code 7 wraps round)."""
    return (4 * i + 3) % 32


def pack_int4_gemv(packed: Tensor) -> Tensor:
    """Checkpoint codes uint8 [N, K/2] -> the Triton int4 GEMV's int32 [N, K/8]: word j of each 32-wide chunk of k
    holds the codes of k = 4 i + j (i = 0..7) at bits int4_gemv_shift(i). Needs K % 32 == 0."""
    q = unpack_int4(packed)
    N, K = q.shape
    q = q.view(N, K // 32, 8, 4)  # [N, chunk, i, j]
    words = torch.zeros(N, K // 32, 4, dtype=torch.int64, device=q.device)
    for i in range(8):
        words |= q[:, :, i].to(torch.int64) << int4_gemv_shift(i)
    words = (words | (words >> 32)) & 0xFFFFFFFF  # code 7's top bits, above bit 31, wrap round to bits 0-2
    return (words - (words >> 31 << 32)).to(torch.int32).view(N, K // 8)  # uint32 bits as int32


def unpack_int4_gemv(words: Tensor) -> Tensor:
    """The Triton int4 GEMV's int32 [N, K/8] -> codes uint8 [N, K] (prefill reads the weights back out of it)."""
    N, W = words.shape
    w = words.view(N, W // 4, 4)
    q = torch.empty(N, W // 4, 8, 4, dtype=torch.uint8, device=words.device)  # [N, chunk, i, j]
    for i in range(7):
        q[:, :, i] = (w >> int4_gemv_shift(i)) & 15
    q[:, :, 7] = ((w >> 31) & 1) | ((w & 7) << 1)  # code 7: bit 31, then bits 0-2
    return q.view(N, 8 * W)


# ---------------------------------------------------------------- Triton GEMV kernels (decode: a few rows)

if triton is not None:

    @triton.jit
    def int8_to_float(w):
        """int8 w as float32 without the int-to-float conversion (1/4 of the FMA rate): w + 128 is the byte of w with
        its top bit flipped, and 0x4B000000 | (w + 128) are the bits of the float 2**23 + w + 128; so one XOR of the
        zero-extended byte and one subtraction (exact): fewer instructions per weight in the GEMV loop."""
        u = w.to(tl.uint8, bitcast=True).to(tl.int32)
        return (u ^ 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0  # 2**23 + 128

    @triton.jit
    def int4_scale_zero(sz):
        """An int4 group's (scale, zero) as float32, from their bf16 pair read as one int32: a bf16 is the high half
        of its float32."""
        return (sz << 16).to(tl.float32, bitcast=True), (sz & -65536).to(tl.float32, bitcast=True)

    @triton.jit
    def int4_code(w, i: tl.constexpr):
        """Code i of each int32 word of pack_int4_gemv's layout (bits int4_gemv_shift(i); code 7 wraps round)."""
        if i == 7:
            return ((w >> 31) & 1) | ((w & 7) << 1)
        return (w >> (4 * i + 3)) & 15

    @triton.jit
    def int4_weight(w, i: tl.constexpr, s, z):
        """The float32 weight (q - 8) * s + z of code i of each word; q - 8 exact, from the bits of 2**23 + q."""
        q = (int4_code(w, i) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0
        return q * s + z

    @triton.jit
    def int4_tile_in_k_order(w, s, z, dt: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """The weights [BLOCK_N, BLOCK_K] in dt of words w [BLOCK_N, BLOCK_K / 8] (one K block, scales s and zeros z
        per word), in k order: each word's 8 codes are written one by one (a kernel holds no lists) and interleaved."""
        d0, d1, d2, d3 = (int4_weight(w, 0, s, z).to(dt), int4_weight(w, 1, s, z).to(dt),
                          int4_weight(w, 2, s, z).to(dt), int4_weight(w, 3, s, z).to(dt))  # fmt: skip
        d4, d5, d6, d7 = (int4_weight(w, 4, s, z).to(dt), int4_weight(w, 5, s, z).to(dt),
                          int4_weight(w, 6, s, z).to(dt), int4_weight(w, 7, s, z).to(dt))  # fmt: skip
        # tl.join stacks on a new last axis: nested as below, its 8 entries are codes 0 to 7
        codes = tl.join(tl.join(tl.join(d0, d4), tl.join(d2, d6)), tl.join(tl.join(d1, d5), tl.join(d3, d7)))
        codes = tl.reshape(codes, [BLOCK_N, BLOCK_K // 32, 4, 8])  # word = 4 c + j, code i: k = 32 c + 4 i + j
        return tl.reshape(tl.permute(codes, [0, 1, 3, 2]), [BLOCK_N, BLOCK_K])

    @triton.jit
    def load_x(x_ptr, g_ptr, m, k, K, sq, NORM: tl.constexpr):
        """x[m, k] as float32; with NORM times the norm weight g[k], and x^2 summed into sq for the row's 1/rms."""
        x = tl.load(x_ptr + m * K + k, mask=k < K, other=0.0).to(tl.float32)
        if NORM:
            sq += x * x
            x *= tl.load(g_ptr + k, mask=k < K, other=0.0).to(tl.float32)
        return x, sq

    @triton.jit
    def int8_gemv_kernel(
        x_ptr, w_ptr, s_ptr, y_ptr, g_ptr, r_ptr, N, K, eps,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr, NORM: tl.constexpr, RESIDUAL: tl.constexpr,
    ):  # fmt: skip
        """y[m, n] = scales[n] * sum_k x[m, k] * w[n, k]; one program per (row m, BLOCK_N outputs). Float weights
        (float_gemv) take the same loop without the conversion and the scales.
        PDL: launched with programmatic dependent launch, so it waits here for the kernel before it to finish.
        NORM: x is RMS-normalized (weight g) first; 1/rms is one number per row, applied after the sum, so x is
        read once. RESIDUAL: y += r[m, n] as it is stored."""
        m, pid_n = tl.program_id(0), tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)  # reduced once at the end
        sq = tl.zeros([BLOCK_K], dtype=tl.float32)
        if PDL:
            tl.extra.cuda.gdc_wait()  # x is the previous kernel's output
        for k0 in range(0, K, BLOCK_K):
            k = k0 + offs_k
            w = tl.load(
                w_ptr + offs_n[:, None] * K + k[None, :], mask=(offs_n[:, None] < N) & (k[None, :] < K), other=0
            )
            x, sq = load_x(x_ptr, g_ptr, m, k, K, sq, NORM)
            if w_ptr.dtype.element_ty == tl.int8:
                acc += int8_to_float(w) * x[None, :]
            else:
                acc += w.to(tl.float32) * x[None, :]
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()  # the next kernel may start its launch while this one stores
        y = tl.sum(acc, axis=1)
        if w_ptr.dtype.element_ty == tl.int8:
            y *= tl.load(s_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
        if NORM:
            y *= tl.rsqrt(tl.sum(sq, axis=0) / K + eps)
        if RESIDUAL:
            y += tl.load(r_ptr + m * N + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
        tl.store(y_ptr + m * N + offs_n, y.to(y_ptr.dtype.element_ty), mask=offs_n < N)

    def tiles_within(configs, nargs, **kwargs):
        """Autotune only tiles no larger than the matrix (a wider tile masks the same work): a small model, such
        as the tests' demo model, then compiles a few configs rather than dozens."""
        n, k = triton.next_power_of_2(nargs["N"]), triton.next_power_of_2(nargs["K"])
        small = min(c.kwargs["BLOCK_N"] for c in configs), min(c.kwargs["BLOCK_K"] for c in configs)
        fit = [
            c for c in configs if c.kwargs["BLOCK_N"] <= max(n, small[0]) and c.kwargs["BLOCK_K"] <= max(k, small[1])
        ]
        return fit or configs

    _c8 = [
        triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w)
        for n in (2, 4, 8, 16, 32)
        for k in (256, 512, 1024, 2048)
        for w in (4, 8)
    ]
    int8_gemv_tuned = triton.autotune(
        [c for c in _c8 if c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"] <= 16384],
        key=["N", "K", "NORM"],
        prune_configs_by={"early_config_prune": tiles_within},
    )(int8_gemv_kernel)

    @triton.jit
    def int8_gated_gemv_kernel(
        x_ptr, w_ptr, s_ptr, y_ptr, g_ptr, r_ptr, N, K, eps,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr, NORM: tl.constexpr, RESIDUAL: tl.constexpr,
    ):  # fmt: skip
        """SwiGLU's first half: y[m, n] = silu(a) * b, where a and b are the GEMVs of rows n and N + n of
        w [2N, K] (w1 then w3; int8, or float without scales). One launch reads both matrices; no [M, 2N]
        intermediate is written. PDL and NORM as in int8_gemv_kernel; no RESIDUAL."""
        m, pid_n = tl.program_id(0), tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        acc_a = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        acc_b = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        sq = tl.zeros([BLOCK_K], dtype=tl.float32)
        if PDL:
            tl.extra.cuda.gdc_wait()
        for k0 in range(0, K, BLOCK_K):
            k = k0 + offs_k
            mask = (offs_n[:, None] < N) & (k[None, :] < K)
            rows = offs_n[:, None] * K + k[None, :]
            wa = tl.load(w_ptr + rows, mask=mask, other=0)
            wb = tl.load(w_ptr + N * K + rows, mask=mask, other=0)
            x, sq = load_x(x_ptr, g_ptr, m, k, K, sq, NORM)
            if w_ptr.dtype.element_ty == tl.int8:
                wa, wb = int8_to_float(wa), int8_to_float(wb)
            acc_a += wa.to(tl.float32) * x[None, :]
            acc_b += wb.to(tl.float32) * x[None, :]
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
        a, b = tl.sum(acc_a, axis=1), tl.sum(acc_b, axis=1)
        if w_ptr.dtype.element_ty == tl.int8:
            a *= tl.load(s_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
            b *= tl.load(s_ptr + N + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
        if NORM:
            inv_rms = tl.rsqrt(tl.sum(sq, axis=0) / K + eps)
            a, b = a * inv_rms, b * inv_rms
        tl.store(y_ptr + m * N + offs_n, (a * tl.sigmoid(a) * b).to(y_ptr.dtype.element_ty), mask=offs_n < N)

    _cg = [c for c in _c8 if c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"] <= 8192]  # two accumulators in registers
    int8_gated_gemv_tuned = triton.autotune(
        _cg, key=["N", "K", "NORM"], prune_configs_by={"early_config_prune": tiles_within}
    )(int8_gated_gemv_kernel)

    @triton.jit
    def int4_pair_dot(part, w, r: tl.constexpr, x_hi, x_lo16, EXP):
        """part [BLOCK_C, BLOCK_N, 4] += the two codes that a rotation of w by 8 r bits brings to bits 19-22 and 15-18,
        as 1 + q/16 and 1 + q/256 (the mantissa of 1.0 OR'ed with them), times x and 16 x."""
        v = w
        if r > 0:
            v = (w << (8 * r)) | (w >> (32 - 8 * r))
        part += ((v & 0x00780000) | EXP).to(tl.float32, bitcast=True) * x_hi[:, None, :]
        return part + ((v & 0x00078000) | EXP).to(tl.float32, bitcast=True) * x_lo16[:, None, :]

    @triton.jit
    def int4_chunk_sum(part, sz, sum_hi, sum_lo):
        """A chunk's contribution to each row from its part and the chunk's sums of x over the hi and lo codes:
        sum x * q = 16 sum(part) - 16 sum_hi - 256 sum_lo, and w = (q - 8) * scale + zero (sz: bf16 pair as int32)."""
        s, z = int4_scale_zero(sz)
        return s * (16.0 * tl.sum(part, axis=2) - (24.0 * sum_hi + 264.0 * sum_lo)) + z * (sum_hi + sum_lo)

    @triton.jit
    def int4_gemv_kernel(
        x_ptr, w_ptr, sz_ptr, y_ptr, g_ptr, r_ptr, M, N, K, SZ_STRIDE, EXP, eps, GROUP: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, PDL: tl.constexpr, GATED: tl.constexpr, NORM: tl.constexpr,
        RESIDUAL: tl.constexpr,
    ):  # fmt: skip
        """y[m, n] = sum_k x[m, k] * ((q[n, k] - 8) * s[n, k // G] + z[n, k // G]), for the M rows of x in turn (the
        weights are re-read from L1); one program per BLOCK_N outputs, a thread per 32-wide chunk of k and BLOCK_N rows,
        so each x it loads serves BLOCK_N rows. GATED: SwiGLU's silu(w1 x) * w3 x, w1 and w3 being rows n and N + n.
        w: int32 [N, K/8] (pack_int4_gemv): word j of chunk c holds the codes of k = 32 c + 4 i + j, i = 0..7, so
        that code i of a chunk's 4 words meets 4 contiguous x. sz: the checkpoint's [K/G, N, 2] bf16 (scale, zero)
        pairs, read as int32 [K/G, N] whose rows are SZ_STRIDE apart (2 N for [w1; w3], or for a view of either).
        A code becomes a float without a conversion: moved to bits 19-22 (15-18) and OR'ed with EXP = 0x3F800000 it
        reads as 1 + q/16 (1 + q/256). Codes sit at bits 4i+3 (mod 32), so a rotation
        by 0, 8, 16 or 24 bits brings two of them there at once: 1 rotation, 2 LOP3 and 2 FMA per 2 weights.
        EXP is an argument so that AND and OR make one LOP3.
        PDL, NORM and RESIDUAL as in int8_gemv_kernel (no RESIDUAL when GATED). NORM's work per x is amortized over
        only BLOCK_N rows, which makes the loop much longer: FusedBlock normalizes before it instead."""
        pid_n = tl.program_id(0)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rows = offs_n < N
        cc, j = tl.arange(0, BLOCK_C), tl.arange(0, 4)
        if PDL:
            tl.extra.cuda.gdc_wait()  # x is the previous kernel's output
        for m in range(M):
            acc_a = tl.zeros([BLOCK_C, BLOCK_N], dtype=tl.float32)  # reduced once at the end
            acc_b = tl.zeros([BLOCK_C, BLOCK_N], dtype=tl.float32)
            sq = tl.zeros([BLOCK_C, 4], dtype=tl.float32)
            for c0 in range(0, K // 32, BLOCK_C):
                c = c0 + cc
                live = c < K // 32
                # [BLOCK_C, BLOCK_N, 4]
                w_off = offs_n[None, :, None] * (4 * (K // 32)) + 4 * c[:, None, None] + j[None, None, :]
                w_mask = rows[None, :, None] & live[:, None, None]
                sz_off, sz_mask = (
                    (c // (GROUP // 32))[:, None] * SZ_STRIDE + offs_n[None, :],
                    rows[None, :] & live[:, None],
                )
                wa = tl.load(w_ptr + w_off, mask=w_mask, other=0).to(tl.uint32, bitcast=True)
                sza = tl.load(sz_ptr + sz_off, mask=sz_mask, other=0)
                if GATED:
                    wb = tl.load(w_ptr + N * (K // 8) + w_off, mask=w_mask, other=0).to(tl.uint32, bitcast=True)
                    szb = tl.load(sz_ptr + N + sz_off, mask=sz_mask, other=0)
                part_a = tl.zeros([BLOCK_C, BLOCK_N, 4], dtype=tl.float32)
                part_b = tl.zeros([BLOCK_C, BLOCK_N, 4], dtype=tl.float32)
                sum_hi = tl.zeros([BLOCK_C, 4], dtype=tl.float32)
                sum_lo = tl.zeros([BLOCK_C, 4], dtype=tl.float32)
                k = 32 * c[:, None] + j[None, :]  # [BLOCK_C, 4]
                # rotated left by 8 r, codes (hi, lo) = (4, 3), (2, 1), (0, 7), (6, 5) sit at bits 19, 15
                for r in tl.static_range(4):
                    k_hi, k_lo = k + 4 * ((4 - 2 * r) % 8), k + 4 * ((11 - 2 * r) % 8)
                    x_hi = tl.load(x_ptr + m * K + k_hi, mask=live[:, None], other=0.0).to(tl.float32)
                    x_lo = tl.load(x_ptr + m * K + k_lo, mask=live[:, None], other=0.0).to(tl.float32)
                    if NORM:  # as load_x does; x is read here once per BLOCK_N rows
                        sq += x_hi * x_hi + x_lo * x_lo
                        x_hi *= tl.load(g_ptr + k_hi, mask=live[:, None], other=0.0).to(tl.float32)
                        x_lo *= tl.load(g_ptr + k_lo, mask=live[:, None], other=0.0).to(tl.float32)
                    sum_hi += x_hi
                    sum_lo += x_lo
                    part_a = int4_pair_dot(part_a, wa, r, x_hi, 16.0 * x_lo, EXP)
                    if GATED:
                        part_b = int4_pair_dot(part_b, wb, r, x_hi, 16.0 * x_lo, EXP)
                s_hi, s_lo = tl.sum(sum_hi, axis=1)[:, None], tl.sum(sum_lo, axis=1)[:, None]  # [BLOCK_C, 1]
                acc_a += int4_chunk_sum(part_a, sza, s_hi, s_lo)
                if GATED:
                    acc_b += int4_chunk_sum(part_b, szb, s_hi, s_lo)
            y = tl.sum(acc_a, axis=0)
            if NORM:
                inv_rms = tl.rsqrt(tl.sum(tl.sum(sq, axis=1), axis=0) / K + eps)
                y *= inv_rms
            if GATED:
                b = tl.sum(acc_b, axis=0)
                if NORM:
                    b *= inv_rms
                y = y * tl.sigmoid(y) * b
            if RESIDUAL:
                y += tl.load(r_ptr + m * N + offs_n, mask=rows, other=0.0).to(tl.float32)
            tl.store(y_ptr + m * N + offs_n, y.to(y_ptr.dtype.element_ty), mask=rows)
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()

    # 4 rows per thread (8 would pass the scales through shared memory); warps side by side along k
    _c4 = [triton.Config({"BLOCK_N": 4, "BLOCK_C": 32 * w}, num_warps=w) for w in (1, 2, 4, 8)]
    int4_gemv_tuned = triton.autotune(_c4, key=["M", "N", "K", "GROUP", "GATED", "NORM"])(int4_gemv_kernel)
    # One row (decode) takes a fixed tile: the autotuner times each tile alone with weights partly in L2, and its pick
    # varied between processes; on cold weights in a graph of a step's GEMVs, 2 warps was the best on every shape.
    INT4_DECODE_TILE = {"BLOCK_N": 4, "BLOCK_C": 64, "num_warps": 2}


def gemv(
    x: Tensor, w: Tensor, scales: Optional[Tensor] = None, groupsize: int = 0, pdl: bool = False, gated: bool = False,
    norm: Optional[Tensor] = None, eps: float = 0.0, residual: Optional[Tensor] = None, **config,
) -> Tensor:  # fmt: skip
    """Our Triton GEMVs: x [M, K] (M small) against w, by its dtype: float [N, K]; int8 [N, K] with scales [N]; or int4
    codes int32 [N, K/8] (pack_int4_gemv) with the checkpoint's scales_and_zeros [K/G, N, 2] (bf16) -> y [M, N].
    gated: w = [w1; w3] (scales likewise along N) -> silu(w1 x) * w3 x [M, N/2]. norm [K], eps: x RMS-normalized
    (weight norm) on the way in; residual [M, N]: added on the way out. pdl: launched with programmatic dependent
    launch (Hopper and later), as inductor launches its own kernels. config fixes the tile (tests), else autotuned
    (int4 with one row: INT4_DECODE_TILE)."""
    M, K = x.shape
    N = w.shape[0] // 2 if gated else w.shape[0]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    g, r = x if norm is None else norm, x if residual is None else residual  # unused pointers when not asked for
    flags = dict(PDL=pdl, NORM=norm is not None, RESIDUAL=residual is not None)
    launch = {"launch_pdl": True} if pdl else {}  # a launch option: not known to Triton's CPU interpreter
    if w.dtype == torch.int32:  # int4: one program per BLOCK_N outputs, the M rows in turn
        config = config or (INT4_DECODE_TILE if M == 1 else {})
        kernel = int4_gemv_kernel if config else int4_gemv_tuned
        sz = scales.view(torch.int32)  # may be a view (a gated module's w1): its row stride is an argument
        grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
        kernel[grid](
            x,
            w,
            sz,
            y,
            g,
            r,
            M,
            N,
            K,
            sz.stride(0),
            0x3F800000,
            eps,
            GROUP=groupsize,
            GATED=gated,
            **flags,
            **launch,
            **config,
        )
    else:  # int8 or float: one program per (row, BLOCK_N outputs)
        kernel = (
            (int8_gated_gemv_kernel if gated else int8_gemv_kernel)
            if config
            else (int8_gated_gemv_tuned if gated else int8_gemv_tuned)
        )
        s = w if scales is None else scales  # float weights: w stands in for the unused scales pointer
        kernel[lambda meta: (M, triton.cdiv(N, meta["BLOCK_N"]))](
            x, w, s, y, g, r, N, K, eps, **flags, **launch, **config
        )
    return y


if triton is not None:

    @torch.library.custom_op("gptfast::gemv", mutates_args=())
    def gemv_op(
        x: Tensor, w: Tensor, scales: Optional[Tensor], groupsize: int, pdl: bool, gated: bool = False,
        norm: Optional[Tensor] = None, eps: float = 0.0, residual: Optional[Tensor] = None,
    ) -> Tensor:  # fmt: skip
        """gemv as an opaque op: inductor places it in CUDA graphs without copies and launches it as we do, with PDL
        when asked (torch 2.11 launches the Triton kernels of a triton_op without it)."""
        return gemv(x, w, scales, groupsize, pdl, gated, norm, eps, residual)

    @gemv_op.register_fake
    def _(x, w, scales, groupsize, pdl, gated=False, norm=None, eps=0.0, residual=None):
        return x.new_empty(x.shape[0], w.shape[0] // 2 if gated else w.shape[0])


def decode_gemv(
    w: Tensor, scales: Optional[Tensor], groupsize: int, pdl: bool, x: Tensor, norm=None, residual=None, gated=False
) -> Tensor:
    """x [..., K] through gemv_op, shaped back to [..., N]; norm: an RMSNorm that the kernel applies to x."""
    rows = x.numel() // x.shape[-1]
    g, eps = (None, 0.0) if norm is None else (norm.weight, norm.eps)
    r = None if residual is None else residual.reshape(rows, -1)
    return gemv_op(x.reshape(rows, -1).contiguous(), w, scales, groupsize, pdl, gated, g, eps, r).view(
        *x.shape[:-1], -1
    )


# ---------------------------------------------------------------- Triton matmul (batched decode: 2 to 64 rows)

if triton is not None:
    # K a multiple of the block (every layer of the usual shapes): no k masks, so that loads are wide vectors
    @triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
    @triton.jit
    def dequant_matmul_kernel(
        x_ptr, w_ptr, s_ptr, y_ptr, M, N, K, W_STRIDE, SZ_STRIDE, GROUP: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr, EVEN_K: tl.constexpr,
    ):  # fmt: skip
        """y [M, N] = x [M, K] w^T where each weight tile is read and dequantized once for BLOCK_M rows of x and
        multiplied on the tensor cores (a GEMV reads or converts it once per row). Weights as gemv takes them:
        float [N, K]; int8 [N, K] with scales [N]; int4 int32 [N, K/8] with (scale, zero) as int32 [K/G, N], rows
        SZ_STRIDE apart; weight rows W_STRIDE apart. The tile is computed transposed, w x^T [BLOCK_N, BLOCK_M], so
        the dequantized w is the dot's register operand."""
        pid_n, pid_m = tl.program_id(0), tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        n_ok, m_ok = offs_n[:, None] < N, offs_m[None, :] < M
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        if PDL:
            tl.extra.cuda.gdc_wait()  # x is the previous kernel's output
        offs_k = tl.arange(0, BLOCK_K)
        if w_ptr.dtype.element_ty == tl.int32:  # int4: a word holds 8 codes
            words = tl.arange(0, BLOCK_K // 8)
            for k0 in range(0, K, BLOCK_K):
                word = k0 // 8 + words  # [BLOCK_K / 8]
                live = (word[None, :] < K // 8) | EVEN_K
                w = tl.load(w_ptr + offs_n[:, None] * W_STRIDE + word[None, :], mask=n_ok & live, other=0)
                sz_off = (word // (GROUP // 8))[None, :] * SZ_STRIDE + offs_n[:, None]
                sz = tl.load(s_ptr + sz_off, mask=n_ok & live, other=0)  # 0: q * 0 + 0 where masked
                s, z = int4_scale_zero(sz)
                if BLOCK_M >= 64:  # many rows: one dot; for a few its shuffle into k order costs more than 8 dots
                    k = k0 + offs_k
                    xt = tl.load(
                        x_ptr + offs_m[None, :] * K + k[:, None], mask=m_ok & ((k[:, None] < K) | EVEN_K), other=0.0
                    )
                    acc = tl.dot(int4_tile_in_k_order(w, s, z, x_ptr.dtype.element_ty, BLOCK_N, BLOCK_K), xt, acc)
                else:  # a dot per code i, over the block's k = 32 c + 4 i + j
                    k = 32 * (word // 4) + word % 4  # k of each word's code 0
                    for i in tl.static_range(8):
                        x_off = offs_m[None, :] * K + (k + 4 * i)[:, None]  # [BLOCK_K / 8, BLOCK_M]
                        xt = tl.load(x_ptr + x_off, mask=m_ok & ((word[:, None] < K // 8) | EVEN_K), other=0.0)
                        acc = tl.dot(int4_weight(w, i, s, z).to(x_ptr.dtype.element_ty), xt, acc)
        else:
            for k0 in range(0, K, BLOCK_K):
                k = k0 + offs_k
                k_ok = (k < K) | EVEN_K
                w = tl.load(w_ptr + offs_n[:, None] * W_STRIDE + k[None, :], mask=n_ok & k_ok[None, :], other=0)
                # int8 by a plain (exact) conversion: the GEMVs' int8_to_float measured slower in this loop
                xt = tl.load(x_ptr + offs_m[None, :] * K + k[:, None], mask=m_ok & k_ok[:, None], other=0.0)
                acc = tl.dot(w.to(x_ptr.dtype.element_ty), xt, acc)
            if w_ptr.dtype.element_ty == tl.int8:
                acc *= tl.load(s_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[:, None]
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
        tl.store(y_ptr + offs_m[None, :] * N + offs_n[:, None], acc.to(y_ptr.dtype.element_ty), mask=n_ok & m_ok)

    _cm = [
        triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=4, num_stages=4)
        for n in (16, 32, 64)
        for k in (128, 256, 512)
    ]
    # 4 warps on a 16- or 32-wide tile of a few rows also split the rows, each warp converting its own copy of the
    # weights: a warp per 16 weight rows converts each once
    _cm += [triton.Config({"BLOCK_N": n, "BLOCK_K": 256}, num_warps=n // 16, num_stages=4) for n in (16, 32)]
    dequant_matmul_tuned = triton.autotune(
        _cm, key=["M", "N", "K"], prune_configs_by={"early_config_prune": tiles_within}
    )(dequant_matmul_kernel)


def dequant_matmul(x: Tensor, w: Tensor, scales: Optional[Tensor] = None, groupsize: int = 0, pdl: bool = False,
                   **config) -> Tensor:  # fmt: skip
    """x [M, K] (bf16 or fp16) @ w^T on dequant_matmul_kernel, w and scales as gemv takes them -> y [M, N]. config
    fixes the tile (tests), else autotuned per shape."""
    M, K = x.shape
    N = w.shape[0]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    s = w if scales is None else (scales.view(torch.int32) if w.dtype == torch.int32 else scales)
    stride = s.stride(0) if w.dtype == torch.int32 else 0
    block_m = min(64, max(16, triton.next_power_of_2(M)))  # the dot's smallest side is 16
    launch = {"launch_pdl": True} if pdl else {}
    kernel = dequant_matmul_kernel if config else dequant_matmul_tuned
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(M, block_m))  # noqa: E731
    kernel[grid](
        x, w, s, y, M, N, K, w.stride(0), stride, GROUP=groupsize, BLOCK_M=block_m, PDL=pdl, **launch, **config
    )
    return y


if triton is not None:

    @torch.library.custom_op("gptfast::dequant_matmul", mutates_args=())
    def dequant_matmul_op(x: Tensor, w: Tensor, scales: Optional[Tensor], groupsize: int, pdl: bool) -> Tensor:
        """dequant_matmul as an opaque op, as gemv_op."""
        return dequant_matmul(x, w, scales, groupsize, pdl)

    @dequant_matmul_op.register_fake
    def _(x, w, scales, groupsize, pdl):
        return x.new_empty(x.shape[0], w.shape[0])


# ---------------------------------------------------------------- int4 weights for a long prompt's matmul

if triton is not None:

    @triton.jit
    def dequantize_int4_kernel(
        w_ptr, s_ptr, out_ptr, N, K, W_STRIDE, SZ_STRIDE,
        GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
    ):  # fmt: skip
        """out [N, K] = (q - 8) * scale + zero from the GEMV's layout (int32 words [N, K/8], rows W_STRIDE apart; scales
        as dequant_matmul reads them): each word read once; the 8 codes of each word are put back in k order in
        registers, so each thread stores 16 contiguous bytes at a time rather than runs of 4 weights 64 bytes apart."""
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        word = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
        ok = (offs_n[:, None] < N) & (word[None, :] < K // 8)
        w = tl.load(w_ptr + offs_n[:, None] * W_STRIDE + word[None, :], mask=ok, other=0)  # [BLOCK_N, BLOCK_W]
        sz = tl.load(s_ptr + (word // (GROUP // 8))[None, :] * SZ_STRIDE + offs_n[:, None], mask=ok, other=0)
        s, z = int4_scale_zero(sz)
        tile = int4_tile_in_k_order(w, s, z, out_ptr.dtype.element_ty, BLOCK_N, BLOCK_W * 8)  # [BLOCK_N, BLOCK_W * 8]
        k = tl.program_id(1) * BLOCK_W * 8 + tl.arange(0, BLOCK_W * 8)
        tl.store(out_ptr + offs_n[:, None] * K + k[None, :], tile, mask=(offs_n[:, None] < N) & (k[None, :] < K))


def dequantize_int4_gemv(words: Tensor, scales: Tensor, groupsize: int, dtype: torch.dtype) -> Tensor:
    """Int4GemvLinear's weights [N, K] in dtype, on dequantize_int4_kernel: for a prompt too long for dequant_matmul,
    where unpacking with PyTorch ops (unpack_int4_gemv, quantize.dequantize_codes) takes a pass over the weights per
    operation and would cost more than the matmul."""
    N, K = words.shape[0], words.shape[1] * 8
    out = torch.empty(N, K, dtype=dtype, device=words.device)
    s = scales.view(torch.int32)  # [K/g, N]: bf16 scale in the low half, zero in the high half
    grid = (triton.cdiv(N, 16), triton.cdiv(K // 8, 64))
    dequantize_int4_kernel[grid](words, s, out, N, K, words.stride(0), s.stride(0), GROUP=groupsize, BLOCK_N=16,
                                 BLOCK_W=64)  # fmt: skip
    return out


if triton is not None:

    @torch.library.custom_op("gptfast::dequantize_int4", mutates_args=())
    def dequantize_int4_op(words: Tensor, scales: Tensor, groupsize: int, dtype: torch.dtype) -> Tensor:
        """dequantize_int4_gemv as an opaque op, as gemv_op."""
        return dequantize_int4_gemv(words, scales, groupsize, dtype)

    @dequantize_int4_op.register_fake
    def _(words, scales, groupsize, dtype):
        return words.new_empty(words.shape[0], words.shape[1] * 8, dtype=dtype)


# ---------------------------------------------------------------- decode attention in one kernel

if triton is not None:

    @triton.jit
    def decode_attention_kernel(
        qkv_ptr, fc_ptr, pos_ptr, k_ptr, v_ptr, y_ptr, acc_ptr, ml_ptr, S_MAX, CHUNK, scale,
        H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, BLOCK_T: tl.constexpr, SPLITS: tl.constexpr,
        PDL: tl.constexpr,
    ):  # fmt: skip
        """One decode step of attention for batch row b, key/value head h and its G = H / HKV query heads, over
        cache positions [split * CHUNK, (split + 1) * CHUNK) up to pos (the caches [B, HKV, S_MAX, D] already hold
        this step's k and v): RoPE on the new q, then an online softmax(q K^T * scale) V, BLOCK_T positions at a time.
        qkv: [B, (H + 2 HKV) D] as wqkv returns it; fc: [D/2, 2] cos, sin at pos. One split writes y [B, H D];
        several write their unnormalized sums to acc [B, HKV, SPLITS, G, D] and (max, sum) to ml [..., G, 2]."""
        b, h, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        G: tl.constexpr = H // HKV
        half, d, g = tl.arange(0, D // 2), tl.arange(0, D), tl.arange(0, G)
        row = qkv_ptr + b * (H + 2 * HKV) * D
        cache = (b * HKV + h) * S_MAX * D  # this head's [S_MAX, D] block in either cache
        if PDL:
            tl.extra.cuda.gdc_wait()  # qkv, the cache rows and the RoPE row are earlier kernels' outputs
        pos = tl.load(pos_ptr)
        c, s = tl.load(fc_ptr + 2 * half).to(tl.float32), tl.load(fc_ptr + 2 * half + 1).to(tl.float32)
        q_even = row + (h * G + g[:, None]) * D + 2 * half[None, :]  # [G, D/2]: q's interleaved pairs (x0, x1)
        x0, x1 = tl.load(q_even).to(tl.float32), tl.load(q_even + 1).to(tl.float32)
        q = tl.reshape(tl.join(x0 * c[None, :] - x1 * s[None, :], x1 * c[None, :] + x0 * s[None, :]), [G, D])  # RoPE
        q = q.to(qkv_ptr.dtype.element_ty).to(tl.float32) * scale  # rounded to the model's dtype, as SDPA's input is
        m = tl.full([G], float("-inf"), tl.float32)
        l = tl.zeros([G], tl.float32)
        acc = tl.zeros([G, D], tl.float32)
        for t0 in range(split * CHUNK, tl.minimum((split + 1) * CHUNK, pos + 1), BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            rows = cache + t[:, None] * D + d[None, :]  # [BLOCK_T, D]
            kt = tl.load(k_ptr + rows, mask=t[:, None] <= pos, other=0.0).to(tl.float32)
            score = tl.sum(q[:, None, :] * kt[None, :, :], axis=2)  # [G, BLOCK_T]
            score = tl.where(t[None, :] <= pos, score, float("-inf"))
            m_new = tl.maximum(m, tl.max(score, axis=1))
            p = tl.exp(score - m_new[:, None])
            alpha = tl.exp(m - m_new)
            vt = tl.load(v_ptr + rows, mask=t[:, None] <= pos, other=0.0).to(tl.float32)
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * vt[None, :, :], axis=1)
            l, m = l * alpha + tl.sum(p, axis=1), m_new
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
        if SPLITS == 1:
            tl.store(
                y_ptr + b * H * D + (h * G + g[:, None]) * D + d[None, :], (acc / l[:, None]).to(y_ptr.dtype.element_ty)
            )
        else:  # an empty split (past pos) leaves m = -inf, l = 0, acc = 0: weight 0 when combined
            part = (b * HKV + h) * SPLITS + split
            tl.store(acc_ptr + (part * G + g[:, None]) * D + d[None, :], acc)
            tl.store(ml_ptr + (part * G + g) * 2, m)
            tl.store(ml_ptr + (part * G + g) * 2 + 1, l)

    @triton.jit
    def combine_splits_kernel(
        acc_ptr,
        ml_ptr,
        y_ptr,
        H: tl.constexpr,
        HKV: tl.constexpr,
        D: tl.constexpr,
        SPLITS: tl.constexpr,
        PDL: tl.constexpr,
    ):
        """y [B, H D] from the splits' partial sums: each split's share rescaled by exp(its max - the overall max)."""
        b, h = tl.program_id(0), tl.program_id(1)
        G: tl.constexpr = H // HKV
        sp, g, d = tl.arange(0, SPLITS), tl.arange(0, G), tl.arange(0, D)
        part = ((b * HKV + h) * SPLITS + sp[:, None]) * G + g[None, :]  # [SPLITS, G]
        if PDL:
            tl.extra.cuda.gdc_wait()
        m, l = tl.load(ml_ptr + part * 2), tl.load(ml_ptr + part * 2 + 1)
        w = tl.exp(m - tl.max(m, axis=0)[None, :])  # split 0 always holds position 0, so the max is finite
        acc = tl.sum(w[:, :, None] * tl.load(acc_ptr + part[:, :, None] * D + d[None, None, :]), axis=0)  # [G, D]
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
        y = acc / tl.sum(w * l, axis=0)[:, None]
        tl.store(y_ptr + b * H * D + (h * G + g[:, None]) * D + d[None, :], y.to(y_ptr.dtype.element_ty))

    @torch.library.custom_op("gptfast::decode_attention", mutates_args=())
    def decode_attention(
        qkv: Tensor, freqs: Tensor, input_pos: Tensor, k_cache: Tensor, v_cache: Tensor, n_head: int, pdl: bool
    ) -> Tensor:
        """qkv [B, (H + 2 HKV) D] of one new token per row at position input_pos [1], whose k and v the caches
        [B, HKV, S_MAX, D] hold already -> attention output [B, 1, H D]. Reads the caches only: torch.compile cannot
        functionalize a custom op that writes them inside the compiled layer region (torch 2.13).
        The cache is split into up to SPLITS ranges (flash-decoding) so that about two programs per SM run even when
        batch x key/value heads is small (Llama 3 8B at batch 1: 8); a second kernel combines them."""
        (_, HKV, S_MAX, D), B = k_cache.shape, qkv.shape[0]  # the caches may hold more batch rows than this step
        G = n_head // HKV
        block_t = max(8, 32 // G)  # q K^T as a [G, BLOCK_T, D] product: about 4K values, no register spills
        sms = torch.cuda.get_device_properties(qkv.device).multi_processor_count if qkv.is_cuda else 132
        splits = 1 << (min(triton.cdiv(S_MAX, block_t), max(1, 2 * sms // (B * HKV))).bit_length() - 1)  # a power of 2
        chunk = triton.cdiv(triton.cdiv(S_MAX, splits), block_t) * block_t
        # [B, 1, H D] made 3-D here: inductor's int8 pattern (`--kernels torch`) reshapes wo's output to its input's
        # leading dims, so a [B, H D] viewed as [B, 1, H D] came out [B, dim] and the residual broadcast to [B, B, dim]
        y = qkv.new_empty(B, 1, n_head * D)
        acc = torch.empty(B, HKV, splits, G, D, dtype=torch.float32, device=qkv.device) if splits > 1 else y
        ml = torch.empty(B, HKV, splits, G, 2, dtype=torch.float32, device=qkv.device) if splits > 1 else y
        launch = {"launch_pdl": True} if pdl else {}  # a launch option: not known to Triton's CPU interpreter
        decode_attention_kernel[(B, HKV, splits)](
            qkv, freqs, input_pos, k_cache, v_cache, y, acc, ml, S_MAX, chunk, D**-0.5,
            H=n_head, HKV=HKV, D=D, BLOCK_T=block_t, SPLITS=splits, PDL=pdl, **launch,
        )  # fmt: skip
        if splits > 1:
            combine_splits_kernel[(B, HKV)](acc, ml, y, H=n_head, HKV=HKV, D=D, SPLITS=splits, PDL=pdl, **launch)
        return y

    @decode_attention.register_fake
    def _(qkv, freqs, input_pos, k_cache, v_cache, n_head, pdl):
        return qkv.new_empty(qkv.shape[0], 1, n_head * k_cache.shape[-1])


class KernelAttention(Attention):
    """Attention whose one-token decode steps run on decode_attention (q's RoPE and softmax(q K^T) V in one launch,
    where inductor makes about 6); prefill and verify steps take the plain path. Made by use_decode_attention_kernel,
    which swaps the class of each Attention: the same weights and cache."""

    pdl = False

    def attend(self, qkv: Tensor, freqs_cis: Tensor, mask: Optional[Tensor], input_pos: Tensor) -> Tensor:
        B, S, _ = qkv.shape
        if S != 1 or mask is None or mask.shape[0] > 1:  # prefill, verify, or a left-padded batch: the plain path
            return super().attend(qkv, freqs_cis, mask, input_pos)
        _, _, _, k_all, v_all = self.write_cache(qkv, freqs_cis, input_pos)
        return decode_attention(qkv.view(B, -1), freqs_cis.view(-1, 2), input_pos, k_all, v_all, self.n_head, self.pdl)


def use_decode_attention_kernel(model: Transformer, pdl: bool) -> bool:
    """Give every layer KernelAttention; needs Triton, and power-of-two head size and query heads per key/value head."""
    attn = model.layers[0].attention  # heads per process under tensor parallel
    G, D = attn.n_head // attn.n_local_heads, attn.head_dim
    if triton is None or G & (G - 1) or D & (D - 1):
        return False
    for layer in model.layers:
        layer.attention.__class__ = KernelAttention
        layer.attention.pdl = pdl
    return True


# ---------------------------------------------------------------- SwiGLU's hidden activations, stored once


@torch.library.custom_op("gptfast::materialize", mutates_args=())
def materialize(x: Tensor) -> Tensor:
    """A copy of x that torch.compile cannot see through, so that x is computed once and stored (compiled, with
    lower_materialize_to_a_buffer, the store alone: no copy). At batch-1 decode
    inductor turns w2's matmul into a reduction whose input, silu(w1 x) * w3 x, it would otherwise recompute in
    every one of its programs (Mixtral's experts have the same pattern)."""
    return x.clone()


@materialize.register_fake
def _(x: Tensor) -> Tensor:
    return torch.empty_like(x)


def lower_materialize_to_a_buffer() -> None:
    """Let inductor compile materialize as "store x in a buffer" rather than a call that copies it (one copy kernel
    per layer fewer). Process-wide, like inductor's own settings; without it the copy runs and results are the same.
    Inductor's FX-graph cache does not key on lowerings: a graph cached before this was registered keeps its copy."""
    from torch._inductor.lowering import lowerings, register_lowering  # imported on demand: ~2 s

    op = torch.ops.gptfast.materialize.default
    if op not in lowerings:
        register_lowering(op)(lambda x: (x.realize(), x)[1])


class Materialize(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return materialize(x)


def store_hidden(model: nn.Module) -> None:
    """Make each float SwiGLU (and Mixtral's experts) store silu(w1 x) * w3 x once (materialize) for a compiled step;
    quantized w2 layers are opaque to inductor already."""
    for m in model.modules():
        if (type(m) is FeedForward and type(m.w2) is nn.Linear) or isinstance(m, ConditionalFeedForward):
            m.store_hidden = Materialize()


# ---------------------------------------------------------------- layers on the GEMV kernels


class GemvLinear(nn.Module):
    """A linear layer (no bias) whose one-row inputs (batch-1 decode) run on our Triton GEMV (gemv_op) and inputs of a
    few rows in a compiled step on dequant_matmul, once use_triton_kernels has set use_triton; kernel_tensors names
    the weights and scales the kernels take, and the dimension of the scales along the output features
    (GatedFeedForward stacks w1 and w3 along it)."""

    kernel_tensors: tuple = ("weight", None, 0)
    max_rows = 8  # without dequant_matmul (float32, eager) the GEMV takes up to this many rows
    matmul_rows = MATMUL_MAX_ROWS
    use_triton = pdl = False  # set by use_triton_kernels
    groupsize = 0
    norm_in_kernel = True  # FusedBlock: the RMSNorm inside this layer's GEMV, else an inductor kernel before it

    def on_gemv(self, x: Tensor) -> bool:
        rows = x.numel() // x.shape[-1]
        return self.use_triton and (rows <= GEMV_MAX_ROWS or (rows <= self.max_rows and not self.on_matmul(x)))

    def on_matmul(self, x: Tensor) -> bool:
        """A few rows in bf16 or fp16 (the tensor cores' inputs) in a compiled step: dequant_matmul. Eager (an
        uncompiled prefill), each launch through the autotuner costs more host time than the kernel saves."""
        rows = x.numel() // x.shape[-1]
        tensor_cores = x.dtype in (torch.bfloat16, torch.float16)
        return self.use_triton and rows <= self.matmul_rows and tensor_cores and torch.compiler.is_compiling()

    def matmul(self, x: Tensor) -> Tensor:
        """x [..., K] -> [..., N] on dequant_matmul."""
        w, s, _ = self.kernel_tensors
        rows = x.numel() // x.shape[-1]
        scales = getattr(self, s) if s else None
        y = dequant_matmul_op(x.reshape(rows, -1).contiguous(), getattr(self, w), scales, self.groupsize, self.pdl)
        return y.view(*x.shape[:-1], -1)

    def gemv(self, x: Tensor, norm: Optional[nn.Module] = None, residual: Optional[Tensor] = None) -> Tensor:
        """x [..., K] -> [..., N] on the kernel; norm (an RMSNorm) applied to x on the way in (by an inductor kernel
        before it where not norm_in_kernel), residual added on the way out."""
        if norm is not None and not self.norm_in_kernel:
            x, norm = norm(x), None
        w, s, _ = self.kernel_tensors
        return decode_gemv(
            getattr(self, w), getattr(self, s) if s else None, self.groupsize, self.pdl, x, norm, residual
        )


class FloatGemvLinear(GemvLinear):
    """A float linear layer on our GEMV at batch-1 decode (wo, w2 and the output layer, where inductor's batch-1
    reductions read below the card's bandwidth, and all five of a fused block) and on dequant_matmul for a few
    rows. Made by use_triton_kernels on CUDA; larger inputs use F.linear (cuBLAS)."""

    matmul_rows = FLOAT_MATMUL_MAX_ROWS

    def __init__(self, lin: nn.Linear):
        super().__init__()
        self.in_features, self.out_features, self.weight = lin.in_features, lin.out_features, lin.weight
        self.use_triton = self.pdl = False

    def forward(self, x: Tensor) -> Tensor:
        if self.on_gemv(x):
            return self.gemv(x)
        return self.matmul(x) if self.on_matmul(x) else F.linear(x, self.weight)


class Int8GemvLinear(GemvLinear, WeightOnlyInt8Linear):
    """An int8 layer whose decode steps run on int8_gemv_kernel (one row) or dequant_matmul (a few). use_triton_kernels
    swaps the class of each WeightOnlyInt8Linear for it: the same tensors and checkpoint keys."""

    kernel_tensors = ("weight", "scales", 0)

    def forward(self, x: Tensor) -> Tensor:
        if self.on_gemv(x):
            return self.gemv(x)
        if self.on_matmul(x):
            return self.matmul(x)
        # dequantized before the matmul: compiled, F.linear(x, w) * scales meets inductor's weight-only-int8 pattern,
        # whose CUDA kernel (_weight_int8pack_mm) computes each output on its own thread, far below cuBLAS
        w = self.weight.to(x.dtype)  # a new tensor, scaled in place: eager, no second copy of the weights
        return F.linear(x, w.mul_(self.scales[:, None]))


class Int4GemvLinear(GemvLinear, WeightOnlyInt4Linear):
    """An int4 layer repacked for int4_gemv_kernel (to_int4_gemv): one row on the GEMV, a few on dequant_matmul in a
    compiled step (else on the GEMV, up to max_rows); longer prompts dequantize its layout in one kernel
    (dequantize_int4_gemv) and run one matmul."""

    kernel_tensors = ("packed", "scales_and_zeros", 1)
    max_rows = DEQUANT_MIN_ROWS
    norm_in_kernel = False  # slower with it: a norm kernel before it is cheaper (docs/dropped.md)

    def forward(self, x: Tensor) -> Tensor:
        if self.on_gemv(x):
            return self.gemv(x)
        if self.on_matmul(x):
            return self.matmul(x)
        shape = x.shape
        x = x.reshape(-1, self.in_features)
        if self.packed.is_cuda:
            w = dequantize_int4_op(self.packed, self.scales_and_zeros, self.groupsize, x.dtype)
        else:  # the CPU (tests): the PyTorch reference
            w = dequantize_codes(unpack_int4_gemv(self.packed), self.scales_and_zeros, x.dtype)
        return F.linear(x, w).view(*shape[:-1], self.out_features)


def to_int4_gemv(m: WeightOnlyInt4Linear, device: torch.device) -> None:
    """Repack an int4 layer's codes for int4_gemv_kernel and make it an Int4GemvLinear; the checkpoint layout is
    dropped (a prepared model is for inference, not for saving)."""
    m.__class__ = Int4GemvLinear
    m.kernel = "triton"
    m.packed = pack_int4_gemv(m.weight.to(device))
    m.scales_and_zeros = m.scales_and_zeros.to(device=device, dtype=torch.bfloat16).contiguous()
    m.weight = m.weight.new_empty(0)


class GatedFeedForward(FeedForward):
    """SwiGLU with w1 and w3 (float, int8, or int4 in the GEMV's layout) stored back to back, w13 [2I, ...] and their
    scales s13: at decode one Triton kernel gives silu(w1 x) * w3 x, where the plain module takes two GEMVs and an
    elementwise kernel. w1 and w3 become views of w13 (one copy in memory, the same checkpoint keys). Made by
    use_triton_kernels on CUDA."""

    def __init__(self, ff: FeedForward):
        nn.Module.__init__(self)
        self.w1, self.w2, self.w3, self.store_hidden = ff.w1, ff.w2, ff.w3, ff.store_hidden
        w_name, s_name, s_dim = ff.w1.kernel_tensors
        hidden = ff.w1.out_features  # per rank under tensor parallel
        with torch.no_grad():  # else cat's autograd node would keep the separate float w1 and w3 alive
            self.register_buffer("w13", torch.cat([getattr(ff.w1, w_name), getattr(ff.w3, w_name)]), persistent=False)
        self.register_buffer("s13", None, persistent=False)
        for lin, part in zip((self.w1, self.w3), self.w13.split(hidden), strict=True):
            setattr(lin, w_name, nn.Parameter(part, requires_grad=False) if isinstance(lin, FloatGemvLinear) else part)
        if s_name:
            self.s13 = torch.cat([getattr(ff.w1, s_name), getattr(ff.w3, s_name)], s_dim)
            for lin, part in zip((self.w1, self.w3), self.s13.split(hidden, s_dim), strict=True):
                setattr(lin, s_name, part)
        self.w1w3 = stacked_layer(self.w1, self.w13, self.s13)

    def forward(self, x: Tensor) -> Tensor:
        if self.w1.on_gemv(x) and self.w3.on_gemv(x):
            return self.w2(self.gemv(x))
        a, b = self.w1w3(x).chunk(2, dim=-1)  # w1 and w3 through one tensor: a compiled layer takes no aliased inputs
        return self.w2(self.store_hidden(F.silu(a) * b))

    def gemv(self, x: Tensor, norm: Optional[nn.Module] = None) -> Tensor:
        """silu(w1 x) * w3 x [..., I] on the kernel; norm (an RMSNorm) applied to x on the way in."""
        if norm is not None and not self.w1.norm_in_kernel:
            x, norm = norm(x), None
        return decode_gemv(self.w13, self.s13, self.w1.groupsize, self.w1.pdl, x, norm, gated=True)


def stacked_layer(lin: GemvLinear, w13: Tensor, s13: Optional[Tensor]) -> GemvLinear:
    """A layer of lin's class and settings on the stacked [w1; w3] tensors (their scales s13): [..., K] -> [..., 2I]."""
    both = copy.copy(lin)
    tensors = {**lin._parameters, **lin._buffers}
    both._parameters, both._buffers, both._non_persistent_buffers_set = {}, {}, set()
    for name, t in tensors.items():  # buffers left out of state_dict: the checkpoint keys stay w1's and w3's
        both.register_buffer(name, t, persistent=False)
    w_name, s_name, _ = lin.kernel_tensors
    setattr(both, w_name, w13)
    if s_name:
        setattr(both, s_name, s13)
    both.out_features = 2 * lin.out_features
    return both


class FusedBlock(TransformerBlock):
    """A transformer layer whose batch-1 decode step (GEMV_MAX_ROWS rows) runs on four of our kernels plus attention:
    wqkv and the gated w1/w3 kernel RMS-normalize their input as they read it (int4: a norm kernel before them), wo
    and w2 add the residual as they store. That removes the add and norm kernels between them. Made by
    use_triton_kernels, on one GPU."""

    def __init__(self, block: TransformerBlock):
        nn.Module.__init__(self)
        self.attention, self.feed_forward = block.attention, block.feed_forward
        self.attention_norm, self.ffn_norm = block.attention_norm, block.ffn_norm

    def forward(self, x: Tensor, input_pos: Tensor, freqs_cis: Tensor, mask: Optional[Tensor]) -> Tensor:
        attn, ff = self.attention, self.feed_forward
        if x.shape[0] * x.shape[1] > GEMV_MAX_ROWS or not attn.wqkv.use_triton:  # prefill: the plain path
            return super().forward(x, input_pos, freqs_cis, mask)
        qkv = attn.wqkv.gemv(x, norm=self.attention_norm)
        h = attn.wo.gemv(attn.attend(qkv, freqs_cis, mask, input_pos), residual=x)  # x + wo(attention)
        return ff.w2.gemv(ff.gemv(h, norm=self.ffn_norm), residual=h)  # h + w2(silu(w1 h') * w3 h'), h' = ffn_norm(h)


# ---------------------------------------------------------------- the swap


def use_kernels(model: nn.Module, device, kernels: str = "auto", pdl: bool = False, rows: int = 1) -> None:
    """On a CUDA GPU, give the model's decode steps our kernels: int4 layers repacked for the int4 GEMV, then
    use_triton_kernels. kernels="torch" (and any other device) keeps the plain path: inductor's own kernels, and
    tinygemm or torch's CPU kernel for int4 (quantize.prepare_for_device). rows: the rows of the model's decode steps
    (the batch size); from 2 to TINYGEMM_MAX_ROWS its int4 layers stay on tinygemm, one layout per model (keeping
    both would double int4's weight memory). Run it after tensor parallel's sharding."""
    if kernels not in ("auto", "gemv", "torch"):
        raise ValueError(f"kernels={kernels!r}: use auto, gemv or torch")
    device = torch.device(device)
    if kernels == "torch" or device.type != "cuda" or triton is None or torch.version.hip is not None:
        return
    for m in list(model.modules()) if not 2 <= rows <= TINYGEMM_MAX_ROWS else ():
        if type(m) is WeightOnlyInt4Linear and m.packed is None and int4_fits(m.in_features, m.groupsize):
            to_int4_gemv(m, device)
    use_triton_kernels(model, kernels, pdl)
    torch.cuda.empty_cache()  # hand back the separate w1/w3 blocks that the gated kernel joined


def use_triton_kernels(model: nn.Module, kernels: str, pdl: bool) -> None:
    """Decode on our Triton kernels: int8 and int4 layers (int4: those repacked for it), and float wo and w2
    (FloatGemvLinear), and the float output layer. "gemv": the GEMVs alone; "auto": also SwiGLU's w1/w3 as one
    gated kernel, and the blocks fused (fuses); "torch": none."""
    for m in list(model.modules()) if kernels != "torch" else ():
        if type(m) is WeightOnlyInt8Linear:
            m.__class__ = Int8GemvLinear  # the same tensors; decode steps on int8_gemv_kernel
    fused = [m for m in model.modules() if fuses(m)] if kernels == "auto" else []  # decided before any layer is swapped
    fused_parts = {part for b in fused for part in (b.attention, b.feed_forward)}
    swapped = list(model.modules()) if kernels != "torch" else ()  # after tensor parallel's sharding (nn.Linear)
    for m in swapped:
        if not isinstance(m, (Attention, FeedForward, Transformer)):
            continue
        # the output layer too: with the last w2 opaque, inductor's fused norm + output reduction was slow
        for child in ("wqkv", "wo", "w1", "w2", "w3") if m in fused_parts else ("wo", "w2", "output"):
            lin = getattr(m, child, None)
            if type(lin) is nn.Linear and lin.bias is None:
                setattr(m, child, FloatGemvLinear(lin))
    for m in model.modules():
        if isinstance(m, GemvLinear):
            m.use_triton, m.pdl = kernels != "torch", kernels != "torch" and pdl
    for name, m in list(model.named_modules()) if kernels == "auto" else ():
        if (
            type(m) is FeedForward
            and gemv_ready(m.w1)
            and type(m.w1) is type(m.w3)
            and m.w1.groupsize == m.w3.groupsize
        ):
            gated = GatedFeedForward(m)
            gated._forward_hooks.update(m._forward_hooks)  # tensor parallel's all-reduce of the output
            set_module(model, name, gated)
    for name, m in list(model.named_modules()):
        if m in fused and fusable(m):
            set_module(model, name, FusedBlock(m))


def fuses(block: nn.Module) -> bool:
    """Whether kernels="auto" makes block a FusedBlock: a dense block, not yet swapped, without tensor parallel's
    all-reduce hooks (they reduce before the residual add)."""
    ff = getattr(block, "feed_forward", None)
    return (
        type(block) is TransformerBlock
        and type(ff) is FeedForward
        and not (block.attention._forward_hooks or ff._forward_hooks)
    )


def gemv_ready(lin: nn.Module) -> bool:
    """A layer with our GEMV for decode: int8, float made FloatGemvLinear, int4 repacked for the Triton kernel."""
    return isinstance(lin, GemvLinear)


def fusable(block: TransformerBlock) -> bool:
    """wqkv, wo and w2 on our GEMV and the gated feed-forward (an int4 layer the kernel cannot take stays apart)."""
    attn, ff = block.attention, block.feed_forward
    return isinstance(ff, GatedFeedForward) and all(gemv_ready(lin) for lin in (attn.wqkv, attn.wo, ff.w2))
