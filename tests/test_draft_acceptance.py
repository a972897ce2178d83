import draft_acceptance as da
import torch
from conftest import random_transformer, save_checkpoint, tiny_args

import generate as g


def test_a_draft_identical_to_the_target_is_always_accepted(capsys, tmp_path, llama2_tokenizer_path):
    ckpt = save_checkpoint(random_transformer(tiny_args(block_size=64)), tmp_path / "t")
    da.main(["--checkpoint_path", ckpt, "--draft_checkpoint_path", ckpt, "--tokenizer_path", llama2_tokenizer_path]
            + ["--prompt", "Once upon a time"]
            + ["--max_new_tokens", "10", "--device", "cpu"])  # fmt: skip
    out = capsys.readouterr().out
    assert out.startswith("acceptance per proposal: mean 1.000 over 10 positions")
    assert "| 5 | 6.00 |" in out


def test_acceptance_is_the_overlap_of_the_two_distributions_on_the_targets_continuation():
    target, draft = random_transformer(tiny_args(), seed=0), random_transformer(tiny_args(n_layer=1), seed=1)
    prompt = torch.randint(3, 32000, (7,), generator=torch.Generator().manual_seed(0)).int()
    sampling = dict(temperature=1.0, top_k=None, top_p=None)
    y, _ = g.generate(target, prompt, 6, **sampling)
    alpha = da.position_acceptance(target, draft, y[0], 7, **sampling)
    for i in range(6):  # position by position, each model from scratch on the tokens so far
        ctx = y[:, : 7 + i]
        p, q = (next_token_probs(m, ctx, sampling) for m in (target, draft))
        assert abs(float(torch.minimum(p, q).sum()) - float(alpha[i])) < 1e-5
    assert 0 < float(alpha.mean()) < 1  # a different model: some proposals rejected


@torch.no_grad()
def next_token_probs(model, ctx, sampling):
    model.setup_caches(1, ctx.shape[1])
    return g.logits_to_probs(model(ctx, torch.arange(ctx.shape[1]))[0, -1], **sampling)


def test_expected_tokens_per_forward():
    assert da.expected_tokens_per_forward(0.0, 5) == 1.0
    assert da.expected_tokens_per_forward(1.0, 5) == 6.0
    assert abs(da.expected_tokens_per_forward(0.5, 2) - 1.75) < 1e-12  # 1 + 0.5 + 0.25
