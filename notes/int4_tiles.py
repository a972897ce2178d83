"""Session 12 (README, "The int4 GEMV"; quantize.INT4_DECODE_TILE): int4 GEMV tiles on cold weights, one row.
A CUDA graph of 12 layers (wqkv, wo + residual, gated w1/w3, w2 + residual; distinct weights, PDL) with one tile for
every call, and per shape (12 copies of one shape). The first column is quantize.gemv's default; it was the
autotuner's pick when measured (session 12), INT4_DECODE_TILE since.
usage (CUDA): python notes/int4_tiles.py"""

import sys
from pathlib import Path

import torch
import triton

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]
from kernel_bench import gemv_bytes, graph_us_per_call, random_gemv_weights  # noqa: E402

import quantize as q  # noqa: E402
from generate import measure_read_bandwidth  # noqa: E402


def int4(N, K, dev):
    return random_gemv_weights("int4", N, K, dev)[:2]  # codes, scales and zeros


def main():
    dev = torch.device("cuda")
    bw = measure_read_bandwidth(dev)
    print(f"torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}, read bandwidth {bw:.0f} GB/s", flush=True)
    x4, x11 = torch.randn(1, 4096, device=dev, dtype=torch.bfloat16), torch.randn(1, 11008, device=dev, dtype=torch.bfloat16)
    r = torch.randn(1, 4096, device=dev, dtype=torch.bfloat16)
    layers = []
    for _ in range(12):
        wqkv, wo, w1, w3, w2 = int4(12288, 4096, dev), int4(4096, 4096, dev), int4(11008, 4096, dev), int4(11008, 4096, dev), int4(4096, 11008, dev)
        w13 = (torch.cat([w1[0], w3[0]]), torch.cat([w1[1], w3[1]], 1))
        layers.append({"wqkv": (x4, wqkv, {}), "wo": (x4, wo, {"residual": r}), "w13": (x4, w13, {"gated": True}), "w2": (x11, w2, {"residual": r})})
    configs = [None] + [dict(BLOCK_N=4, BLOCK_C=32 * w, num_warps=w) for w in (1, 2, 4, 8)]
    for name in ("chain", "wqkv", "wo", "w13", "w2"):
        names = ("wqkv", "wo", "w13", "w2") if name == "chain" else (name,)
        calls_in = [layer[n] for layer in layers for n in names]
        total = sum(gemv_bytes(*w) for _, w, _ in calls_in)
        cells = []
        for cfg in configs:
            calls = [lambda x=x, w=w, kw=kw, cfg=cfg: q.gemv(x, w[0], w[1], 32, pdl=True, **kw, **(cfg or {})) for x, w, kw in calls_in]
            us = graph_us_per_call(calls)
            cells.append(f"{us:.2f} us ({100 * total / len(calls) / us / 1e3 / bw:.1f}%)")
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    print("columns: quantize.gemv's default, then BLOCK_N 4 with 1, 2, 4, 8 warps")


if __name__ == "__main__":
    main()
