"""How often would a draft's proposals be accepted? Measure it before paying for speculative decoding.

The target generates a continuation; both models then score it in one forward each. At every position the
chance that the rejection rule accepts the draft's proposal is alpha = sum_x min(p(x), q(x)) (1 or 0 when
greedy). With a mean alpha, a step of k proposals yields (1 - alpha^(k+1)) / (1 - alpha) tokens per target
forward (Leviathan et al., 2023). It pays off when that beats the step's cost in plain steps (README).

    python scripts/draft_acceptance.py --checkpoint_path T/model.pth --draft_checkpoint_path D/model.pth --prompt "..."
    python scripts/draft_acceptance.py --random_init 7B --draft_quantize int4 --prompt 16 --max_new_tokens 32

Takes generate.py's flags (model, draft, prompt, sampling, device); runs eagerly at batch 1.
"""

import sys
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import generate as g  # noqa: E402


def position_acceptance(target, draft, tokens: Tensor, prompt_len: int, **sampling_kwargs) -> Tensor:
    """alpha [n] at each of the n tokens after the prompt in tokens [T + n], for the given sampling settings."""
    x = tokens[None, :-1]  # the last token predicts nothing we score
    probs = []
    for model in (target, draft):
        model.setup_caches(max_batch_size=1, max_seq_length=x.shape[1])
        with torch.no_grad():
            logits = model(x, torch.arange(x.shape[1], device=x.device))[0, prompt_len - 1 :]  # [n, V]
        probs.append(g.logits_to_probs(logits, **sampling_kwargs))
    return torch.minimum(*probs).sum(-1)


def expected_tokens_per_forward(alpha: float, k: int) -> float:
    return k + 1.0 if alpha >= 1 else (1 - alpha ** (k + 1)) / (1 - alpha)


def main(argv=None):
    argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    if "--speculate" not in argv:
        argv += ["--speculate", "draft"]
    args = g.parse_args(argv)
    device = torch.device(args.device)
    precision = g.resolve_precision(args.precision, device)
    torch.manual_seed(args.seed)
    prompt = g.prepare_prompt(args)[1].to(device)
    target, draft = g.load_models(args, device, precision, use_tp=False)
    sampling = dict(temperature=args.temperature, top_k=args.top_k or None, top_p=args.top_p)
    y, _ = g.generate(target, prompt, args.max_new_tokens, **sampling)
    alpha = position_acceptance(target, draft, y[0], prompt.numel(), **sampling)
    mean = float(alpha.mean())
    print(
        f"acceptance per proposal: mean {mean:.3f} over {alpha.numel()} positions "
        f"(min {float(alpha.min()):.3f}, max {float(alpha.max()):.3f})"
    )
    print("| k | expected tokens per target forward |\n|---|---|")
    for k in (1, 2, 3, 4, 5, 6, 8):
        print(f"| {k} | {expected_tokens_per_forward(mean, k):.2f} |")


if __name__ == "__main__":
    main()
