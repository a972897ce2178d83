import check_compiled as cc
import pytest
import torch
from conftest import random_transformer, tiny_args

import generate as g


def setup(steps=6):
    model = random_transformer(tiny_args())
    prompt = torch.randint(3, 32000, (5,), generator=torch.Generator().manual_seed(0)).int()
    model.setup_caches(1, prompt.numel() + steps)
    return model, prompt, g.generate(model, prompt, steps, temperature=0)[0][0, prompt.numel() :]


def test_the_eager_step_matches_itself_and_the_greedy_tokens():
    model, prompt, tokens = setup()
    ref = cc.stepped_logits(g.model_forward, model, prompt, tokens)
    assert cc.compare(ref, cc.stepped_logits(g.model_forward, model, prompt, tokens)) == (0.0, 1.0)
    assert torch.equal(ref[:-1].argmax(-1).int(), tokens[1:])  # step i predicts the token fed at step i + 1


def test_a_step_that_reads_a_stale_kv_cache_is_flagged():
    model, prompt, tokens = setup()
    ref = cc.stepped_logits(g.model_forward, model, prompt, tokens)
    stale = lambda m, x, pos: m(x, pos - 1)  # writes and attends one position early: the race PDL could cause  # noqa: E731
    err, _ = cc.compare(ref, cc.stepped_logits(stale, model, prompt, tokens))
    assert err > 0.05


def test_without_a_gpu_it_says_so_in_one_line():
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(SystemExit, match="^error: no GPU visible"):
        cc.main(["--n_layer", "1"])
