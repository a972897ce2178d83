"""Weight-only quantization: int8 per-channel, int4 groupwise (round-to-nearest or GPTQ), and the layers that run them.

Formats (what `quantize.py` writes and `generate.py` recognises from the tensors themselves):
  int8: `weight` int8 [N, K], `scales` [N]                      ->  w = weight * scales
  int4: `weight` uint8 [N, K/2] (even k in the high nibble), `scales_and_zeros` [K/g, N, 2]
                                                                ->  w = (q - 8) * scale + zero
The int4 layout is the input of `torch.ops.aten._convert_weight_to_int4pack`; at load time it is repacked for
the Triton int4 GEMV below on CUDA (tinygemm with kernels="torch") or for torch's CPU int4 kernel. On CUDA,
decode steps run on the small Triton GEMV kernels below (int8 up to 8 rows, int4 up to 64, and float wo and w2,
which inductor reads slowly); larger inputs use a dequantize-matmul (or F.linear).
"""

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from model import Attention, ConditionalFeedForward, FeedForward, ModelArgs, Transformer, TransformerBlock

GROUPSIZES = (32, 64, 128, 256)
GEMV_MAX_ROWS = 8  # inputs with at most this many rows (decode, speculative verify) take the GEMV kernels
DEQUANT_MIN_ROWS = 64  # int4 inputs with more rows (prefill) dequantize to bf16 and matmul: the int4 kernels are built for few

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None


# ---------------------------------------------------------------- quantizers


def quantize_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-output-channel: w [N, K] -> (int8 [N, K], scales [N]), error <= scale / 2."""
    scales = w.float().abs().amax(dim=-1).clamp(min=1e-8) * (1 / 127)  # CUDA divides by a scalar this way: same bits
    q = torch.clamp(torch.round(w.float() / scales[..., None]), -127, 127).to(torch.int8)
    return q, scales.to(w.dtype)


def int4_group_params(w: Tensor, groupsize: int) -> tuple[Tensor, Tensor]:
    """Asymmetric per-group scale and zero of w [N, K] -> ([N, K/g], [N, K/g]) such that w ~ (q - 8) * s + z."""
    wg = w.float().reshape(w.shape[0], -1, groupsize)
    lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)
    scales = (hi - lo).clamp(min=1e-6) * (1 / 15)  # as CUDA divides by a scalar: the same bits on every device
    return scales, lo + 8 * scales


def int4_quantize_with(w: Tensor, scales: Tensor, zeros: Tensor, groupsize: int) -> Tensor:
    """Integer codes 0..15 of w [N, K] for given group scales/zeros [N, K/g]."""
    wg = w.float().reshape(w.shape[0], -1, groupsize)
    q = torch.round((wg - zeros[..., None]) / scales[..., None]) + 8
    return q.clamp(0, 15).reshape(w.shape).to(torch.int32)


def pack_int4(q: Tensor, scales: Tensor, zeros: Tensor, dtype=torch.bfloat16) -> tuple[Tensor, Tensor]:
    """Codes [N, K] and params [N, K/g] -> (uint8 [N, K/2], scales_and_zeros [K/g, N, 2])."""
    packed = ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8)
    return packed, torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous().to(dtype)


def quantize_int4(w: Tensor, groupsize: int) -> tuple[Tensor, Tensor]:
    """Round-to-nearest groupwise int4: w [N, K] -> (uint8 [N, K/2], scales_and_zeros [K/g, N, 2])."""
    scales, zeros = int4_group_params(w, groupsize)
    return pack_int4(int4_quantize_with(w, scales, zeros, groupsize), scales, zeros, w.dtype)


def unpack_int4(packed: Tensor) -> Tensor:
    """uint8 [N, K/2] -> codes [N, K] (int32, 0..15)."""
    return torch.stack([packed >> 4, packed & 15], dim=-1).reshape(packed.shape[0], -1).to(torch.int32)


def tinygemm_codes(packed: Tensor) -> Tensor:
    """torch's CUDA int4 layout (`_convert_weight_to_int4pack`: int32 [N/8, K/(16 IK), 32, IK/2] for IK inner k-tiles)
    -> codes uint8 [N, K]. Lane t of an 8-row tile holds row t // 4; its word j covers bytes 16 j + 4 i + t % 4 of the
    super-tile (i = 0..3), whose high nibbles (even k) sit in bits 4i..4i+3 and low nibbles (odd k) in bits 16+4i..
    prepare_for_device checks this against torch's own packing before trusting it."""
    NT, KO, _, J = packed.shape
    shifts = torch.tensor([0, 16, 4, 20, 8, 24, 12, 28], dtype=torch.int32, device=packed.device)  # (i, even/odd k)
    q = ((packed.view(NT, KO, 8, 4, J, 1) >> shifts) & 15).to(torch.uint8)  # [NT, KO, r, c, J, (i, parity)]
    q = q.view(NT, KO, 8, 4, J, 4, 2).permute(0, 2, 1, 4, 5, 3, 6)  # [NT, r, KO, J, i, c, parity]
    return q.reshape(NT * 8, KO * J * 32)


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


def dequantize_codes(q: Tensor, scales_and_zeros: Tensor, dtype) -> Tensor:
    """Codes [N, K] and scales_and_zeros [K/g, N, 2] -> weights [N, K] = (q - 8) * scale + zero, group by group."""
    N, K = q.shape
    s, z = scales_and_zeros.to(dtype).transpose(0, 1).unbind(-1)  # [N, K/g] each
    return ((q.view(N, s.shape[1], -1).to(dtype) - 8) * s[..., None] + z[..., None]).view(N, K)


def dequantize_int4(packed: Tensor, scales_and_zeros: Tensor, dtype) -> Tensor:
    """The plain-PyTorch reference: uint8 [N, K/2], [K/g, N, 2] -> weights [N, K]."""
    return dequantize_codes(unpack_int4(packed), scales_and_zeros, dtype)


# ---------------------------------------------------------------- Triton GEMV kernels (decode at batch <= 8)

if triton is not None:

    @triton.jit
    def int8_to_float(w):
        """int8 w as float32 without the int-to-float conversion (1/4 of the FMA rate): w + 128 is the byte of w with
        its top bit flipped, and 0x4B000000 | (w + 128) are the bits of the float 2**23 + w + 128; so one XOR of the
        zero-extended byte and one subtraction (exact). 5.7 instructions per weight in the GEMV loop instead of 6.8."""
        u = w.to(tl.uint8, bitcast=True).to(tl.int32)
        return (u ^ 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0  # 2**23 + 128

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
            w = tl.load(w_ptr + offs_n[:, None] * K + k[None, :], mask=(offs_n[:, None] < N) & (k[None, :] < K), other=0)
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

    _c8 = [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w) for n in (2, 4, 8, 16, 32) for k in (256, 512, 1024, 2048) for w in (4, 8)]
    int8_gemv_tuned = triton.autotune([c for c in _c8 if c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"] <= 16384], key=["N", "K", "NORM"])(int8_gemv_kernel)

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
    int8_gated_gemv_tuned = triton.autotune(_cg, key=["N", "K", "NORM"])(int8_gated_gemv_kernel)

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
        s = (sz << 16).to(tl.float32, bitcast=True)  # a bf16 is the high half of its float32
        z = (sz & -65536).to(tl.float32, bitcast=True)
        return s * (16.0 * tl.sum(part, axis=2) - (24.0 * sum_hi + 264.0 * sum_lo)) + z * (sum_hi + sum_lo)

    @triton.jit
    def int4_gemv_kernel(
        x_ptr, w_ptr, sz_ptr, y_ptr, g_ptr, r_ptr, M, N, K, SZ_STRIDE, EXP, eps, GROUP: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, PDL: tl.constexpr, GATED: tl.constexpr, NORM: tl.constexpr, RESIDUAL: tl.constexpr,
    ):  # fmt: skip
        """y[m, n] = sum_k x[m, k] * ((q[n, k] - 8) * s[n, k // G] + z[n, k // G]), for the M rows of x in turn (the
        weights are re-read from L1); one program per BLOCK_N outputs, a thread per 32-wide chunk of k and BLOCK_N rows,
        so each x it loads serves BLOCK_N rows. GATED: SwiGLU's silu(w1 x) * w3 x, w1 and w3 being rows n and N + n.
        w: int32 [N, K/8] (pack_int4_gemv): word j of chunk c holds the codes of k = 32 c + 4 i + j, i = 0..7, so
        that code i of a chunk's 4 words meets 4 contiguous x. sz: the checkpoint's [K/G, N, 2] bf16 (scale, zero)
        pairs, read as int32 [K/G, N] whose rows are SZ_STRIDE apart (2 N for [w1; w3], or for a view of either).
        A code becomes a float without a conversion: moved to bits 19-22 (15-18) and OR'ed with EXP = 0x3F800000 it
        reads as 1 + q/16 (1 + q/256). Codes sit at bits 4i+3 (mod 32), so a rotation
        by 0, 8, 16 or 24 bits brings two of them there at once: 1 rotation, 2 LOP3 and 2 FMA per 2 weights
        (3.97 SASS instructions per weight in all, sm_90). EXP is an argument so that AND and OR make one LOP3.
        PDL, NORM and RESIDUAL as in int8_gemv_kernel (no RESIDUAL when GATED). NORM's work per x, amortized over only
        BLOCK_N rows, takes the loop to 5.27 instructions per weight (3.99 gated): FusedBlock normalizes before it."""
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
                w_off = offs_n[None, :, None] * (4 * (K // 32)) + 4 * c[:, None, None] + j[None, None, :]  # [BLOCK_C, BLOCK_N, 4]
                w_mask = rows[None, :, None] & live[:, None, None]
                sz_off, sz_mask = (c // (GROUP // 32))[:, None] * SZ_STRIDE + offs_n[None, :], rows[None, :] & live[:, None]
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
                for r in tl.static_range(4):  # rotated left by 8 r, codes (hi, lo) = (4, 3), (2, 1), (0, 7), (6, 5) sit at bits 19, 15
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
    # One row (decode) takes a fixed tile: the autotuner times each tile alone, weights partly in L2, and in some
    # processes picked 1 or 4 warps for a layer, 384 instead of 423 tokens/s (H100, int4 7B). On cold weights in a
    # graph of the step's GEMVs, 2 warps is the fastest or within 1% for every layer shape (notes/perf.md, session 12).
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
        kernel[grid](x, w, sz, y, g, r, M, N, K, sz.stride(0), 0x3F800000, eps, GROUP=groupsize, GATED=gated, **flags, **launch, **config)
    else:  # int8 or float: one program per (row, BLOCK_N outputs)
        kernel = (int8_gated_gemv_kernel if gated else int8_gemv_kernel) if config else (int8_gated_gemv_tuned if gated else int8_gemv_tuned)
        s = w if scales is None else scales  # float weights: w stands in for the unused scales pointer
        kernel[lambda meta: (M, triton.cdiv(N, meta["BLOCK_N"]))](x, w, s, y, g, r, N, K, eps, **flags, **launch, **config)
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


def decode_gemv(w: Tensor, scales: Optional[Tensor], groupsize: int, pdl: bool, x: Tensor, norm=None, residual=None, gated=False) -> Tensor:
    """x [..., K] through gemv_op, shaped back to [..., N]; norm: an RMSNorm that the kernel applies to x."""
    rows = x.numel() // x.shape[-1]
    g, eps = (None, 0.0) if norm is None else (norm.weight, norm.eps)
    r = None if residual is None else residual.reshape(rows, -1)
    return gemv_op(x.reshape(rows, -1).contiguous(), w, scales, groupsize, pdl, gated, g, eps, r).view(*x.shape[:-1], -1)


@torch.library.custom_op("gptfast::int4_mm_cpu", mutates_args=())
def int4_mm_cpu(x: Tensor, packed: Tensor, groupsize: int, scales_and_zeros: Tensor) -> Tensor:
    """torch's CPU int4 matmul, opaque to inductor: inductor's own lowering of it loses the group size inside a
    compiled layer region ("group size must be a scalar", torch 2.11-2.13)."""
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, groupsize, scales_and_zeros)


@int4_mm_cpu.register_fake
def _(x, packed, groupsize, scales_and_zeros):
    return x.new_empty(x.shape[0], scales_and_zeros.shape[1])  # [M, N]


# ---------------------------------------------------------------- quantized layers


class GemvLinear(nn.Module):
    """A linear layer (no bias) whose inputs of at most max_rows rows (decode) run on our Triton GEMV (gemv_op), once
    use_triton_kernels has set use_triton; kernel_tensors names the weights and scales gemv takes, and the dimension
    of the scales along the output features (GatedFeedForward stacks w1 and w3 along it)."""

    kernel_tensors: tuple = ("weight", None, 0)
    max_rows = GEMV_MAX_ROWS
    groupsize = 0
    norm_in_kernel = True  # FusedBlock: the RMSNorm inside this layer's GEMV, else an inductor kernel before it

    def on_gemv(self, x: Tensor) -> bool:
        return self.use_triton and x.numel() // x.shape[-1] <= self.max_rows

    def gemv(self, x: Tensor, norm: Optional[nn.Module] = None, residual: Optional[Tensor] = None) -> Tensor:
        """x [..., K] -> [..., N] on the kernel; norm (an RMSNorm) applied to x on the way in (by an inductor kernel
        before it where not norm_in_kernel), residual added on the way out."""
        if norm is not None and not self.norm_in_kernel:
            x, norm = norm(x), None
        w, s, _ = self.kernel_tensors
        return decode_gemv(getattr(self, w), getattr(self, s) if s else None, self.groupsize, self.pdl, x, norm, residual)


class WeightOnlyInt8Linear(GemvLinear):
    kernel_tensors = ("weight", "scales", 0)

    def __init__(self, in_features: int, out_features: int, dtype=torch.bfloat16):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.ones(out_features, dtype=dtype))
        self.use_triton = self.pdl = False  # set by prepare_for_device

    def forward(self, x: Tensor) -> Tensor:
        if self.on_gemv(x):
            return self.gemv(x)
        return F.linear(x, self.weight.to(dtype=x.dtype)) * self.scales


class FloatGemvLinear(GemvLinear):
    """A float linear layer on our GEMV at decode: wo, w2 and the output layer, where inductor's batch-1 reductions
    read at 83% and 89% of the H100's bandwidth (bf16 profile, README), and all five of a fused block. Made by
    use_triton_kernels on CUDA; larger inputs use F.linear."""

    def __init__(self, lin: nn.Linear):
        super().__init__()
        self.in_features, self.out_features, self.weight = lin.in_features, lin.out_features, lin.weight
        self.use_triton = self.pdl = False

    def forward(self, x: Tensor) -> Tensor:
        return self.gemv(x) if self.on_gemv(x) else F.linear(x, self.weight)


class WeightOnlyInt4Linear(GemvLinear):
    """kernel: "triton" (CUDA, our int4 GEMV for decode and prompts of up to max_rows rows), "tinygemm" (CUDA,
    torch's _weight_int4pack_mm), "cpu" (torch's CPU int4 mm) or "reference" (dequantize + matmul); chosen by
    prepare_for_device."""

    kernel_tensors = ("packed", "scales_and_zeros", 1)
    max_rows = DEQUANT_MIN_ROWS
    norm_in_kernel = False  # H100: 11.9 -> 20.4 us for wqkv with it; fused int4 blocks 2% slower (README)

    def __init__(self, in_features: int, out_features: int, groupsize: int, dtype=torch.bfloat16):
        super().__init__()
        self.in_features, self.out_features, self.groupsize = in_features, out_features, groupsize
        self.register_buffer("weight", torch.empty(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scales_and_zeros", torch.empty(in_features // groupsize, out_features, 2, dtype=dtype))
        self.kernel = "reference"
        self.register_buffer("packed", None, persistent=False)  # the kernel's own layout, made by prepare_for_device
        self.dequant_prefill = False  # tinygemm: inputs of over DEQUANT_MIN_ROWS rows dequantize and matmul instead
        self.use_triton = self.pdl = False  # kernel "triton": decode on the GEMV, launched with PDL (use_triton_kernels)

    def on_gemv(self, x: Tensor) -> bool:
        return self.kernel == "triton" and super().on_gemv(x)

    def forward(self, x: Tensor) -> Tensor:
        if self.on_gemv(x):
            return self.gemv(x)
        shape = x.shape
        x = x.reshape(-1, self.in_features)
        if self.kernel == "triton":  # prefill (and the plain reference): dequantize once, one bf16 matmul
            y = F.linear(x, dequantize_codes(unpack_int4_gemv(self.packed), self.scales_and_zeros, x.dtype))
        elif self.kernel == "tinygemm" and self.dequant_prefill and x.shape[0] > DEQUANT_MIN_ROWS:
            y = F.linear(x, dequantize_codes(tinygemm_codes(self.packed), self.scales_and_zeros, x.dtype))
        elif self.kernel == "tinygemm":
            y = torch.ops.aten._weight_int4pack_mm(x.to(torch.bfloat16), self.packed, self.groupsize, self.scales_and_zeros.to(torch.bfloat16))
        elif self.kernel == "cpu":
            y = int4_mm_cpu(x, self.packed, self.groupsize, self.scales_and_zeros.to(x.dtype))
        else:
            y = F.linear(x, dequantize_int4(self.weight, self.scales_and_zeros, x.dtype))
        return y.to(x.dtype).view(*shape[:-1], self.out_features)


class GatedFeedForward(FeedForward):
    """SwiGLU with w1 and w3 (float, int8, or int4 in the GEMV's layout) stored back to back, w13 [2I, ...] and their
    scales s13: at decode one Triton kernel gives silu(w1 x) * w3 x, where the plain module takes two GEMVs and an
    elementwise kernel. w1 and w3 become views of w13 (one copy in memory, the same checkpoint keys). Made by
    use_triton_kernels on CUDA."""

    def __init__(self, ff: FeedForward):
        nn.Module.__init__(self)
        self.w1, self.w2, self.w3 = ff.w1, ff.w2, ff.w3
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

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(self.gemv(x)) if self.w1.on_gemv(x) and self.w3.on_gemv(x) else super().forward(x)

    def gemv(self, x: Tensor, norm: Optional[nn.Module] = None) -> Tensor:
        """silu(w1 x) * w3 x [..., I] on the kernel; norm (an RMSNorm) applied to x on the way in."""
        if norm is not None and not self.w1.norm_in_kernel:
            x, norm = norm(x), None
        return decode_gemv(self.w13, self.s13, self.w1.groupsize, self.w1.pdl, x, norm, gated=True)


class FusedBlock(TransformerBlock):
    """A transformer layer whose decode step (at most GEMV_MAX_ROWS rows) runs on four of our kernels plus attention:
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


class ConditionalFeedForwardInt8(ConditionalFeedForward):
    """Mixtral experts with int8 weights [E, out, in] and per-(expert, out-channel) scales."""

    def __init__(self, num_experts: int, dim: int, intermediate_size: int, dtype=torch.bfloat16):
        nn.Module.__init__(self)
        E, I, D = num_experts, intermediate_size, dim
        for name, shape in (("w1", (E, I, D)), ("w2", (E, D, I)), ("w3", (E, I, D))):
            self.register_buffer(name, torch.empty(shape, dtype=torch.int8))
            self.register_buffer("scales" + name[1], torch.ones(shape[:2], dtype=dtype))

    def expert_weight(self, name: str, idx) -> Tensor:
        scales = getattr(self, "scales" + name[1])
        return getattr(self, name)[idx].to(scales.dtype) * scales[idx].unsqueeze(-1)


# ---------------------------------------------------------------- whole-model transforms


def linear_layers(model: nn.Module):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def int4_fits(in_features: int, groupsize: int) -> bool:
    """torch's int4 kernels need K divisible by the group size and by 32 (two 16-wide k-tiles)."""
    return in_features % groupsize == 0 and in_features % 32 == 0


@torch.no_grad()
def quantize_model(model: Transformer, mode: str, groupsize: int = 32, device=None, gptq_inputs=None) -> Transformer:
    """Quantize a loaded model's linear layers (and Mixtral experts) in place; returns the model."""
    if mode not in ("int8", "int4", "int4-gptq"):
        raise ValueError(f"unknown quantization mode {mode!r}: int8, int4 or int4-gptq")
    if mode != "int8":
        check_groupsize(model, groupsize)
    if mode == "int4-gptq":
        if gptq_inputs is None:
            raise ValueError("int4-gptq needs calibration tokens (gptq_inputs)")
        gptq_quantize_model(model, gptq_inputs, groupsize)
    for name, lin in linear_layers(model):
        w = lin.weight.data
        if mode == "int8":
            q = WeightOnlyInt8Linear(lin.in_features, lin.out_features, w.dtype).to(w.device)
            q.weight, q.scales = quantize_int8(w)
        elif not int4_fits(lin.in_features, groupsize):
            print(f"note: {name} has {lin.in_features} input features, not a multiple of {max(groupsize, 32)}: kept in {w.dtype}")
            continue
        else:
            q = int4_layer(lin, *quantize_int4(w, groupsize))
        set_module(model, name, q)
    if mode == "int8":
        for name, m in list(model.named_modules()):
            if type(m) is ConditionalFeedForward:
                E, I, D = m.w1.shape
                q = ConditionalFeedForwardInt8(E, D, I, m.w1.dtype).to(m.w1.device)
                for wname in ("w1", "w2", "w3"):
                    codes, scales = quantize_int8(getattr(m, wname).data.flatten(0, 1))
                    setattr(q, wname, codes.view_as(getattr(m, wname)))
                    setattr(q, "scales" + wname[1], scales.view(getattr(m, wname).shape[:2]))
                set_module(model, name, q)
    if device is not None:
        prepare_for_device(model, torch.device(device))
    return model


def int4_layer(lin: nn.Linear, packed: Tensor, scales_and_zeros: Tensor) -> "WeightOnlyInt4Linear":
    groupsize = lin.in_features // scales_and_zeros.shape[0]
    q = WeightOnlyInt4Linear(lin.in_features, lin.out_features, groupsize, lin.weight.dtype).to(lin.weight.device)
    q.weight, q.scales_and_zeros = packed, scales_and_zeros
    return q


def check_groupsize(model: nn.Module, groupsize: int) -> None:
    if groupsize not in GROUPSIZES:
        raise ValueError(f"groupsize {groupsize} is not one of {GROUPSIZES}")
    if not any(int4_fits(lin.in_features, groupsize) for _, lin in linear_layers(model)):
        widths = sorted({lin.in_features for _, lin in linear_layers(model)})
        raise ValueError(f"groupsize {groupsize} divides none of the layer widths {widths}: use a smaller --groupsize")


def convert_for_checkpoint(model: Transformer, state_dict: dict) -> None:
    """Swap in quantized layers wherever the state dict holds quantized tensors (detected by content)."""
    for name, lin in linear_layers(model):
        w = state_dict.get(name + ".weight")
        if w is not None and w.dtype == torch.int8 and name + ".scales" in state_dict:
            set_module(model, name, WeightOnlyInt8Linear(lin.in_features, lin.out_features, state_dict[name + ".scales"].dtype))
        elif name + ".scales_and_zeros" in state_dict:
            sz = state_dict[name + ".scales_and_zeros"]
            if w is None or w.dtype != torch.uint8 or w.dim() != 2:
                raise ValueError(
                    f"{name}: int4 weights packed for one device by an older gpt-fast ({tuple(w.shape) if w is not None else None}, "
                    f"{w.dtype if w is not None else None}): re-run quantize.py on model.pth"
                )
            set_module(model, name, WeightOnlyInt4Linear(lin.in_features, lin.out_features, lin.in_features // sz.shape[0], sz.dtype))
    for name, m in list(model.named_modules()):
        if type(m) is ConditionalFeedForward and state_dict.get(name + ".w1", torch.empty(0)).dtype == torch.int8:
            E, I, D = m.w1.shape
            set_module(model, name, ConditionalFeedForwardInt8(E, D, I, state_dict[name + ".scales1"].dtype))


def prepare_for_device(model: nn.Module, device: torch.device, kernels: str = "auto", pdl: bool = False) -> None:
    """Pick each quantized layer's kernels for where it runs; repack int4 codes for them (once: idempotent).
    On CUDA, int8 and int4 run on our Triton kernels (use_triton_kernels); kernels="torch" keeps inductor's fused
    dequantize-matmul for int8 and tinygemm for int4 (the usual approach). pdl: launch ours with programmatic
    dependent launch (generate.use_pdl)."""
    if kernels not in ("auto", "gemv", "torch"):
        raise ValueError(f"kernels={kernels!r}: use auto, gemv or torch")
    cuda_triton = kernels != "torch" and device.type == "cuda" and triton is not None and torch.version.hip is None
    int4 = [m for m in model.modules() if isinstance(m, WeightOnlyInt4Linear)]
    for m in int4:
        if m.packed is None:
            repack_int4(m, device, cuda_triton)
    if any(m.kernel == "tinygemm" and not m.dequant_prefill for m in int4):
        print("note: this torch packs int4 weights in a layout quantize.tinygemm_codes does not read: long prompts run on tinygemm (slower)")
    use_triton_kernels(model, kernels if cuda_triton else "torch", pdl)
    if cuda_triton:
        torch.cuda.empty_cache()  # hand back the separate w1/w3 blocks that the gated kernel joined


def repack_int4(m: WeightOnlyInt4Linear, device: torch.device, triton_kernel: bool = False) -> None:
    """The checkpoint's int4 layout -> the kernel's; the checkpoint copy is dropped (a prepared model is for inference,
    not for saving). triton_kernel: our GEMV's layout (pack_int4_gemv), whose prefill dequantizes from it.
    Else on CUDA tinygemm with 2 inner k-tiles (H100, batch 1, 3-11% faster per layer than 8, README), whose
    prefill (over DEQUANT_MIN_ROWS rows) dequantizes from tinygemm's layout: tinygemm re-reads the weights for
    every 16 rows (H100, 2040-token prompt: 950 ms on tinygemm, 213 ms dequantized)."""
    m.kernel = "tinygemm" if device.type == "cuda" else "cpu"
    if not int4_fits(m.in_features, m.groupsize) or m.out_features % 16:  # torch's packing needs N % 16
        m.kernel = "reference"
    if triton_kernel and device.type == "cuda" and int4_fits(m.in_features, m.groupsize):
        m.kernel = "triton"
        m.packed = pack_int4_gemv(m.weight.to(device))
        m.scales_and_zeros = m.scales_and_zeros.to(device=device, dtype=torch.bfloat16).contiguous()
    elif m.kernel == "tinygemm":
        m.packed = torch.ops.aten._convert_weight_to_int4pack(m.weight.to(device), 2)
        # prefill reads the codes back out of torch's layout: only if this torch packs as tinygemm_codes expects
        m.dequant_prefill = torch.equal(tinygemm_codes(m.packed[:1]), unpack_int4(m.weight[:8].to(device)).to(torch.uint8))
    elif m.kernel == "cpu":
        m.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_int4(m.weight.cpu()), 1)
    if m.packed is not None:
        m.weight = m.weight.new_empty(0)


def use_triton_kernels(model: nn.Module, kernels: str, pdl: bool) -> None:
    """Decode on our Triton kernels: int8 and int4 layers (int4: those repacked for it), and float wo and w2
    (FloatGemvLinear), and the float output layer. "gemv": the GEMVs alone; "auto": also SwiGLU's w1/w3 as one
    gated kernel (H100, int8: 250.7 against 243.6 tokens/s), and the blocks fused (fuses); "torch": none."""
    fused = [m for m in model.modules() if fuses(m)] if kernels == "auto" else []  # decided before any layer is swapped
    fused_parts = {part for b in fused for part in (b.attention, b.feed_forward)}
    for m in list(model.modules()) if kernels != "torch" else ():  # after tensor parallel's sharding, which wants nn.Linear
        if not isinstance(m, (Attention, FeedForward, Transformer)):
            continue
        # the output layer too: with the last w2 opaque, inductor's fused norm + output reduction took 179 us (H100)
        for child in ("wqkv", "wo", "w1", "w2", "w3") if m in fused_parts else ("wo", "w2", "output"):
            lin = getattr(m, child, None)
            if type(lin) is nn.Linear and lin.bias is None:
                setattr(m, child, FloatGemvLinear(lin))
    for m in model.modules():
        if isinstance(m, GemvLinear):
            m.use_triton, m.pdl = kernels != "torch", kernels != "torch" and pdl
    for name, m in list(model.named_modules()) if kernels == "auto" else ():
        if type(m) is FeedForward and gemv_ready(m.w1) and type(m.w1) is type(m.w3) and m.w1.groupsize == m.w3.groupsize:
            gated = GatedFeedForward(m)
            gated._forward_hooks.update(m._forward_hooks)  # tensor parallel's all-reduce of the output
            set_module(model, name, gated)
    for name, m in list(model.named_modules()):
        if m in fused and fusable(m):
            set_module(model, name, FusedBlock(m))


def fuses(block: nn.Module) -> bool:
    """Whether kernels="auto" makes block a FusedBlock: a dense block, not yet swapped, without tensor parallel's
    all-reduce hooks (they reduce before the residual add). H100, same starts: bf16 203.7 against 196.9 tokens/s,
    int8 339.5 against 326.5, int4 420.4 against 397.7 and 405.6 (README)."""
    ff = getattr(block, "feed_forward", None)
    return type(block) is TransformerBlock and type(ff) is FeedForward and not (block.attention._forward_hooks or ff._forward_hooks)


def gemv_ready(lin: nn.Module) -> bool:
    """A layer with our GEMV for decode: int8, float made FloatGemvLinear, int4 repacked for the Triton kernel."""
    return isinstance(lin, GemvLinear) and getattr(lin, "kernel", "triton") == "triton"


def fusable(block: TransformerBlock) -> bool:
    """wqkv, wo and w2 on our GEMV and the gated feed-forward (an int4 layer the kernel cannot take stays apart)."""
    attn, ff = block.attention, block.feed_forward
    return isinstance(ff, GatedFeedForward) and all(gemv_ready(lin) for lin in (attn.wqkv, attn.wo, ff.w2))


# ---------------------------------------------------------------- checkpoint files


def load_checkpoint(checkpoint_path) -> dict:
    """A state dict, read memory-mapped and without running code (weights_only)."""
    try:
        return torch.load(str(checkpoint_path), mmap=True, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise
    except Exception as e:  # torch raises many kinds for a bad zip, pickle or storage
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ValueError(f"cannot read checkpoint {checkpoint_path} (corrupt, truncated or not a state dict?): {reason}") from None


def check_state_dict(model: nn.Module, state_dict: dict, config_name: str = "") -> None:
    """One-line ValueError when the checkpoint's keys or shapes do not fit the model's config."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(s)}" for k, s in expected.items() if k in state_dict and state_dict[k].shape != s]
    if missing or unexpected or wrong:
        parts = [
            f"{name}: {items[:3]}{' ...' if len(items) > 3 else ''}"
            for name, items in (("missing", missing), ("unexpected", unexpected), ("shape", wrong))
            if items
        ]
        raise ValueError(f"checkpoint does not match the model config{config_name}: " + "; ".join(parts))


def read_state_dict(checkpoint_path: Path) -> dict:
    """The checkpoint's tensors, memory-mapped, with torch.compile's key prefix removed."""
    checkpoint_path = Path(checkpoint_path)
    if checkpoint_path.is_dir():
        raise FileNotFoundError(f"{checkpoint_path} is a folder: pass the model file in it, e.g. {checkpoint_path / 'model.pth'}")
    if not checkpoint_path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint_path}")
    state_dict = load_checkpoint(checkpoint_path)
    if not isinstance(state_dict, dict):
        raise ValueError(f"{checkpoint_path} holds a {type(state_dict).__name__}, not a state dict")
    return {k.removeprefix("_orig_mod."): v for k, v in state_dict.items()}


def quantized_format(state_dict: dict) -> Optional[str]:
    """ "int8" or "int4" when the state dict holds quantized weights (by content, as convert_for_checkpoint reads them)."""
    if any(k.endswith(".scales_and_zeros") for k in state_dict):
        return "int4"
    if any(isinstance(v, Tensor) and v.dtype == torch.int8 for v in state_dict.values()):
        return "int8"
    return None


def load_checkpoint_model(checkpoint_path) -> Transformer:
    """The plain model of a checkpoint, its config beside it, weights on the CPU (memory-mapped) in the checkpoint's
    dtype; quantized layers wherever the tensors are quantized. No kernels, no device: generate.place does that."""
    checkpoint_path = Path(checkpoint_path)
    state_dict = read_state_dict(checkpoint_path)
    args = ModelArgs.from_checkpoint(checkpoint_path)
    tied = args.tie_embeddings and "output.weight" not in state_dict  # a quantized output layer has its own weights
    if tied and "tok_embeddings.weight" in state_dict:
        state_dict["output.weight"] = state_dict["tok_embeddings.weight"]
    with torch.device("meta"):
        model = Transformer(args)
    convert_for_checkpoint(model, state_dict)
    check_state_dict(model, state_dict, f" ({checkpoint_path.parent / 'config'})")
    model.load_state_dict(state_dict, assign=True)
    if tied:
        model.output.weight = model.tok_embeddings.weight
    return model.eval()


def save_atomic(obj, path: Path, save: Optional[Callable] = None) -> None:
    """save(obj, file) into a temporary file beside path, renamed onto path only once complete: an interrupted or
    failed write leaves path as it was."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            (save or torch.save)(obj, f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's file is private; the output gets a new file's usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------- GPTQ


class HessianHook:
    """Accumulates H = 2 X^T X / n over the inputs X of the linear layers it is attached to."""

    def __init__(self, layers: list):
        self.H, self.n = {}, {}
        self.handles = [lin.register_forward_hook(self.hook(name)) for name, lin in layers]

    def hook(self, name):
        def fn(_module, args, _out):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            n = self.n.get(name, 0)
            H = self.H.get(name, torch.zeros(x.shape[1], x.shape[1], device=x.device))
            self.H[name] = H * (n / (n + x.shape[0])) + (x.t() @ x) * (2.0 / (n + x.shape[0]))
            self.n[name] = n + x.shape[0]

        return fn

    def remove(self):
        for h in self.handles:
            h.remove()


@torch.no_grad()
def gptq_quantize_model(model: Transformer, inputs: Tensor, groupsize: int) -> None:
    """GPTQ block by block: each block's layers are calibrated on the outputs of the already quantized blocks
    before it, so memory holds one block's Hessians at a time. inputs: calibration tokens [B, S]."""
    model.setup_caches(inputs.shape[0], inputs.shape[1])
    input_pos = torch.arange(inputs.shape[1], device=inputs.device)
    mask, freqs = model.causal_mask[None, None, input_pos], model.freqs_cis[input_pos]
    x = model.tok_embeddings(inputs)  # [B, S, dim]
    stages = [(f"layers.{i}", b, lambda b, x: b(x, input_pos, freqs, mask)) for i, b in enumerate(model.layers)]
    stages.append(("", model, lambda m, x: m.output(m.norm(x))))
    for prefix, module, run in stages:
        layers = [(n, m) for n, m in linear_layers(module) if prefix or n == "output"]
        layers = [(n, m) for n, m in layers if int4_fits(m.in_features, groupsize)]
        hooks = HessianHook(layers)
        run(module, x)
        hooks.remove()
        for name, lin in layers:
            set_module(module, name, int4_layer(lin, *gptq_quantize(lin.weight.data, hooks.H[name], groupsize)))
        if prefix:
            x = run(module, x)


@torch.no_grad()
def gptq_quantize(w: Tensor, H: Tensor, groupsize: int, blocksize: int = 128, damp: float = 0.01) -> tuple[Tensor, Tensor]:
    """GPTQ (Frantar et al. 2022): quantize columns in order, pushing each one's error onto the columns not yet
    quantized through the inverse Hessian; group parameters are set from the updated weights of each group."""
    W = w.float().clone()  # [N, K]
    N, K = W.shape
    H = H.float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(K, dtype=H.dtype, device=H.device)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    blocksize = max(blocksize // groupsize, 1) * groupsize  # groups never straddle blocks
    Q = torch.zeros_like(W, dtype=torch.int32)
    scales, zeros = torch.zeros(N, K // groupsize, dtype=W.dtype, device=W.device), torch.zeros(N, K // groupsize, dtype=W.dtype, device=W.device)
    for i1 in range(0, K, blocksize):
        i2 = min(i1 + blocksize, K)
        W1, Hinv1, Err1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2], torch.zeros(N, i2 - i1, dtype=W.dtype, device=W.device)
        for i in range(i2 - i1):
            col = i1 + i
            g = col // groupsize
            if col % groupsize == 0:
                s, z = int4_group_params(W1[:, i : i + groupsize], groupsize)
                scales[:, g], zeros[:, g] = s[:, 0], z[:, 0]
            q = torch.clamp(torch.round((W1[:, i] - zeros[:, g]) / scales[:, g]) + 8, 0, 15)
            Q[:, col] = q.to(torch.int32)
            err = (W1[:, i] - ((q - 8) * scales[:, g] + zeros[:, g])) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return pack_int4(Q, scales.float(), zeros.float(), w.dtype)


def calibration_tokens(path: Path, tokenizer, n_samples: int, seq_len: int) -> Tensor:
    """n_samples windows of seq_len tokens from a local text file -> [n, S]."""
    ids = tokenizer.encode(path.read_text(encoding="utf-8", errors="replace"), bos=False)
    if len(ids) < seq_len:
        raise ValueError(f"{path} has {len(ids)} tokens, fewer than --calibration_seq_len {seq_len}")
    step = max((len(ids) - seq_len) // max(n_samples - 1, 1), 1)
    rows = [ids[i : i + seq_len] for i in range(0, len(ids) - seq_len + 1, step)][:n_samples]
    return torch.tensor(rows, dtype=torch.int)


# ---------------------------------------------------------------- command line


def output_path(checkpoint_path: Path, mode: str, groupsize: int) -> Path:
    name = "model_int8.pth" if mode == "int8" else f"model_{mode}.g{groupsize}.pth"
    return checkpoint_path.parent / name


def unquantized_weights(state_dict: dict, mode: str, groupsize: int) -> list[str]:
    """Float matmul weights that mode should have quantized: every one but the embedding, except, for int4, those
    whose width int4_fits refuses and Mixtral's experts (int4 covers linear layers only)."""
    left = []
    for k, v in state_dict.items():
        if not v.is_floating_point() or v.dim() < 2 or k == "tok_embeddings.weight":
            continue
        if mode != "int8" and (v.dim() == 3 or not int4_fits(v.shape[-1], groupsize)):
            continue
        left.append(k)
    return left


def quantize_checkpoint(checkpoint_path: Path, out: Path, mode: str, groupsize: int, device, gptq_inputs=None) -> None:
    """Quantize a float checkpoint on device and write it to out. The weights keep the checkpoint's dtype until the
    quantizers, which work in float32: the same codes on every device."""
    fmt = quantized_format(read_state_dict(checkpoint_path))
    if fmt is not None:
        raise ValueError(f"{checkpoint_path} is already quantized ({fmt}): start from the float model.pth")
    if Path(out).resolve() == Path(checkpoint_path).resolve():
        raise ValueError(f"the output {out} would overwrite the input: start from the float model.pth")
    model = load_checkpoint_model(checkpoint_path)
    quantize_model(model.to(device), mode, groupsize, gptq_inputs=gptq_inputs)
    state_dict = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v).cpu() for k, v in model.state_dict().items()}
    left = unquantized_weights(state_dict, mode, groupsize)
    if left:  # a model with kernels swapped in hides its linear layers from the quantizer
        raise ValueError(f"{len(left)} weights were not quantized to {mode} ({left[0]}, ...): nothing written")
    save_atomic(state_dict, out)


def main(argv=None):
    p = argparse.ArgumentParser(description="Quantize a model.pth to int8 or int4 weights.")
    p.add_argument("--checkpoint_path", type=Path, default=Path("checkpoints/meta-llama/Llama-2-7b-chat-hf/model.pth"), help="the bf16 model.pth to quantize")
    p.add_argument("--mode", choices=["int8", "int4", "int4-gptq"], default="int8", help="int8 per-channel, int4 groupwise, or int4 with GPTQ")
    p.add_argument("--groupsize", type=int, default=32, help=f"int4 group size, one of {GROUPSIZES}")
    p.add_argument("--calibration_file", type=Path, default=None, help="int4-gptq: local text file to calibrate on")
    p.add_argument("--calibration_samples", type=int, default=32, help="int4-gptq: number of calibration windows")
    p.add_argument("--calibration_seq_len", type=int, default=512, help="int4-gptq: tokens per calibration window")
    p.add_argument("--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu", help="where to run the quantization")
    args = p.parse_args(argv)
    if args.mode == "int4-gptq" and (args.calibration_file is None or not args.calibration_file.is_file()):
        raise SystemExit(f"error: int4-gptq needs --calibration_file pointing to a local text file (got {args.calibration_file})")
    if args.mode != "int8" and args.groupsize not in GROUPSIZES:
        raise SystemExit(f"error: --groupsize {args.groupsize} is not one of {GROUPSIZES}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no GPU is visible: pass --device cpu")
    out = output_path(args.checkpoint_path, args.mode, args.groupsize)
    from tokenizer import get_tokenizer

    t0 = time.time()
    try:
        inputs = None
        if args.mode == "int4-gptq":
            tok = get_tokenizer(args.checkpoint_path.parent / "tokenizer.model")
            inputs = calibration_tokens(args.calibration_file, tok, args.calibration_samples, args.calibration_seq_len).to(args.device)
        quantize_checkpoint(args.checkpoint_path, out, args.mode, args.groupsize, args.device, inputs)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"Wrote {out} in {time.time() - t0:.1f} s ({out.stat().st_size / 1e9:.2f} GB)")


if __name__ == "__main__":
    main()
