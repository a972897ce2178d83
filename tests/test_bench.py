import json

import pytest

import bench

SAMPLE_OUTPUT = """Loaded model in 1.50 s
Compilation and warm-up: 95.20 s
Sample 0: 1.2 s total, 200 tokens, time to first token 40.0 ms, decode 170.00 tokens/s, 2250.0 GB/s (75.0% of \
measured read bandwidth), memory 13.70 GB
Sample 1: 1.2 s total, 200 tokens, time to first token 38.0 ms, decode 180.00 tokens/s, 2380.0 GB/s (79.0% of \
measured read bandwidth), memory 13.90 GB
==========
Average decode tokens/s: 175.00
Average time to first token: 39.0 ms
Average bandwidth achieved: 2315 GB/s (weights read per token: 13.21 GB)
Measured read bandwidth of this card: 3000 GB/s; achieved 77.2%
"""


def test_parse_reads_every_figure():
    row = bench.parse(SAMPLE_OUTPUT)
    expected = dict(
        tok_s=175.0,
        ms_token=1e3 / 175.0,
        ttft_ms=39.0,
        gb_s=2315.0,
        card_gb_s=3000.0,
        pct=77.2,
        compile_s=95.2,
        load_s=1.5,
        memory_gb=13.9,
    )
    assert row == pytest.approx(expected)


def test_matrix_skips_speculation_at_batch_above_one():
    a = bench.parse_args(
        ["--random_init", "7B", "--speculate", "none", "ngram", "--batch_sizes", "1", "4", "--precisions", "bf16"]
    )
    got = [(s["speculate"], s["batch_size"]) for s in bench.settings(a)]
    assert got == [("none", 1), ("none", 4), ("ngram", 1)]


def test_a_small_cpu_matrix_end_to_end(tmp_path, capsys):
    out = tmp_path / "rows.json"
    argv = ["--random_init", "stories15M", "--device", "cpu", "--compile", "off", "--precisions", "bf16", "int8"]
    bench.main(
        argv + ["--max_new_tokens", "8", "--num_samples", "1", "--json", str(out), "--extra", "--precision", "fp32"]
    )
    rows = json.loads(out.read_text())
    assert [r["precision"] for r in rows] == ["bf16", "int8"]
    assert all(r["tok_s"] > 0 and "error" not in r for r in rows)
    captured = capsys.readouterr()
    table = captured.out
    assert table.startswith("| precision |") and table.count("\n") == 4  # header, rule, two rows
    progress = [line for line in captured.err.splitlines() if " -> " in line]  # each row as it ends
    assert len(progress) == 2 and all("tokens/s per sequence, first token" in line for line in progress), progress


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [dict(precision="bf16", compile="on", speculate="none", batch_size=1, prompt_len=16, tok_s=175.0)]
    bench.plot(rows, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plots_over_batch_sizes_and_prompt_lengths_draw_one_line_per_format(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    base = dict(compile="on", speculate="none", prompt_len=16)
    rows = [
        dict(base, precision=p, batch_size=b, tok_s=100.0 / b**0.1, total_tok_s=100.0 * b**0.9)
        for p in ("bf16", "int8")
        for b in (1, 8, 64)
    ]
    bench.plot(rows, tmp_path / "batch.png")
    fig = plt.gcf()
    drawn = [[line.get_label() for line in ax.get_lines()] for ax in fig.axes]
    assert drawn == [["bf16", "int8"], ["bf16", "int8"]]
    assert fig.axes[1].get_ylabel() == "tokens/s in total" and list(fig.axes[1].get_lines()[0].get_xdata()) == [
        1,
        8,
        64,
    ]
    rows = [dict(base, precision="int4", batch_size=1, prompt_len=n, ttft_ms=n / 100, tok_s=100.0) for n in (16, 512)]
    bench.plot(rows, tmp_path / "prompt.png")
    assert plt.gcf().axes[0].get_ylabel() == "time to first token, ms"
    assert (tmp_path / "prompt.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_prompt_longer_than_the_named_configs_context_is_refused_before_any_run(capsys):
    with pytest.raises(SystemExit) as e:
        bench.parse_args(["--random_init", "7B", "--prompt_lengths", "16", "2048"])
    assert "2248 exceeds 7B's context of 2048" in str(e.value) and "Llama-3.1-8B" in str(e.value)
    with pytest.raises(SystemExit) as e:
        bench.parse_args(["--random_init", "no-such-model"])
    assert str(e.value).startswith("error: unknown model name")
    assert bench.parse_args(["--random_init", "Llama-3.1-8B", "--prompt_lengths", "8192"]).prompt_lengths == [8192]
