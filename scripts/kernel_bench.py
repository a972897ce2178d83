"""Check and time the decode matmul kernels on the GPU (our GEMVs, dequant_matmul, cuBLAS, tinygemm, inductor), per
Llama-2-7B layer shape, for --rows input rows (batch x tokens).

Prints, per shape: error against a float32 reference, microseconds (CUDA-graph replays, median), and GB/s. One
kernel replayed alone finds part of a matrix of up to 50 MB (the H100's L2) still cached: wo, w1/w3 and w2 read
above what DRAM gives. --cold times what a decode step sees instead: a graph of calls on distinct weight copies
(600 MB, not in L2), launched with PDL, and fits t = fixed cost + bytes / streaming rate per kernel.
usage: python scripts/kernel_bench.py [--rows 1] [--cold [--matmul]]
"""

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import kernels as k  # noqa: E402
import quantize as q  # noqa: E402
from bench import measure_read_bandwidth  # noqa: E402

SHAPES = {
    "wqkv": (12288, 4096),
    "wo": (4096, 4096),
    "w1/w3": (11008, 4096),
    "w2": (4096, 11008),
    "output": (32000, 4096),
}


def time_us(fn) -> float:
    return triton.testing.do_bench_cudagraph(fn, rep=200, return_mode="median") * 1e3


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rows", type=int, default=1, help="input rows (batch x tokens)")
    p.add_argument(
        "--cold", action="store_true", help="weights not in L2, as in a decode step: fixed cost and rate per kernel"
    )
    p.add_argument("--matmul", action="store_true", help="with --cold: time dequant_matmul instead of the GEMVs")
    a = p.parse_args()
    bw = measure_read_bandwidth(torch.device("cuda"))
    print(
        f"torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}, "
        f"read bandwidth {bw:.0f} GB/s"
    )
    if a.cold:
        return bench_cold(a.rows, bw, k.dequant_matmul if a.matmul else k.gemv)
    int8_torch = torch.compile(lambda x, w, s: F.linear(x, w.to(x.dtype)) * s)
    print("| layer | kernel | rel. err | us | GB/s | % of read BW |\n|---|---|---|---|---|---|")
    for name, (N, K) in SHAPES.items():
        bench_shape(f"{name} {N}x{K}", N, K, a.rows, bw, int8_torch)
    bench_gated(*SHAPES["w1/w3"], a.rows, bw)


def bench_shape(label: str, N: int, K: int, rows: int, bw: float, int8_torch) -> None:
    dev = torch.device("cuda")
    w = torch.randn(N, K, device=dev) * 0.02
    x = torch.randn(rows, K, device=dev, dtype=torch.bfloat16)
    wb = w.to(torch.bfloat16)
    c8, s8 = q.quantize_int8(wb)
    p4, sz = q.quantize_int4(wb, 32)
    packed = {t: torch.ops.aten._convert_weight_to_int4pack(p4, t) for t in (2, 4, 8)}  # inner k-tiles
    words = k.pack_int4_gemv(p4)
    ref = x.float() @ wb.float().t()
    ref8 = x.float() @ (c8.float() * s8.float()[:, None]).t()
    ref4 = x.float() @ q.dequantize_int4(p4, sz, torch.float32).t()
    b8, b4 = N * K + N * 2, N * K // 2 + sz.numel() * 2
    g, r = torch.rand(K, device=dev, dtype=torch.bfloat16) + 0.5, torch.randn(rows, N, device=dev, dtype=torch.bfloat16)
    xn = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5) * g.float()  # a fused block's norm
    nr = dict(norm=g, eps=1e-5, residual=r)
    cases = {
        "bf16 cuBLAS": (lambda: F.linear(x, wb), ref, N * K * 2),
        "bf16 triton": (lambda: k.gemv(x, wb), ref, N * K * 2),
        "int8 triton": (lambda: k.gemv(x, c8, s8), ref8, b8),
        "int8 inductor": (lambda: int8_torch(x, c8, s8), ref8, b8),
        **{
            f"int4 tinygemm k{t}": (lambda t=t: torch.ops.aten._weight_int4pack_mm(x, packed[t], 32, sz), ref4, b4)
            for t in (8, 4, 2)
        },
        "int4 triton": (lambda: k.gemv(x, words, sz, 32), ref4, b4),
        "bf16 dequant_matmul": (lambda: k.dequant_matmul(x, wb), ref, N * K * 2),
        "int8 dequant_matmul": (lambda: k.dequant_matmul(x, c8, s8), ref8, b8),
        "int4 dequant_matmul": (lambda: k.dequant_matmul(x, words, sz, 32), ref4, b4),
        "bf16 triton +norm +residual": (lambda: k.gemv(x, wb, **nr), xn @ wb.float().t() + r.float(), N * K * 2),
        "int8 triton +norm +residual": (
            lambda: k.gemv(x, c8, s8, **nr),
            xn @ (c8.float() * s8.float()[:, None]).t() + r.float(),
            b8,
        ),
        "int4 triton +norm +residual": (
            lambda: k.gemv(x, words, sz, 32, **nr),
            xn @ q.dequantize_int4(p4, sz, torch.float32).t() + r.float(),
            b4,
        ),
    }
    for kname, (fn, r, nbytes) in cases.items():
        print_row(label, kname, fn, r, nbytes, bw)
    tile = k.INT4_DECODE_TILE if x.shape[0] == 1 else k.int4_gemv_tuned.best_config
    print(f"| {label} | int4 triton tile: {tile}; dequant_matmul: {k.dequant_matmul_tuned.best_config} | | | | |")


def print_row(label: str, kname: str, fn, ref, nbytes: int, bw: float) -> None:
    err = float((fn().float() - ref).norm() / ref.norm())
    us = time_us(fn)
    print(
        f"| {label} | {kname} | {err:.1e} | {us:.1f} | {nbytes / us / 1e3:.0f} | {100 * nbytes / us / 1e3 / bw:.0f}% |"
    )


def bench_gated(N: int, K: int, rows: int, bw: float) -> None:
    """SwiGLU's silu(w1 x) * w3 x: two GEMVs and eager silu, mul against the one gated kernel (int8, int4 g32)."""
    dev = torch.device("cuda")
    x = torch.randn(rows, K, device=dev, dtype=torch.bfloat16)
    (c1, s1), (c3, s3) = (q.quantize_int8((torch.randn(N, K, device=dev) * 0.02).to(torch.bfloat16)) for _ in range(2))
    w13, s13 = torch.cat([c1, c3]), torch.cat([s1, s3])
    ref = F.silu(x.float() @ (c1.float() * s1.float()[:, None]).t()) * (
        x.float() @ (c3.float() * s3.float()[:, None]).t()
    )
    g = torch.rand(K, device=dev, dtype=torch.bfloat16) + 0.5
    xn = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5) * g.float()).to(torch.bfloat16)
    cases = {
        "int8 triton x2 + silu, mul": (lambda: F.silu(k.gemv(x, c1, s1)) * k.gemv(x, c3, s3), ref),
        "int8 gated triton": (lambda: k.gemv(x, w13, s13, gated=True), ref),
        "int8 gated triton +norm": (
            lambda: k.gemv(x, w13, s13, gated=True, norm=g, eps=1e-5),
            k.gemv(xn, w13, s13, gated=True).float(),
        ),
    }
    for kname, (fn, r) in cases.items():  # +norm: against the kernel without the norm, on the normalized input
        print_row(f"w1+w3 2x{N}x{K}", kname, fn, r, 2 * (N * K + N * 2), bw)
    wf13 = (torch.randn(2 * N, K, device=dev) * 0.02).to(torch.bfloat16)
    reff = F.silu(x.float() @ wf13[:N].float().t()) * (x.float() @ wf13[N:].float().t())
    print_row(f"w1+w3 2x{N}x{K}", "bf16 gated triton", lambda: k.gemv(x, wf13, gated=True), reff, 4 * N * K, bw)
    refn = k.gemv(xn, wf13, gated=True).float()
    print_row(
        f"w1+w3 2x{N}x{K}",
        "bf16 gated triton +norm",
        lambda: k.gemv(x, wf13, gated=True, norm=g, eps=1e-5),
        refn,
        4 * N * K,
        bw,
    )
    p4, sz = q.quantize_int4((torch.randn(2 * N, K, device=dev) * 0.02).to(torch.bfloat16), 32)  # [w1; w3]
    w4 = q.dequantize_int4(p4, sz, torch.float32)
    ref4 = F.silu(x.float() @ w4[:N].t()) * (x.float() @ w4[N:].t())
    words, sz1, sz3 = k.pack_int4_gemv(p4), sz[:, :N].contiguous(), sz[:, N:].contiguous()
    cases = {
        "int4 triton x2 + silu, mul": (
            lambda: F.silu(k.gemv(x, words[:N], sz1, 32)) * k.gemv(x, words[N:], sz3, 32),
            ref4,
        ),
        "int4 gated triton": (lambda: k.gemv(x, words, sz, 32, gated=True), ref4),
        "int4 gated triton +norm": (
            lambda: k.gemv(x, words, sz, 32, gated=True, norm=g, eps=1e-5),
            k.gemv(xn, words, sz, 32, gated=True).float(),
        ),
    }
    for kname, (fn, r) in cases.items():
        print_row(f"w1+w3 2x{N}x{K}", kname, fn, r, N * K + sz.numel() * 2, bw)


def graph_us_per_call(calls: list) -> float:
    """Median of 21 replays of one CUDA graph of the calls, per call (autotuning runs before the capture)."""
    for c in calls:
        c()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    times = []
    for _ in range(21):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(calls))
    return sorted(times)[10]


def random_gemv_weights(kind: str, N: int, K: int, device) -> tuple:
    """Random [N, K] weights (std 0.02) as kernels.gemv takes them after x: (w, scales, groupsize), bf16/int8/int4."""
    w = (torch.randn(N, K, device=device) * 0.02).to(torch.bfloat16)
    if kind == "int8":
        return (*q.quantize_int8(w), 0)
    if kind == "int4":
        packed, sz = q.quantize_int4(w, 32)
        return k.pack_int4_gemv(packed), sz, 32
    return w, None, 0


def gemv_bytes(*tensors) -> int:
    """Bytes a GEMV reads from its weight tensors (None for absent scales)."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def bench_cold(rows: int, bw: float, kernel) -> None:
    """Per kernel family, K = 4096 and N from 4096 to 32000: us per call of kernel (k.gemv or k.dequant_matmul) on
    weights not in L2 (each call of the graph reads its own copy, 600 MB in all), PDL launches, and the least-squares
    fit t = a + bytes / B."""
    dev = torch.device("cuda")
    print("| kernel | N x K | us | % of read BW |\n|---|---|---|---|")
    for kind in ("bf16", "int8", "int4"):
        points = []
        for N in (4096, 8192, 11008, 12288, 22016, 32000):
            K = 4096
            x = torch.randn(rows, K, device=dev, dtype=torch.bfloat16)
            weights = [random_gemv_weights(kind, N, K, dev)]
            nbytes = gemv_bytes(*weights[0][:2])
            weights += [random_gemv_weights(kind, N, K, dev) for _ in range(max(4, int(600e6 // nbytes)) - 1)]
            calls = [lambda x=x, args=args: kernel(x, *args, pdl=True) for args in weights]
            us = graph_us_per_call(calls)
            points.append((nbytes, us))
            print(f"| {kind} | {N}x{K} | {us:.2f} | {100 * nbytes / us / 1e3 / bw:.1f}% |")
            del calls, weights
            torch.cuda.empty_cache()
        b, t = torch.tensor(points, dtype=torch.float64).unbind(1)
        slope = float(((b - b.mean()) * (t - t.mean())).sum() / ((b - b.mean()) ** 2).sum())
        print(
            f"| {kind} | fit | {float(t.mean() - slope * b.mean()):.2f} us per call "
            f"+ bytes at {1e-3 / slope:.0f} GB/s | |"
        )


if __name__ == "__main__":
    main()
