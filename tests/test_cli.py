"""The first hour of a user, on the CPU with the demo model: what generate.py, quantize.py, eval.py and bench.py
print, and the one-line errors where a traceback would otherwise be."""

import io
import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, STORIES, STORY

import bench
import generate
import quantize as q
from tokenizer import get_tokenizer

DEMO = ["--device", "cpu", "--num_samples", "1"]


def run(capsys, *argv) -> str:
    generate.main([str(a) for a in [*DEMO, *argv]])
    return capsys.readouterr().out


def error(*argv) -> str:
    """The one-line message generate.py leaves with."""
    with pytest.raises(SystemExit) as e:
        generate.main([str(a) for a in [*DEMO, *argv]])
    msg = str(e.value.code)
    assert "\n" not in msg and msg.startswith("error: "), msg
    return msg


def test_the_quick_start_tells_the_demo_story_from_any_folder(tmp_path):
    argv = [sys.executable, str(ROOT / "generate.py"), "--prompt", "Once upon a time", "--temperature", "0"]
    p = subprocess.run(argv + ["--max_new_tokens", "64", *DEMO], cwd=tmp_path, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert STORY in p.stdout


# ---------------------------------------------------------------- one-line errors instead of tracebacks


def test_weights_that_do_not_fit_are_refused_before_anything_is_allocated(monkeypatch):
    monkeypatch.setattr(generate, "free_memory", lambda device: 8 * 10**9)
    msg = error("--random_init", "7B", "--prompt", "16")
    assert "the weights need 27.0 GB on cpu but 8.0 GB is free" in msg and "--precision bf16" in msg
    assert "int8 / int4" in msg


def test_a_tokenizer_with_fewer_pieces_than_the_model_decodes_its_ids():
    tok = get_tokenizer(STORIES / "tokenizer.model")  # 512 pieces; a model may pad its vocabulary beyond them
    assert tok.decode([1, 403, 600, 1000]) == tok.decode([1, 403])


def test_a_prompt_that_is_not_utf8_is_a_one_line_error():
    p = subprocess.run(
        [sys.executable, "generate.py", *DEMO, "--prompt", b"caf\xe9 \xff"], cwd=ROOT, capture_output=True
    )
    assert p.returncode != 0 and p.stderr.decode().strip() == "error: the prompt is not valid UTF-8 text"


def test_unknown_devices_and_folders_are_one_line_errors(tmp_path):
    assert "--device tpu is not supported" in error("--device", "tpu")
    assert f"{tmp_path} is a folder: pass the model file in it" in error("--checkpoint_path", tmp_path)


def test_flags_without_effect_are_errors_before_loading(tmp_path):
    missing = tmp_path / "missing.pth"  # the flags are judged before the checkpoint is even looked for
    assert "--quantize quantizes --random_init weights" in error("--checkpoint_path", missing, "--quantize", "int8")
    assert "--groupsize only applies with --quantize int4" in error("--checkpoint_path", missing, "--groupsize", "64")
    assert "--groupsize only applies" in error("--random_init", "stories15M", "--quantize", "int8", "--groupsize", "64")
    assert "--system is the chat's system prompt" in error("--checkpoint_path", missing, "--system", "Be brief.")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Once upon a time\n")
    assert "--prompt and --prompt_file both give prompts" in error("--prompt_file", prompts, "--prompt", "Hi")
    assert "generates each of its prompts once" in error("--prompt_file", prompts, "--num_samples", "2")
    assert "--stream prints one sequence" in error("--prompt_file", prompts, "--stream")
    assert "--speculate_k applies to speculative decoding" in error("--checkpoint_path", missing, "--speculate_k", "3")
    assert "--compile_cache keeps compiled code" in error("--checkpoint_path", missing, "--compile_cache", "c.bin")
    assert "--kernels torch picks CUDA kernels" in error("--checkpoint_path", missing, "--kernels", "torch")
    ngram_and_draft = ["--speculate", "ngram", "--draft_checkpoint_path", missing]
    assert "--speculate ngram needs no draft model" in error("--checkpoint_path", missing, *ngram_and_draft)


def test_ctrl_c_stops_a_reply_and_the_chat_goes_on(monkeypatch, capsys):
    messages = iter(["Tell me a story", "Another one"])

    def ask(_prompt):
        try:
            return next(messages)
        except StopIteration:
            raise KeyboardInterrupt from None  # Ctrl-C at the prompt: leave

    calls = []
    real = generate.run_sample

    def interrupted_once(*a, **kw):
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt  # Ctrl-C while the first reply is written
        return real(*a, **kw)

    monkeypatch.setattr("builtins.input", ask)
    monkeypatch.setattr(generate, "run_sample", interrupted_once)
    out = run(capsys, "--interactive", "--max_new_tokens", "20")
    assert "(stopped: this turn is left out of the conversation)" in out and len(calls) == 2


def test_ctrl_c_outside_the_chat_leaves_without_a_traceback(monkeypatch, capsys):
    def interrupt(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(generate, "run", interrupt)
    with pytest.raises(SystemExit) as e:
        generate.main(DEMO)
    assert e.value.code == 130 and "(interrupted)" in capsys.readouterr().err


# ---------------------------------------------------------------- what is printed


def test_a_batch_prints_every_sequence_and_both_rates(capsys):
    out = run(capsys, "--prompt", "Once upon a time", "--batch_size", "3", "--max_new_tokens", "20")
    assert all(f"--- sequence {b} of 3 ---" in out for b in (1, 2, 3))
    assert out.count("Once upon a time") == 3
    assert "tokens/s per sequence" in out and "Average decode tokens/s, all 3 sequences:" in out


def test_streaming_prints_the_same_text_and_is_on_for_a_terminal(capsys, monkeypatch):
    argv = ["--prompt", "Once upon a time", "--temperature", "0", "--max_new_tokens", "64"]
    assert STORY in run(capsys, *argv, "--stream") and STORY in run(capsys, *argv, "--no-stream")
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert generate.parse_args(DEMO).stream and not generate.parse_args([*DEMO, "--batch_size", "2"]).stream


def test_prompts_from_stdin_and_from_a_file(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Once upon a time"))
    greedy = ["--temperature", "0", "--max_new_tokens", "64"]
    assert STORY in run(capsys, "--prompt", "-", *greedy)
    (tmp_path / "prompt.txt").write_text("Once upon a time")
    assert STORY in run(capsys, "--prompt_file", tmp_path / "prompt.txt", *greedy)


@pytest.mark.parametrize("stream", ["--stream", "--no-stream"])
def test_stop_strings_end_the_text_before_them(capsys, stream):
    out = run(
        capsys,
        "--prompt",
        "Once upon a time",
        "--temperature",
        "0",
        "--max_new_tokens",
        "100",
        "--stop",
        "park",
        stream,
    )
    text = out.split("Loaded model")[1].split("\n", 1)[1].split("Sample 0")[0]
    assert text.strip() == STORY[: STORY.index("park")].strip()
    assert ", 26 tokens," in out  # generation stopped at the token that completed "park", not at 100


PROMPTS = ["Once upon a time", "Lily", "The dog ran to the park and saw a big red ball. He", "One day,", "Tom"]


def greedy_alone(prompts: list[str], max_new_tokens: int) -> list[str]:
    """Each prompt's greedy completion, generated alone (batch 1) through the library."""
    tok = get_tokenizer(STORIES / "tokenizer.model")
    model = generate.load_model(STORIES / "model.pth", "cpu", torch.float32)
    out = []
    for text in prompts:
        ids = torch.tensor(tok.encode(text), dtype=torch.int)
        y, _ = generate.generate(model, ids, max_new_tokens, temperature=0, stop_ids=tok.stop_ids())
        out += generate.completions(tok, y, ids.numel(), [0], tok.stop_ids())
    return out


def test_a_prompt_file_runs_in_batches_and_each_row_equals_its_prompt_alone(capsys, tmp_path):
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n\n")  # a blank line is no prompt
    out_file = tmp_path / "out.jsonl"
    argv = ["--prompt_file", tmp_path / "prompts.txt", "--temperature", "0", "--max_new_tokens", "48"]
    out = run(capsys, *argv, "--batch_size", "2", "--output_jsonl", out_file)
    rows = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == PROMPTS  # the file's order, though run longest first in 3 batches
    assert [r["completion"] for r in rows] == greedy_alone(PROMPTS, 48)
    assert out.count("Batch ") == 3 and "--- prompt 5 of 5 ---\nTom" + rows[4]["completion"] in out
    # a .jsonl file of prompts, all in one batch, each row stopping at its own stop string
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    run(capsys, *argv[2:], "--prompt_file", tmp_path / "prompts.jsonl", "--stop", ".", "--output_jsonl", out_file)
    stopped = [json.loads(line)["completion"] for line in out_file.read_text().splitlines()]
    assert stopped == [r["completion"].split(".")[0] for r in rows]


def test_a_batch_of_prompts_of_different_lengths_equals_each_alone_in_the_library():
    tok = get_tokenizer(STORIES / "tokenizer.model")
    model = generate.load_model(STORIES / "model.pth", "cpu", torch.float32)
    ids = [torch.tensor(tok.encode(p), dtype=torch.int) for p in PROMPTS]
    y, stats = generate.generate(model, ids, 48, temperature=0, stop_ids=tok.stop_ids())
    T = max(p.numel() for p in ids)
    assert stats["start"] == [T - p.numel() for p in ids] and min(stats["start"]) == 0
    assert generate.completions(tok, y, T, stats["start"], tok.stop_ids()) == greedy_alone(PROMPTS, 48)


def test_prompt_file_errors_are_one_line(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "no prompt key"}\n')
    assert 'each line of a .jsonl file must be {"prompt": "text"}' in error("--prompt_file", tmp_path / "bad.jsonl")
    (tmp_path / "empty.txt").write_text("\n\n")
    assert "holds no prompt" in error("--prompt_file", tmp_path / "empty.txt")


def test_the_chat_system_prompt_goes_into_the_first_turn():
    tok = get_tokenizer(STORIES / "tokenizer.model")  # SentencePiece: the Llama 2 chat format
    first = tok.decode(tok.encode_chat("Hello", first_turn=True, system="Answer in rhyme."))
    assert "<<SYS>>" in first and "Answer in rhyme." in first and first.index("Answer") < first.index("Hello")
    assert "<<SYS>>" not in tok.decode(tok.encode_chat("Hello", first_turn=False, system="Answer in rhyme."))


def test_quantization_prints_one_note_and_shows_progress_on_a_terminal(capsys, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    model = generate.random_model(generate.ModelArgs.from_name("stories15M"), "cpu", torch.float32)
    q.quantize_model(model, "int4", 64)  # no layer of stories15M (dim 288) takes groups of 64
    out = capsys.readouterr().out
    assert out.count("note:") == 1 and "25 layers" in out
    assert "layer" in sys.stderr.getvalue()  # tqdm's bar


# ---------------------------------------------------------------- eval.py, GPTQ and bench.py on a small model


@pytest.fixture
def short_context(stories):
    """The demo model with a 256-token context: under the tools' old fixed defaults of 512."""
    config = json.loads((stories.parent / "model_config.json").read_text())
    (stories.parent / "model_config.json").write_text(json.dumps({**config, "block_size": 256}))
    return stories


def test_eval_and_gptq_defaults_fit_a_short_context(short_context, tmp_path, capsys):
    import eval as ev

    text = tmp_path / "story.txt"
    text.write_text((STORY + "\n") * 40)
    ev.main(["--checkpoint_path", str(short_context), "--text_file", str(text), "--device", "cpu"])
    assert "perplexity" in capsys.readouterr().out
    q.main(["--checkpoint_path", str(short_context), "--mode", "int4-gptq", "--calibration_file", str(text)]
           + ["--calibration_samples", "2", "--device", "cpu"])  # fmt: skip
    assert (short_context.parent / "model_int4-gptq.g32.pth").is_file()
    with pytest.raises(SystemExit, match="--calibration_seq_len 512 exceeds the model's context 256"):
        q.main(["--checkpoint_path", str(short_context), "--mode", "int4-gptq", "--calibration_file", str(text)]
               + ["--calibration_seq_len", "512", "--device", "cpu"])  # fmt: skip


def test_bench_runs_on_the_cpu_by_default_and_its_bf16_rows_in_bf16():
    a = bench.parse_args(["--random_init", "stories15M"])
    assert a.device == ("cuda" if torch.cuda.is_available() else "cpu")
    bf16, int8 = (bench.command(a, dict(s, speculate="none")) for s in bench.settings(a)[:2])
    assert bf16[bf16.index("--precision") + 1] == "bf16" and "--precision" not in int8
    assert "--groupsize" not in int8  # an int8 row has no group size (generate.py refuses it)


def test_the_stream_holds_back_a_character_cut_between_pieces(capsys):
    class Bytes:  # a byte-level tokenizer: each id one byte of UTF-8
        def decode(self, ids):
            return bytes(ids).decode("utf-8", errors="replace")

    stream = generate.TextStream(Bytes())
    for b in "né".encode():
        stream(torch.tensor([[b]]))
    assert capsys.readouterr().out == "né"  # never "n\ufffd"
    assert stream.finish() == "né"


def test_the_cpu_profile_is_sorted_by_cpu_time(capsys, tmp_path):
    out = run(capsys, "--max_new_tokens", "10", "--profile", tmp_path / "trace")
    rows = [line.split() for line in out.splitlines() if line.strip().startswith("aten::")]
    pct = [float(r[1].rstrip("%")) for r in rows]  # the Self CPU % column
    assert len(pct) > 5 and pct == sorted(pct, reverse=True) and pct[0] > 0
    assert (tmp_path / "trace.json").is_file()
