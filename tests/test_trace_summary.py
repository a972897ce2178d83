import json
import subprocess
import sys

from conftest import ROOT


def kernel(name, ts, dur):
    return {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur}


def test_summary_counts_launches_busy_time_and_ranks_kernels(tmp_path):
    events = [kernel("gemv", 0, 30), kernel("norm", 32, 2), kernel("gemv", 36, 30), kernel("norm", 68, 2)]
    events.append({"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 500})  # host events are not GPU time
    trace = tmp_path / "t.json"
    trace.write_text(json.dumps({"traceEvents": events}))
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts/trace_summary.py"), str(trace), "--steps", "2"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "4 kernel launches, GPU busy 0.06 ms of a 0.07 ms span (91.4%)"
    assert lines[1] == "per decode step: 2.0 launches, 32.0 us busy, 35.0 us span"
    assert lines[4].startswith("| 2 | 60 | 30.00 | 93.8 | gemv")  # the largest first


def test_a_trace_without_gpu_kernels_is_a_one_line_error(tmp_path):
    trace = tmp_path / "t.json"
    trace.write_text(json.dumps({"traceEvents": [{"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 5}]}))
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts/trace_summary.py"), str(trace)], capture_output=True, text=True
    )
    assert out.returncode == 1
    assert out.stderr.strip().startswith("error: no GPU kernels") and len(out.stderr.strip().splitlines()) == 1


def test_a_missing_trace_is_a_one_line_error(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts/trace_summary.py"), str(tmp_path / "nope.json")],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 1
    assert out.stderr.startswith("error: cannot read trace") and len(out.stderr.strip().splitlines()) == 1
