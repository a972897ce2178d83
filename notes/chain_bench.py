"""Session 11's chain experiments (README, "What a GEMV costs in a decode step"; notes/perf.md, calls 8-12).

A CUDA graph of int8 GEMVs as a decode step orders them (wqkv, wo, w1 and w3 as one, w2; 12 layers of distinct
weights, so nothing is in L2), launched with PDL, each on a copy of today's int8 loop that can:
  wait    wait for the kernel before it, then let the next one in after its loop (as quantize.int8_gemv_kernel)
  nowait  let the next one in at once and never wait (wrong results: the bound for overlap)
  pre2    load two weight tiles before the wait, and let the next one in right after it
  l2      as wait, then prefetch into L2 the first 512 bytes of every row of the next call's matrix
usage (CUDA): python notes/chain_bench.py
"""

import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]
from kernel_bench import gemv_bytes, graph_us_per_call, random_gemv_weights  # noqa: E402

import quantize as q  # noqa: E402
from generate import measure_read_bandwidth  # noqa: E402
from quantize import int8_to_float  # noqa: E402


@triton.jit
def tile_dot(acc, w, x_ptr, m, k, K):
    x = tl.load(x_ptr + m * K + k, mask=k < K, other=0.0).to(tl.float32)
    return acc + int8_to_float(w) * x[None, :]


@triton.jit
def prefetch_rows(nxt_ptr, NXT_ROWS, NXT_STRIDE, PF_ROWS: tl.constexpr):
    """This program's share of the next matrix's first 512 bytes per row, into L2 (128-byte lines)."""
    r = tl.program_id(1) + tl.num_programs(1) * tl.arange(0, PF_ROWS)  # rows pid, pid + P, ...
    addr = nxt_ptr + r[:, None] * NXT_STRIDE + 128 * tl.arange(0, 4)[None, :]
    addr = tl.where(r[:, None] < NXT_ROWS, addr, nxt_ptr)
    tl.inline_asm_elementwise("prefetch.global.L2::evict_last [$1]; mov.u32 $0, 0;", "=r,l", [addr], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def chain_gemv_kernel(
    x_ptr, w_ptr, s_ptr, y_ptr, nxt_ptr, N, K, NXT_ROWS, NXT_STRIDE,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, MODE: tl.constexpr, PF_ROWS: tl.constexpr,
):  # fmt: skip
    m, pid_n = tl.program_id(0), tl.program_id(1)
    offs_n, offs_k = pid_n * BLOCK_N + tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_K)
    rows, live = w_ptr + offs_n[:, None] * K, offs_n[:, None] < N
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    first = 0
    if MODE == "nowait":
        tl.extra.cuda.gdc_launch_dependents()
    elif MODE == "pre2":
        w0 = tl.load(rows + offs_k[None, :], mask=live & (offs_k[None, :] < K), other=0)
        w1 = tl.load(rows + BLOCK_K + offs_k[None, :], mask=live & (BLOCK_K + offs_k[None, :] < K), other=0)
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
        acc = tile_dot(tile_dot(acc, w0, x_ptr, m, offs_k, K), w1, x_ptr, m, BLOCK_K + offs_k, K)
        first = 2 * BLOCK_K
    else:
        tl.extra.cuda.gdc_wait()
    for k0 in range(first, K, BLOCK_K):
        k = k0 + offs_k
        acc = tile_dot(acc, tl.load(rows + k[None, :], mask=live & (k[None, :] < K), other=0), x_ptr, m, k, K)
    if MODE == "l2":
        prefetch_rows(nxt_ptr, NXT_ROWS, NXT_STRIDE, PF_ROWS)
    if MODE == "wait" or MODE == "l2":
        tl.extra.cuda.gdc_launch_dependents()
    y = tl.sum(acc, axis=1) * tl.load(s_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
    tl.store(y_ptr + m * N + offs_n, y.to(y_ptr.dtype.element_ty), mask=offs_n < N)


LAYER = [(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008)]  # wqkv, wo, w1 and w3 as one, w2


def chain_weights(dev) -> tuple[list, dict, dict, float]:
    """12 layers of distinct int8 weights [(codes, scales)], an input per K, an output per N, mean bytes per GEMV."""
    mats = [random_gemv_weights("int8", N, K, dev)[:2] for _ in range(12) for N, K in LAYER]
    xs = {K: torch.randn(1, K, device=dev, dtype=torch.bfloat16) for K in (4096, 11008)}
    ys = {N: torch.empty(1, N, device=dev, dtype=torch.bfloat16) for N, _ in LAYER}
    return mats, xs, ys, sum(gemv_bytes(c, s) for c, s in mats) / len(mats)


def chain_calls(mats, xs, ys, bn: int, bk: int, mode: str) -> list:
    """One chain_gemv_kernel launch per matrix (tile bn x bk, 4 warps, PDL), in order."""
    calls = []
    for i, (c, s) in enumerate(mats):
        (N, K), nxt = c.shape, mats[(i + 1) % len(mats)][0]
        grid = (1, triton.cdiv(N, bn))
        pf_rows = triton.next_power_of_2(triton.cdiv(nxt.shape[0], grid[1]))
        args = (xs[K], c, s, ys[N], nxt, N, K, nxt.shape[0], nxt.shape[1])
        meta = dict(BLOCK_N=bn, BLOCK_K=bk, MODE=mode, PF_ROWS=pf_rows, num_warps=4, launch_pdl=True)
        calls.append(lambda g=grid, a=args, kw=meta: chain_gemv_kernel[g](*a, **kw))
    return calls


def main():
    dev = torch.device("cuda")
    bw = measure_read_bandwidth(dev)
    print(f"torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}, read bandwidth {bw:.0f} GB/s")
    mats, xs, ys, mean_bytes = chain_weights(dev)
    pct = lambda us: 100 * mean_bytes / us / 1e3 / bw  # noqa: E731
    us = graph_us_per_call([lambda c=c, s=s: q.gemv(xs[c.shape[1]], c, s, pdl=True) for c, s in mats])
    print(f"quantize.gemv (autotuned tiles): {us:.2f} us per call, {pct(us):.1f}%")
    for bn, bk in ((4, 1024), (8, 256)):
        for mode in ("wait", "nowait", "pre2", "l2"):
            us = graph_us_per_call(chain_calls(mats, xs, ys, bn, bk, mode))
            print(f"tile {bn} x {bk}, {mode}: {us:.2f} us per call, {pct(us):.1f}%")


if __name__ == "__main__":
    main()
