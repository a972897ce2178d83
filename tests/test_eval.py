import math
from types import SimpleNamespace

import pytest
import torch
from conftest import full_logits, random_transformer, save_checkpoint, tiny_args

import eval as ev
from tokenizer import get_tokenizer

TEXT = "The quick brown fox jumps over the lazy dog. " * 12


@pytest.fixture(scope="module")
def model():
    return random_transformer(tiny_args(block_size=128), seed=0)


@pytest.fixture(scope="module")
def tok(llama2_tokenizer_path):
    return get_tokenizer(llama2_tokenizer_path)


@pytest.mark.parametrize("n, seq_len, stride", [(10, 4, 2), (100, 32, 8), (33, 32, 32), (5, 64, 16)])
def test_rolling_windows_score_every_token_once(n, seq_len, stride):
    scored = []
    for start, end, first in ev.rolling_windows(n, seq_len, stride):
        assert end - start <= seq_len and start < first <= end
        scored += list(range(first, end))
    assert scored == list(range(1, n))


def test_uniform_model_has_perplexity_equal_to_the_vocabulary(model, tok):
    uniform = random_transformer(tiny_args(block_size=128), seed=0)
    with torch.no_grad():
        uniform.output.weight.zero_()  # every logit 0: p = 1/32000 for every token
    ppl, n = ev.perplexity(uniform, tok, TEXT, 32, 8, "cpu")
    assert n == len(tok.encode(TEXT)) - 1 and ppl == pytest.approx(32000, rel=1e-4)


def test_perplexity_in_one_window_equals_a_direct_computation(model, tok):
    ids = tok.encode(TEXT)[:100]
    logits = full_logits(model, torch.tensor([ids]))[0, :-1]
    direct = math.exp(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:])).item())
    ppl, _ = ev.perplexity(model, tok, tok.decode(ids[1:]), 128, 64, "cpu")
    assert ppl == pytest.approx(direct, rel=1e-4)


def req(*args):
    return SimpleNamespace(args=args)


def test_loglikelihood_matches_the_model(model, tok):
    lm = ev.GPTFastLM(model, tok, "cpu")
    greedy = lm.generate_until([req("Once upon a time", {"max_gen_toks": 3})])[0]
    (lp, is_greedy), (lp2, is_greedy2) = lm.loglikelihood(
        [req("Once upon a time", greedy), req("Once upon a time", " zebra")]
    )
    assert is_greedy and not is_greedy2 and lp > lp2
    ids = tok.encode("Once upon a time" + greedy)
    direct = ev.token_logprobs(model, ids, "cpu")[-(len(ids) - len(tok.encode("Once upon a time"))) :].sum()
    assert lp == pytest.approx(float(direct), rel=1e-5)


def test_generate_until_cuts_at_the_stop_string(model, tok):
    lm = ev.GPTFastLM(model, tok, "cpu")
    full = lm.generate_until([req("Hello", {"max_gen_toks": 8})])[0]
    cut = lm.generate_until([req("Hello", {"max_gen_toks": 8, "until": [full[3:5]]})])[0]
    assert full.startswith(cut) and len(cut) < len(full)


def test_rolling_loglikelihood_is_the_perplexity_sum(model, tok):
    lm = ev.GPTFastLM(model, tok, "cpu")
    total = lm.loglikelihood_rolling([req(TEXT)])[0]
    ppl, n = ev.perplexity(model, tok, TEXT, 128, 64, "cpu")
    assert math.exp(-total / n) == pytest.approx(ppl, rel=1e-5)


def test_cli_perplexity_and_errors(capsys, tmp_path, llama2_tokenizer_path):
    ckpt = save_checkpoint(random_transformer(tiny_args(block_size=128), seed=0), tmp_path)
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    base = ["--checkpoint_path", str(ckpt), "--tokenizer_path", str(llama2_tokenizer_path), "--device", "cpu"]
    ev.main([*base, "--text_file", str(text), "--stride", "32"])
    assert capsys.readouterr().out.startswith("perplexity ")
    for extra, msg in (
        (["--text_file", str(tmp_path / "no.txt")], "text file not found"),
        ([], "pass --text_file"),
        (["--text_file", str(text), "--stride", "0"], "--stride 0"),
        (["--text_file", str(text), "--seq_len", "0"], "--seq_len 0 must be at least 2"),
    ):
        with pytest.raises(SystemExit) as e:
            ev.main([*base, *extra])
        assert msg in str(e.value.code) and "\n" not in str(e.value.code)


TASK_YAML = """task: toy_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""


def test_harness_adapter_on_a_local_task(model, tok, tmp_path):
    """With lm_eval installed, a local multiple-choice task whose right answer is the model's own greedy
    continuation must score accuracy 1.0, and the wrong choices must lose."""
    pytest.importorskip("lm_eval")
    import json

    lm = ev.GPTFastLM(model, tok, "cpu")
    rows = []
    for q in ("Once upon a time", "The weather today", "In the beginning"):
        greedy = lm.generate_until([req(q, {"max_gen_toks": 2})])[0]
        rows.append({"question": q, "choices": [greedy, " xylophone quartz", " 12345"], "answer": 0})
    data = tmp_path / "toy.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "toy.yaml").write_text(TASK_YAML.format(data=data))
    results = ev.run_harness(lm, ["toy_choice"], include_path=tmp_path)
    assert results["toy_choice"]["acc,none"] == 1.0
