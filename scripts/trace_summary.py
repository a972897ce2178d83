"""Where a decode step's GPU time goes: summarize a trace written by `generate.py --profile NAME`.

Prints the GPU kernels grouped by name (launches, total and mean microseconds), how busy the GPU was
between the first and the last kernel, and the launches per decode step.
usage: python scripts/trace_summary.py NAME.json [--steps 199] [--top 30]
"""

import argparse
import json
from collections import defaultdict


def kernel_events(trace: dict) -> list[dict]:
    return [e for e in trace.get("traceEvents", []) if e.get("cat") == "kernel" and e.get("ph") == "X"]


def summarize(events: list[dict]) -> dict:
    """Per kernel name: [launches, total us]; plus the busy time and the span from first start to last end."""
    by_name = defaultdict(lambda: [0, 0.0])
    for e in events:
        by_name[e["name"]][0] += 1
        by_name[e["name"]][1] += e["dur"]
    busy = sum(e["dur"] for e in events)
    span = max(e["ts"] + e["dur"] for e in events) - min(e["ts"] for e in events) if events else 0.0
    return {"by_name": dict(by_name), "busy_us": busy, "span_us": span, "launches": len(events)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("trace", help="Chrome trace JSON from generate.py --profile")
    p.add_argument(
        "--steps", type=int, default=None, help="decode steps in the trace (max_new_tokens - 1), for per-step figures"
    )
    p.add_argument("--top", type=int, default=30, help="kernels to list, by total time")
    a = p.parse_args(argv)
    try:
        with open(a.trace) as f:
            s = summarize(kernel_events(json.load(f)))
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"error: cannot read trace {a.trace}: {e}") from None
    if not s["launches"]:
        raise SystemExit(f"error: no GPU kernels in {a.trace}: was it profiled on a GPU?")
    busy, span = s["busy_us"], s["span_us"]
    print(
        f"{s['launches']} kernel launches, GPU busy {busy / 1e3:.2f} ms "
        f"of a {span / 1e3:.2f} ms span ({100 * busy / span:.1f}%)"
    )
    if a.steps:
        print(
            f"per decode step: {s['launches'] / a.steps:.1f} launches, {s['busy_us'] / a.steps:.1f} us busy, "
            f"{s['span_us'] / a.steps:.1f} us span"
        )
    print("| launches | total us | mean us | % busy | kernel |\n|---|---|---|---|---|")
    for name, (n, total) in sorted(s["by_name"].items(), key=lambda kv: -kv[1][1])[: a.top]:
        print(f"| {n} | {total:.0f} | {total / n:.2f} | {100 * total / s['busy_us']:.1f} | {name[:110]} |")


if __name__ == "__main__":
    main()
