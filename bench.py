"""Run generate.py over a matrix of settings and print one markdown table (optionally JSON and a PNG plot).

Each setting runs in its own process, so compile caches, memory peaks and CUDA graphs do not mix.
"""

import argparse
import itertools
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
PATTERNS = {
    "tok_s": r"Average decode tokens/s: ([\d.]+)",
    "ttft_ms": r"Average time to first token: ([\d.]+) ms",
    "gb_s": r"Average bandwidth achieved: ([\d.]+) GB/s",
    "card_gb_s": r"Measured read bandwidth of this card: ([\d.]+) GB/s",
    "pct": r"achieved ([\d.]+)%",
    "compile_s": r"Compilation and warm-up: ([\d.]+) s",
    "load_s": r"Loaded model in ([\d.]+) s",
    "mean_accepted": r"mean ([\d.]+) tokens per target forward",
}


def weight_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of weights one decode step reads at batch 1: every tensor once, but only one row of an untied
    embedding and, in a mixture of experts, only the activated experts (top-k of E)."""
    per_storage, cfg = {}, model.config  # tied or fused weights (views of one storage) count once
    for name, t in itertools.chain(model.named_parameters(), model.named_buffers()):
        if name.endswith(("kv_cache.kv", "freqs_cis", "causal_mask", "row_start")):
            continue
        share = cfg.num_activated_experts / cfg.num_experts if ".cond_ffn." in name else 1.0
        key = t.untyped_storage().data_ptr()
        per_storage[key] = max(per_storage.get(key, 0), int(t.numel() * t.element_size() * share))
    total = sum(per_storage.values())
    emb = model.tok_embeddings.weight
    if model.output.weight.data_ptr() != emb.data_ptr():
        total -= (emb.shape[0] - 1) * emb.shape[1] * emb.element_size()
    return total


@torch.no_grad()
def measure_read_bandwidth(device, gib: float = 4.0, iters: int = 20) -> float:
    """The card's read bandwidth in GB/s: median time of a full-tensor sum over `gib` GiB (reads only)."""
    if device.type != "cuda":
        return float("nan")
    x = torch.randn(int(gib * 2**30) // 2, dtype=torch.bfloat16, device=device)  # random data: zeros can run faster
    times = []
    for i in range(iters + 3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        x.sum(dtype=torch.float32)
        end.record()
        torch.cuda.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end) / 1e3)
    nbytes = x.numel() * x.element_size()
    del x
    torch.cuda.empty_cache()
    return nbytes / sorted(times)[len(times) // 2] / 1e9


def parse(out: str) -> dict:
    row = {k: float(m[-1]) for k, p in PATTERNS.items() if (m := re.findall(p, out))}
    if row.get("tok_s"):
        row["ms_token"] = 1e3 / row["tok_s"]  # per-token decode latency, apart from the time to first token
    mem = re.findall(r"memory ([\d.]+) GB", out)
    if mem:
        row["memory_gb"] = max(float(x) for x in mem)
    return row


def settings(a) -> list[dict]:
    rows = []
    for precision, compile_, spec, batch, prompt in itertools.product(
        a.precisions, a.compile, a.speculate, a.batch_sizes, a.prompt_lengths
    ):
        if spec != "none" and batch != 1:
            continue  # speculative decoding runs at batch 1
        rows.append(dict(precision=precision, compile=compile_, speculate=spec, batch_size=batch, prompt_len=prompt))
    return rows


def command(a, s: dict) -> list[str]:
    cmd = [
        sys.executable,
        str(ROOT / "generate.py"),
        "--prompt",
        str(s["prompt_len"]),
        "--max_new_tokens",
        str(a.max_new_tokens),
    ]
    cmd += [
        "--num_samples",
        str(a.num_samples),
        "--batch_size",
        str(s["batch_size"]),
        "--device",
        a.device,
        "--ignore_eos",
    ]
    if s["precision"] == "bf16":
        cmd += ["--precision", "bf16"]  # also on the CPU, where generate.py's default is float32
    if a.random_init:
        cmd += ["--random_init", a.random_init]
        if s["precision"] != "bf16":
            cmd += ["--quantize", s["precision"]]
        if "int4" in (s["precision"], s["speculate"].removeprefix("draft-")):
            cmd += ["--groupsize", str(a.groupsize)]
    else:
        suffix = {"bf16": "model.pth", "int8": "model_int8.pth", "int4": f"model_int4.g{a.groupsize}.pth"}[
            s["precision"]
        ]
        cmd += ["--checkpoint_path", str(a.checkpoint_path.parent / suffix)]
    if s["compile"] == "on":
        cmd += ["--compile"]
    if s["speculate"] == "ngram":
        cmd += ["--speculate", "ngram", "--speculate_k", str(a.speculate_k)]
    elif s["speculate"].startswith("draft"):
        draft = s["speculate"].split("-", 1)[1]  # e.g. draft-int4
        if a.random_init:
            cmd += ["--draft_quantize", draft, "--speculate_k", str(a.speculate_k)]
        else:
            cmd += [
                "--draft_checkpoint_path",
                str(a.checkpoint_path.parent / f"model_{draft}.g{a.groupsize}.pth"),
                "--speculate_k",
                str(a.speculate_k),
            ]
    return cmd + a.extra


def progress(row: dict) -> str:
    """One finished row in a line: decode tokens/s, first token, % of the read bandwidth, memory, seconds."""
    if "tok_s" not in row:
        return f"error: {row.get('error', 'no figures in the output')}"
    figures = [f"{row['tok_s']:.1f} tokens/s per sequence"]
    for key, fmt in (("ttft_ms", "first token {:.1f} ms"), ("pct", "{:.1f}% of read BW"), ("memory_gb", "{:.1f} GB")):
        if key in row:
            figures.append(fmt.format(row[key]))
    return ", ".join(figures + [f"{row['wall_s']:.0f} s"])


def table(rows: list[dict]) -> str:
    columns = {
        "precision": "precision", "compile": "compile", "speculate": "speculate", "batch_size": "batch",
        "prompt_len": "prompt",
        "tok_s": "tokens/s per sequence", "total_tok_s": "tokens/s in total", "ms_token": "ms/token",
        "ttft_ms": "TTFT ms", "gb_s": "GB/s", "pct": "% of read BW",
        "card_gb_s": "card read GB/s", "compile_s": "compile s", "memory_gb": "memory GB",
    }  # fmt: skip
    cols, names = list(columns), list(columns.values())
    lines = ["| " + " | ".join(names) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [r.get(c, "error" if c == "tok_s" else "") for c in cols]
        lines.append("| " + " | ".join(f"{c:.1f}" if isinstance(c, float) else str(c) for c in cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Over batch sizes: tokens/s per sequence and in total; over prompt lengths: time to first token; else a bar
    per setting. One line per weight format (and compile and speculation setting)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("error: --plot needs matplotlib: pip install matplotlib") from None
    over = next((k for k in ("batch_size", "prompt_len") if len({r[k] for r in rows}) > 1), None)
    if over is None:
        labels = [
            f"{r['precision']} c={r['compile']} s={r['speculate']} b={r['batch_size']} p={r['prompt_len']}"
            for r in rows
        ]
        fig, ax = plt.subplots(figsize=(8, 0.35 * len(rows) + 1))
        ax.barh(labels, [r.get("tok_s", 0) for r in rows])
        ax.set_xlabel("decode tokens/s")
    else:
        panels = [("tok_s", "tokens/s per sequence"), ("total_tok_s", "tokens/s in total")]
        if over == "prompt_len":
            panels = [("ttft_ms", "time to first token, ms"), ("tok_s", "decode tokens/s")]
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        lines = {}
        for r in rows:
            lines.setdefault((r["precision"], r["compile"], r["speculate"]), []).append(r)
        for ax, (key, name) in zip(axes, panels, strict=True):
            for (precision, compiled, spec), rs in lines.items():
                pts = [(r[over], r[key]) for r in rs if key in r]
                label = precision + ("" if compiled == "on" else " eager") + ("" if spec == "none" else f" {spec}")
                if pts:
                    ax.plot(*zip(*pts, strict=True), marker="o", label=label)
            ax.set_xscale("log", base=2)
            if key == "ttft_ms":  # from a few ms to seconds
                ax.set_yscale("log")
            ax.set_xlabel("batch size" if over == "batch_size" else "prompt tokens")
            ax.set_ylabel(name)
            ax.grid(alpha=0.3)
            ax.legend()
    fig.tight_layout()
    from quantize import save_atomic

    save_atomic(fig, path, lambda fig, f: fig.savefig(f, format=Path(path).suffix.lstrip(".") or "png"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Benchmark generate.py over a matrix of settings.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--random_init", "--model", type=str, help="named config with random weights (no download needed)")
    src.add_argument("--checkpoint_path", type=Path, help="model.pth; its int8/int4 files are looked for beside it")
    p.add_argument(
        "--precisions",
        nargs="+",
        default=["bf16", "int8", "int4"],
        choices=["bf16", "int8", "int4"],
        help="weight formats to run",
    )
    p.add_argument("--compile", nargs="+", default=["on"], choices=["on", "off"], help="compile settings to run")
    p.add_argument("--speculate", nargs="+", default=["none"], help="none, ngram, draft-int4, draft-int8")
    p.add_argument("--batch_sizes", nargs="+", type=int, default=[1], help="batch sizes to run")
    p.add_argument(
        "--prompt_lengths", nargs="+", type=int, default=[16], help="synthetic prompt lengths (e.g. 16 2048)"
    )
    p.add_argument("--max_new_tokens", type=int, default=200, help="tokens generated per sample")
    p.add_argument("--num_samples", type=int, default=3, help="samples per setting (after the warm-up one)")
    p.add_argument("--groupsize", type=int, default=32, help="int4 group size")
    p.add_argument("--speculate_k", type=int, default=5, help="speculated tokens per step")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    p.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    p.add_argument(
        "--plot", type=Path, default=None, help="also draw tokens/s per setting to this PNG (needs matplotlib)"
    )
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="further arguments passed to generate.py")
    a = p.parse_args(argv)
    check_context(a)
    return a


def check_context(a) -> None:
    """A named config's prompts must fit its context with the new tokens: say so before the first process starts
    rather than as a row of errors after minutes of others."""
    if not a.random_init:
        return  # a checkpoint's context is in its config.json: generate.py checks it and the row says why
    from model import ModelArgs

    try:
        context = ModelArgs.from_name(a.random_init).block_size
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    longest = max(a.prompt_lengths) + a.max_new_tokens
    if longest > context:
        raise SystemExit(
            f"error: --prompt_lengths {max(a.prompt_lengths)} + --max_new_tokens {a.max_new_tokens} = {longest} "
            f"exceeds {a.random_init}'s context of {context}: use a longer-context config (Llama-3.1-8B: 131072)"
        )


def main(argv=None):
    a = parse_args(argv)
    rows = []
    for s in settings(a):
        cmd = command(a, s)
        t0 = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        row = {**s, **parse(proc.stdout), "wall_s": round(time.time() - t0, 1)}
        if "tok_s" in row:
            row["total_tok_s"] = row["tok_s"] * s["batch_size"]
        if proc.returncode != 0:
            row["error"] = (proc.stderr.strip().splitlines() or ["failed"])[-1][:200]
        print(f"{s} -> {progress(row)}", file=sys.stderr, flush=True)  # each row as it ends: a cut-short run keeps them
        rows.append(row)
    print(table(rows))
    if a.json:
        from quantize import save_atomic

        save_atomic(json.dumps(rows, indent=2).encode(), a.json)
    if a.plot:
        plot(rows, a.plot)


if __name__ == "__main__":
    main()
