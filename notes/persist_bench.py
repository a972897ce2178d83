"""Session 12 (README, "Measured next"; notes/perf.md): one persistent kernel runs the chain of 48 int8 GEMVs of
notes/chain_bench.py (12 layers of wqkv, wo, w1 and w3 as one, w2; distinct weights), its CTAs meeting at a grid
barrier (an atomic counter) between GEMVs, against one kernel per GEMV launched with PDL.

Variants: CTAs per SM (C; all must be resident, so C is capped by registers), tile BLOCK_N x BLOCK_K, warps, PRE
weight chunks loaded before the barrier's wait, ORDER of a GEMV's tiles over the CTAs (round robin or contiguous
blocks), and SYNC off (wrong results: the bound without the barrier).
usage (CUDA): python notes/persist_bench.py [quick | second]   (second: more warps per SM, larger tiles)
"""

import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]
from chain_bench import chain_calls, chain_weights  # noqa: E402  (beside this file)
from kernel_bench import graph_us_per_call  # noqa: E402

import quantize as q  # noqa: E402
from generate import measure_read_bandwidth  # noqa: E402
from quantize import int8_to_float  # noqa: E402


@triton.jit
def dot_chunk(acc, w, x_ptr, k, K):
    x = tl.load(x_ptr + k, mask=k < K, other=0.0, cache_modifier=".cg").to(tl.float32)  # .cg: another CTA wrote x
    return acc + int8_to_float(w) * x[None, :]


@triton.jit
def do_tile(acc, rows, live, x_ptr, K, first, BLOCK_K: tl.constexpr):
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(first, K, BLOCK_K):
        k = k0 + offs_k
        acc = dot_chunk(acc, tl.load(rows + k[None, :], mask=live & (k[None, :] < K), other=0), x_ptr, k, K)
    return acc


@triton.jit
def store_tile(acc, s_ptr, y_ptr, offs_n, N):
    y = tl.sum(acc, axis=1) * tl.load(s_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty), mask=offs_n < N)


@triton.jit
def persist_chain_kernel(
    meta_ptr, w_ptr, s_ptr, buf_ptr, cnt_ptr, P, MAXSPIN,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRE: tl.constexpr, SYNC: tl.constexpr, ORDER: tl.constexpr,
):  # fmt: skip
    pid, G = tl.program_id(0), tl.num_programs(0)
    offs_k = tl.arange(0, BLOCK_K)
    for p in range(P):
        w_off, s_off = tl.load(meta_ptr + 6 * p), tl.load(meta_ptr + 6 * p + 1)
        N, K = tl.load(meta_ptr + 6 * p + 2).to(tl.int32), tl.load(meta_ptr + 6 * p + 3).to(tl.int32)
        x_off, y_off = tl.load(meta_ptr + 6 * p + 4), tl.load(meta_ptr + 6 * p + 5)
        N, K = tl.multiple_of(N, 16), tl.multiple_of(K, 16)  # every shape here: 16-byte loads
        w_off, s_off, x_off, y_off = tl.multiple_of(w_off, 16), tl.multiple_of(s_off, 16), tl.multiple_of(x_off, 16), tl.multiple_of(y_off, 16)
        n_tiles = tl.cdiv(N, BLOCK_N)
        if ORDER == "rr":
            t_first, t_end, t_step = pid, n_tiles, G
        else:
            t_first, t_end, t_step = pid * n_tiles // G, (pid + 1) * n_tiles // G, 1
        wp, sp, xp, yp = w_ptr + w_off, s_ptr + s_off, buf_ptr + x_off, buf_ptr + y_off
        offs_n = t_first * BLOCK_N + tl.arange(0, BLOCK_N)
        rows = wp + offs_n[:, None] * K  # int32: one matrix < 2 GB
        live = offs_n[:, None] < tl.where(t_first < t_end, N, 0)  # [BLOCK_N, 1]; no tile: nothing
        if PRE >= 1:
            w0 = tl.load(rows + offs_k[None, :], mask=live & (offs_k[None, :] < K), other=0)
        if PRE >= 2:
            w1 = tl.load(rows + BLOCK_K + offs_k[None, :], mask=live & (BLOCK_K + offs_k[None, :] < K), other=0)
        if SYNC:
            if p > 0:  # every CTA has finished phase p - 1
                c = tl.atomic_add(cnt_ptr, 0, sem="acquire", scope="gpu")
                spins = 0
                while (c < p * G) & (spins < MAXSPIN):
                    c = tl.atomic_add(cnt_ptr, 0, sem="acquire", scope="gpu")
                    spins += 1
                tl.debug_barrier()
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        if PRE >= 1:
            acc = dot_chunk(acc, w0, xp, offs_k, K)
        if PRE >= 2:
            acc = dot_chunk(acc, w1, xp, BLOCK_K + offs_k, K)
        acc = do_tile(acc, rows, live, xp, K, PRE * BLOCK_K, BLOCK_K)
        if t_first < t_end:
            store_tile(acc, sp, yp, offs_n, N)
        for t in range(t_first + t_step, t_end, t_step):
            on = t * BLOCK_N + tl.arange(0, BLOCK_N)
            acc = do_tile(tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32), wp + on[:, None] * K, on[:, None] < N, xp, K, 0, BLOCK_K)
            store_tile(acc, sp, yp, on, N)
        if SYNC:
            tl.debug_barrier()  # this CTA's stores before its release
            tl.atomic_add(cnt_ptr, 1, sem="release", scope="gpu")


def main():
    quick = "quick" in sys.argv
    dev = torch.device("cuda")
    bw = measure_read_bandwidth(dev)
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    print(f"torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}, {sms} SMs, read bandwidth {bw:.0f} GB/s")
    mats, xs, ys, mean_bytes = chain_weights(dev)
    shapes = [tuple(c.shape) for c, _ in mats]
    W = torch.cat([c.flatten() for c, _ in mats])
    S = torch.cat([s.flatten().float() for _, s in mats])
    # buf: x0 then each phase's output; phase p reads the first K of the output before it
    offs, meta, w_off, s_off = [0, 4096], [], 0, 0
    for N, K in shapes:
        meta.append([w_off, s_off, N, K, offs[-2], offs[-1]])
        w_off, s_off = w_off + N * K, s_off + N
        offs.append(offs[-1] + N)
    meta_t = torch.tensor(meta, dtype=torch.int64, device=dev)
    buf = torch.empty(offs[-1], dtype=torch.bfloat16, device=dev)
    cnt = torch.zeros(1, dtype=torch.int32, device=dev)
    pct = lambda us: 100 * mean_bytes / us / 1e3 / bw  # noqa: E731

    def check():
        errs = []
        for p, (N, K) in enumerate(shapes):
            x = buf[meta[p][4] : meta[p][4] + K].float()
            ref = (mats[p][0].float() @ x) * mats[p][1].float()
            y = buf[meta[p][5] : meta[p][5] + N].float()
            errs.append(((y - ref).norm() / ref.norm()).item())
        return max(errs)

    # one kernel per GEMV: today's autotuned kernel and chain_bench's 4 x 1024 "wait"
    us = graph_us_per_call([lambda c=c, s=s: q.gemv(xs[c.shape[1]], c, s, pdl=True) for c, s in mats])
    print(f"per-GEMV kernels, autotuned: {us:.2f} us per GEMV, {pct(us):.1f}%")
    us = graph_us_per_call(chain_calls(mats, xs, ys, 4, 1024, "wait"))
    print(f"per-GEMV kernels, 4 x 1024 wait: {us:.2f} us per GEMV, {pct(us):.1f}%")

    configs = []
    if "second" in sys.argv:  # more warps per SM and larger tiles, pre2 only
        for C, bn, bk, nw in ((3, 16, 512, 8), (3, 8, 1024, 8), (2, 32, 512, 8), (2, 16, 1024, 8), (4, 4, 2048, 4), (4, 16, 512, 4), (3, 32, 256, 8)):
            configs += [(C, bn, bk, nw, 2, "rr")]
    for C in () if "second" in sys.argv else (1, 2, 4) if not quick else (2,):
        for bn, bk, nw in ((4, 1024, 4), (8, 512, 4), (2, 2048, 4), (8, 1024, 8), (16, 512, 8)) if not quick else ((4, 1024, 4),):
            for pre in (0, 2):
                for order in ("rr", "blk"):
                    configs.append((C, bn, bk, nw, pre, order))
    rows = []
    for C, bn, bk, nw, pre, order in configs:
        grid = (sms * C,)
        kw = dict(BLOCK_N=bn, BLOCK_K=bk, PRE=pre, ORDER=order, num_warps=nw)
        k = persist_chain_kernel.warmup(meta_t, W, S, buf, cnt, len(shapes), 1 << 16, SYNC=True, grid=grid, **kw)
        k._init_handles()
        regs = k.n_regs
        max_c = 65536 // (((regs + 7) // 8 * 8) * 32 * nw)
        if C > max_c:
            print(f"C={C} {bn}x{bk} w{nw}: {regs} registers allow {max_c} CTAs per SM, skipped")
            continue
        res = {}
        for sync in (True, False):

            def run(sync=sync, grid=grid, kw=kw):
                cnt.zero_()
                persist_chain_kernel[grid](meta_t, W, S, buf, cnt, len(shapes), 1 << 16, SYNC=sync, **kw)

            buf.normal_()
            run()
            torch.cuda.synchronize()
            err = check() if sync else float("nan")
            us = graph_us_per_call([run]) / len(shapes)
            res[sync] = (us, err)
        (us_s, err), (us_n, _) = res[True], res[False]
        line = f"C={C} {bn}x{bk} w{nw} pre{pre} {order} r{regs}: sync {us_s:.2f} us ({pct(us_s):.1f}%, err {err:.1e}), nosync {us_n:.2f} ({pct(us_n):.1f}%)"
        print(line, flush=True)
        rows.append((res[True][0], line))
    print("\nbest five with the barrier:")
    for _, line in sorted(rows)[:5]:
        print(line)


if __name__ == "__main__":
    main()
