"""Evaluate a checkpoint (any precision): perplexity on a local text file, or lm-evaluation-harness tasks.

python eval.py --checkpoint_path P --text_file wiki.txt            # perplexity, no extra dependency
python eval.py --checkpoint_path P --tasks hellaswag --limit 100   # needs `pip install lm_eval`
"""

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from generate import load_model, resolve_precision
from tokenizer import find_tokenizer, get_tokenizer


@torch.no_grad()
def window_logits(model, ids: list[int], device) -> Tensor:
    """Next-token logits after each prefix of ids, in one forward from position 0 -> [len(ids), V] float32."""
    model.setup_caches(1, len(ids))
    return model(torch.tensor([ids], dtype=torch.int, device=device), torch.arange(len(ids), device=device))[0].float()


def token_logprobs(model, ids: list[int], device) -> Tensor:
    """log p(ids[i] | ids[:i]) for i >= 1, in one forward -> [len(ids) - 1]."""
    logits = window_logits(model, ids, device)[:-1]  # [S-1, V]
    return -F.cross_entropy(logits, torch.tensor(ids[1:], device=device), reduction="none")


def rolling_windows(n_tokens: int, seq_len: int, stride: int):
    """(start, end, first_scored) windows over n tokens: each token scored once, with up to seq_len - stride context."""
    start, scored = 0, 1
    while scored < n_tokens:
        end = min(start + seq_len, n_tokens)
        yield start, end, scored
        scored = end
        start = max(end - max(seq_len - stride, 1), 0) if end < n_tokens else end  # at least one token of context


def sum_logprob(model, ids: list[int], seq_len: int, stride: int, device) -> tuple[float, int]:
    """Total log-likelihood of ids[1:] given what precedes them, over sliding windows."""
    total, count = 0.0, 0
    for start, end, scored in rolling_windows(len(ids), seq_len, stride):
        lp = token_logprobs(model, ids[start:end], device)  # scores ids[start+1 : end]
        part = lp[scored - start - 1 :]
        total, count = total + float(part.sum()), count + part.numel()
    return total, count


def perplexity(model, tokenizer, text: str, seq_len: int, stride: int, device) -> tuple[float, int]:
    ids = tokenizer.encode(text)  # with BOS: the first word is scored too
    if len(ids) < 2:
        raise ValueError("the text has fewer than two tokens")
    total, count = sum_logprob(model, ids, seq_len, stride, device)
    return math.exp(-total / count), count


class GPTFastLM:
    """The lm-evaluation-harness model interface (loglikelihood, loglikelihood_rolling, generate_until).

    Requests are objects with `.args`, as the harness passes them; registered as an lm_eval LM subclass in main().
    """

    def __init__(self, model, tokenizer, device, max_gen_tokens: int = 256):
        self.model, self.tokenizer, self.device, self.max_gen_tokens = model, tokenizer, device, max_gen_tokens
        self.seq_len = model.config.block_size

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        out = []
        for req in requests:
            context, continuation = req.args
            ctx = self.tokenizer.encode(context)
            cont = self.tokenizer.encode(context + continuation)[len(ctx) :] or self.tokenizer.encode(
                continuation, bos=False
            )
            ids = (ctx + cont)[-self.seq_len :]
            logits = window_logits(self.model, ids, self.device)[-len(cont) - 1 : -1]  # [C, V]
            target = torch.tensor(cont, device=self.device)
            logprob = torch.log_softmax(logits, dim=-1).gather(-1, target[:, None]).sum()
            out.append((float(logprob), bool((logits.argmax(-1) == target).all())))
        return out

    def loglikelihood_rolling(self, requests) -> list[float]:
        return [
            sum_logprob(self.model, self.tokenizer.encode(r.args[0]), self.seq_len, self.seq_len // 2, self.device)[0]
            for r in requests
        ]

    def generate_until(self, requests) -> list[str]:
        from generate import generate

        out, stop_ids = [], self.tokenizer.stop_ids()
        for req in requests:
            context, kwargs = req.args
            until = kwargs.get("until") or []
            prompt = torch.tensor(self.tokenizer.encode(context), dtype=torch.int, device=self.device)
            n = min(kwargs.get("max_gen_toks", self.max_gen_tokens), self.seq_len - prompt.numel())
            y, _ = generate(self.model, prompt, n, temperature=0, stop_ids=stop_ids)
            text = self.tokenizer.decode([t for t in y[0, prompt.numel() :].tolist() if t not in stop_ids])
            for stop in until:
                text = text.split(stop)[0]
            out.append(text)
        return out


def run_harness(lm: GPTFastLM, tasks: list[str], limit=None, num_fewshot=None, include_path=None):
    try:
        import lm_eval
        from lm_eval.api.model import LM
    except ImportError:
        raise SystemExit("error: --tasks needs lm-evaluation-harness: pip install lm_eval") from None
    harness_lm = type("GPTFastHarnessLM", (GPTFastLM, LM), {})  # the harness checks isinstance(model, LM)
    wrapped = harness_lm.__new__(harness_lm)
    LM.__init__(wrapped)
    wrapped.__dict__.update(lm.__dict__)
    from lm_eval.tasks import TaskManager

    task_manager = TaskManager(include_path=str(include_path) if include_path else None)
    return lm_eval.simple_evaluate(
        model=wrapped, tasks=tasks, limit=limit, num_fewshot=num_fewshot, task_manager=task_manager
    )["results"]


def main(argv=None):
    p = argparse.ArgumentParser(description="Perplexity on a local text file, or lm-evaluation-harness tasks.")
    p.add_argument("--checkpoint_path", type=Path, required=True, help="model.pth, model_int8.pth or model_int4.g*.pth")
    p.add_argument("--tokenizer_path", type=Path, default=None, help="default: the tokenizer beside the checkpoint")
    p.add_argument("--text_file", type=Path, default=None, help="local UTF-8 text for perplexity")
    p.add_argument("--seq_len", type=int, default=2048, help="perplexity window (capped at the model's context)")
    p.add_argument(
        "--stride",
        type=int,
        default=None,
        help="new tokens scored per window, the rest is context (default: 1/4 window)",
    )
    p.add_argument("--tasks", nargs="+", default=None, help="lm-evaluation-harness task names (needs lm_eval)")
    p.add_argument("--limit", type=int, default=None, help="harness: examples per task")
    p.add_argument("--num_fewshot", type=int, default=None, help="harness: few-shot examples")
    p.add_argument("--include_path", type=Path, default=None, help="harness: folder of your own task YAML files")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    p.add_argument(
        "--precision", choices=["bf16", "fp16", "fp32"], default=None, help="default bf16 on GPU, fp32 on CPU"
    )
    a = p.parse_args(argv)
    if a.text_file is None and not a.tasks:
        raise SystemExit("error: pass --text_file for perplexity or --tasks for the harness")
    if a.text_file is not None and not a.text_file.is_file():
        raise SystemExit(f"error: text file not found: {a.text_file}")
    device = torch.device(a.device)
    try:
        model = load_model(a.checkpoint_path, device, resolve_precision(a.precision, device))
        tokenizer = get_tokenizer(a.tokenizer_path or find_tokenizer(a.checkpoint_path.parent))
        seq_len = min(a.seq_len, model.config.block_size)
        if seq_len < 2:
            raise ValueError(f"--seq_len {a.seq_len} must be at least 2 (one token of context, one scored)")
        a.stride = max(seq_len // 4, 1) if a.stride is None else a.stride
        if not 0 < a.stride <= seq_len:
            raise ValueError(
                f"--stride {a.stride} must be in 1..{seq_len} "
                f"(--seq_len, capped at the model's context {model.config.block_size})"
            )
        if a.text_file is not None:
            ppl, n = perplexity(model, tokenizer, a.text_file.read_text(encoding="utf-8"), seq_len, a.stride, device)
            print(f"perplexity {ppl:.4f} over {n} tokens ({a.text_file})")
        if a.tasks:
            results = run_harness(GPTFastLM(model, tokenizer, device), a.tasks, a.limit, a.num_fewshot, a.include_path)
            for task, metrics in results.items():
                print(task, {k: v for k, v in metrics.items() if isinstance(v, (int, float))})
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    sys.exit(main())
