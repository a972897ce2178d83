"""Text generation: sampling, prefill, the decode loop, speculative decoding, and the command line."""

import argparse
import contextlib
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import kernels
import quantize
from bench import measure_read_bandwidth, weight_bytes_per_token
from model import ModelArgs, Transformer, run_layer

# ---------------------------------------------------------------- sampling


def multinomial_sample_one_no_sync(probs: Tensor) -> Tensor:
    """Sample from probs [..., V] by the exponential-race trick: no host sync, unlike torch.multinomial."""
    q = torch.empty_like(probs).exponential_(1)
    return torch.argmax(probs / q, dim=-1, keepdim=True).to(dtype=torch.int)


def logits_to_probs(
    logits: Tensor, temperature: float | Tensor = 1.0, top_k: Optional[int] = None, top_p: float | Tensor | None = None
) -> Tensor:
    """Next-token distribution [..., V]; temperature 0 gives the one-hot of the argmax (greedy). temperature and top_p
    may be 0-d tensors (sample_any), temperature then above 0."""
    logits = logits.float()
    if not isinstance(temperature, Tensor) and temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.size(-1)).float()
    logits = logits / temperature
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits = torch.where(logits < v[..., -1:], -float("inf"), logits)
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and (isinstance(top_p, Tensor) or top_p < 1.0):
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p  # keep the smallest head whose mass reaches top_p
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample(
    logits: Tensor, temperature: float | Tensor = 1.0, top_k: Optional[int] = None, top_p: float | Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """From the last position's logits [B, S, V]: (token [B, 1], probs [B, V]). With top_k, exactly the k largest
    logits are candidates (logits_to_probs keeps ties with the k-th too)."""
    logits = logits[:, -1].float()  # [B, V]
    if isinstance(temperature, Tensor):
        return sample_any(logits, temperature, top_k, top_p)
    if temperature == 0:  # greedy draws no random numbers: a prompt's chunks leave the sampling stream alone
        return logits.argmax(-1, keepdim=True).int(), logits_to_probs(logits, 0)
    if top_k is None or top_k >= logits.size(-1):
        probs = logits_to_probs(logits, temperature, top_k, top_p)
        return multinomial_sample_one_no_sync(probs), probs
    # Softmax and draw over the k candidates alone: at batch 1 a softmax over the whole vocabulary is one slow GPU
    # program, and unsorted top-k skips a sort.
    top, idx = torch.topk(logits, top_k, sorted=False)  # [B, k]
    probs_k = logits_to_probs(top, temperature, None, top_p)  # [B, k]
    token = idx.gather(-1, multinomial_sample_one_no_sync(probs_k).long()).int()  # [B, 1]
    return token, torch.zeros_like(logits).scatter_(-1, idx, probs_k)


def sample_any(
    logits: Tensor, temperature: Tensor, top_k: Optional[int] = None, top_p: Optional[Tensor] = None
) -> tuple[Tensor, Tensor]:
    """sample() for logits [B, V] with temperature (and top_p) as 0-d tensors, 0 for greedy: every value in one
    compiled graph, where a float is baked into the graph and each new value compiles it again (serve.py's
    clients send any)."""
    probs = logits_to_probs(logits, temperature.clamp(min=1e-4), top_k, top_p)  # greedy: nearly one-hot, finite
    greedy = logits.argmax(-1, keepdim=True).int()
    return torch.where(temperature == 0, greedy, multinomial_sample_one_no_sync(probs)), probs


# ---------------------------------------------------------------- the generation loop


def model_forward(model: Transformer, x: Tensor, input_pos: Tensor) -> Tensor:
    return model(x, input_pos)


def prefill(
    model: Transformer, x: Tensor, input_pos: Tensor, continued: bool = False, **sampling_kwargs
) -> tuple[Tensor, Tensor]:
    """Run the prompt x [B, T] (continued: a later chunk of it) through the model, filling the KV cache; return the
    token [B, 1] that follows and its distribution [B, V], from the last position's logits alone."""
    return sample(model(x, input_pos, prefill=True, continued=continued, last_only=True), **sampling_kwargs)


PREFILL_BUCKETS = (16, 32, 64)  # short prompts' padded lengths under --compile: one CUDA graph each


def warm_up_prompt_lengths(context: int, new_tokens: int) -> list[int]:
    """Prompt lengths whose runs compile each padded prefill graph that fits context with new_tokens to decode (every
    bucket twice, as a CUDA graph records on a step's second call), then one longer prompt for the compiled prefill
    layer (compile_prefill_layer), which serves every longer length."""
    return [n for n in [*PREFILL_BUCKETS * 2, PREFILL_BUCKETS[-1] + 1] if n + new_tokens <= context]


def prefill_padded(model: Transformer, x: Tensor, input_pos: Tensor, last: Tensor, **sampling_kwargs):
    """Prompt positions padded on the right, x [B, S] at consecutive input_pos [S], run as a decode step of S
    positions (causal mask over the cache); returns what prefill does, from x's position last [1]. A padding position
    sees only what comes before it, and its cache entries lie past the prompt, where each later step writes before
    any query reads."""
    return sample(model(x, input_pos).index_select(1, last), **sampling_kwargs)


def bucketed_prefill(padded_fn, fallback_fn):
    """A prefill that runs up to PREFILL_BUCKETS[-1] prompt positions (a short prompt, the last chunk of a long one,
    a chat's new turn), padded to the next bucket, in padded_fn: compiled with CUDA graphs, it replays them in one
    launch where a prefill of dynamic shape launches every kernel from Python, which costs more than the weights'
    read for a few positions, and for a small batch of short prompts. More positions, and batches of more rows than
    dequant_matmul takes, use fallback_fn: graphs of more rows measured far slower than it (docs/dropped.md)."""

    def run(model: Transformer, x: Tensor, input_pos: Tensor, continued: bool = False, **sampling_kwargs):
        B, S = x.shape
        n = next((n for n in PREFILL_BUCKETS if n >= S), 0)
        end = int(input_pos[0]) + n if n else 0  # the padding's positions must lie inside the cache
        if not n or B * n > kernels.MATMUL_MAX_ROWS or end > model.max_seq_length:
            return fallback_fn(model, x, input_pos, continued=continued, **sampling_kwargs)
        last, pos = torch.tensor([S - 1], device=x.device), torch.arange(end - n, end, device=x.device)
        return padded_fn(model, F.pad(x, (0, n - S)), pos, last, **sampling_kwargs)

    return run


def decode_one_token(model: Transformer, x: Tensor, input_pos: Tensor, **sampling_kwargs) -> tuple[Tensor, Tensor]:
    """One step: token x [B, 1] at input_pos [1] -> (next token [B, 1], its distribution [B, V])."""
    return sample(model(x, input_pos), **sampling_kwargs)


PREFILL_CHUNK = 2048  # prompt positions per prefill step: activation memory stays bounded for any prompt length


def decode_n_tokens(
    model,
    cur_token: Tensor,
    input_pos: Tensor,
    num_new_tokens: int,
    callback=None,
    stop_ids=None,
    decode=decode_one_token,
    done: Optional[Tensor] = None,
    **sampling_kwargs,
) -> tuple[list[Tensor], list[Tensor]]:
    """Up to num_new_tokens decode steps; stops early once every row has emitted one of stop_ids (done [B]: the
    rows that have already), or when callback (given each new token [B, 1]) returns True."""
    new_tokens, new_probs = [], []
    if done is None:
        done = torch.zeros(cur_token.shape[0], dtype=torch.bool, device=cur_token.device)
    for _ in range(num_new_tokens):
        with sdpa_kernel(SDPBackend.MATH):  # decomposed attention for inductor to fuse (as gpt-fast)
            next_token, next_prob = decode(model, cur_token, input_pos, **sampling_kwargs)
        input_pos += 1
        new_tokens.append(next_token.clone())  # CUDA-graph outputs are overwritten by the next replay
        new_probs.append(next_prob.clone())
        if callback is not None and callback(new_tokens[-1]):  # a stop string
            break
        cur_token = next_token.clone()
        if stop_ids is not None:
            done |= torch.isin(next_token[:, 0], stop_ids)
            if bool(done.all()):  # a host sync per step: only when asked to stop at EOS
                break
    return new_tokens, new_probs


def ngram_proposal(tokens: Tensor, k: int, max_ngram: int = 3) -> Tensor:
    """Prompt lookup: the k tokens that followed the latest earlier match of the last n tokens (longest n first)."""
    for n in range(min(max_ngram, tokens.numel() - 1), 0, -1):
        windows = tokens[:-1].unfold(0, n, 1)  # [L-n, n]: every earlier n-gram
        hits = (windows == tokens[-n:]).all(dim=1).nonzero()
        if hits.numel():
            start = int(hits[-1]) + n
            return tokens[start : start + k]
    return tokens[:0]


def speculative_decode(
    model,
    draft_model,
    cur_token: Tensor,
    input_pos: int,
    speculate_k: int,
    proposal: Optional[Tensor] = None,
    decode=decode_one_token,
    verify=model_forward,
    **sampling_kwargs,
) -> Tensor:
    """One speculative step at batch 1: propose, verify in one target forward, keep the accepted prefix.

    The draft model proposes speculate_k tokens, or `proposal` (n-gram lookup) is a deterministic draft.
    Acceptance is the standard rejection rule, so the output follows the target's distribution exactly.
    Returns 1..k+1 new tokens.
    """
    device = cur_token.device
    if proposal is None:
        draft_tokens, draft_probs = decode_n_tokens(
            draft_model,
            cur_token.view(1, -1),
            torch.tensor([input_pos], device=device),
            speculate_k,
            decode=decode,
            **sampling_kwargs,
        )
        draft_tokens, draft_probs = torch.cat(draft_tokens).view(-1), torch.cat(draft_probs)  # [k], [k, V]
    else:
        draft_tokens = proposal.to(device)
        draft_probs = None  # a deterministic proposal puts probability 1 on its token
    k = draft_tokens.numel()
    x = torch.cat([cur_token.view(1), draft_tokens]).view(1, -1)  # [1, k+1]
    with sdpa_kernel(SDPBackend.MATH):
        target_logits = verify(model, x, torch.arange(input_pos, input_pos + k + 1, device=device))
    target_probs = logits_to_probs(target_logits[0], **sampling_kwargs)
    q = target_probs[torch.arange(k, device=device), draft_tokens]  # [k]
    p = torch.ones_like(q) if draft_probs is None else draft_probs[torch.arange(k, device=device), draft_tokens]
    rejected = (torch.rand_like(q) >= torch.clamp(q / p, max=1.0)).nonzero()
    if rejected.numel() == 0:
        last = multinomial_sample_one_no_sync(target_probs[-1])
        if draft_model is not None:  # the draft has not seen its own last token yet
            decode(
                draft_model,
                draft_tokens[-1].view(1, -1),
                torch.tensor([input_pos + k], device=device),
                **sampling_kwargs,
            )
        return torch.cat([draft_tokens, last.view(1)])
    n = int(rejected[0, 0])
    draft_dist = (
        draft_probs[n]
        if draft_probs is not None
        else torch.nn.functional.one_hot(draft_tokens[n].long(), target_probs.size(-1)).float()
    )
    residual = torch.clamp(target_probs[n] - draft_dist, min=0.0)  # resample from max(q - p, 0)
    next_token = multinomial_sample_one_no_sync(residual / residual.sum())
    return torch.cat([draft_tokens[:n], next_token.view(1)])


@torch.no_grad()
def generate(
    model: Transformer,
    prompt: Tensor | list[Tensor],
    max_new_tokens: int,
    *,
    batch_size: int = 1,
    draft_model: Optional[Transformer] = None,
    speculate: Optional[str] = None,
    speculate_k: int = 8,
    callback: Optional[Callable[[Tensor], bool]] = None,
    stop_ids: Optional[list[int]] = None,
    prefill_fn=prefill,
    decode_fn=decode_one_token,
    verify_fn=model_forward,
    prefill_chunk: int = PREFILL_CHUNK,
    cached: int = 0,
    **sampling_kwargs,
) -> tuple[Tensor, dict]:
    """Generate up to max_new_tokens after prompt [T] in batch_size rows, or after each prompt of a list, one row
    each; returns (tokens [B, T + n], stats). Prompts of different lengths are padded on the left to the longest,
    T (model.set_row_starts): row b's prompt starts at stats["start"][b].

    speculate: None, "draft" (needs draft_model) or "ngram". Generation stops early when every row has
    produced a token of stop_ids; the rest of a row after its stop token is left as generated. The prompt runs
    prefill_chunk positions at a time (0: at once), so that its activations take bounded memory. cached: the first
    positions of a single prompt whose keys and values the cache already holds (a chat's earlier turns, one row, no
    draft model); they are used unless the cache has to be allocated anew.
    """
    prompts = list(prompt) if isinstance(prompt, (list, tuple)) else [prompt.view(-1)] * batch_size
    batch_size, lengths = len(prompts), [p.numel() for p in prompts]
    T, device = max(lengths, default=0), prompts[0].device if prompts else torch.device("cpu")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be at least 1")
    if min(lengths, default=0) < 1:
        raise ValueError("the prompt is empty: generation needs at least one token")
    if speculate is not None and speculate_k < 1:
        raise ValueError(f"speculate_k={speculate_k} must be at least 1")
    if speculate is not None and batch_size != 1:
        raise ValueError(f"speculative decoding runs at batch size 1, got batch_size={batch_size}")
    if speculate == "draft" and draft_model is None:
        raise ValueError("speculate='draft' needs a draft_model")
    if cached and (batch_size != 1 or draft_model is not None or not 0 < cached < T):
        raise ValueError(f"cached={cached}: needs one row, no draft model, and at least one new prompt token")
    max_seq_length = cache_length(T, max_new_tokens, speculate, speculate_k, model.config.block_size)
    if T + max_new_tokens > model.config.block_size:
        raise ValueError(
            f"prompt ({T} tokens) + max_new_tokens ({max_new_tokens}) "
            f"exceeds the context length {model.config.block_size}"
        )
    if model.setup_caches(max_batch_size=batch_size, max_seq_length=max_seq_length):
        cached = 0  # a new, empty cache
    if draft_model is not None:
        draft_model.setup_caches(max_batch_size=1, max_seq_length=max_seq_length)
    stop = torch.tensor(stop_ids, device=device) if stop_ids else None

    seq = torch.zeros(batch_size, T + max_new_tokens, dtype=torch.int, device=device)
    for b, p in enumerate(prompts):
        seq[b, T - p.numel() : T] = p  # [B, T]: left padding
    start = [T - n for n in lengths]
    model.set_row_starts(torch.tensor(start, dtype=torch.int))
    chunk = prefill_chunk if prefill_chunk > 0 else T
    for s in range(cached, T, chunk):  # only the last chunk's token is kept: greedy before it, which draws nothing
        end = min(s + chunk, T)
        x, pos, last = seq[:, s:end], torch.arange(s, end, device=device), end == T
        kwargs = sampling_kwargs if last else {**sampling_kwargs, "temperature": 0}
        next_token = prefill_fn(model, x, pos, continued=s > 0, **kwargs)[0].clone()
        if draft_model is not None:
            prefill_fn(draft_model, x, pos, continued=s > 0, **kwargs)
    seq[:, T] = next_token.view(batch_size)
    stopped = callback is not None and callback(next_token)
    stats = {"prefill_end": _now(device), "start": start}
    n = 1
    done = torch.isin(next_token[:, 0], stop) if stop is not None else None
    if stopped or (done is not None and bool(done.all())):
        return seq[:, : T + 1], stats

    if speculate is None:
        tokens, _ = decode_n_tokens(
            model,
            next_token.view(batch_size, -1),
            torch.tensor([T], device=device),
            max_new_tokens - 1,
            callback,
            stop,
            decode_fn,
            done,
            **sampling_kwargs,
        )
        if tokens:
            seq[:, T + 1 : T + 1 + len(tokens)] = torch.cat(tokens, dim=-1)
        return seq[:, : T + 1 + len(tokens)], stats

    accept_counts = [0] * (speculate_k + 1)
    history = seq[0, : T + 1].cpu()  # the n-gram lookup searches prompt + output on the host
    while n < max_new_tokens:
        # always k proposals (one compiled verify shape); fewer only where the cache ends
        k = min(speculate_k, model.max_seq_length - (T + n))
        proposal = ngram_proposal(history, k) if speculate == "ngram" else None
        if k == 0 or (proposal is not None and proposal.numel() == 0):
            x, pos = seq[:, T + n - 1 : T + n], torch.tensor([T + n - 1], device=device)
            new, _ = decode_fn(model, x, pos, **sampling_kwargs)
            new = new.view(1).clone()
            if draft_model is not None:  # keep the draft's cache in step
                decode_fn(draft_model, x, pos, **sampling_kwargs)
        else:
            if proposal is not None and proposal.numel() < k:  # a match near the end: pad (any proposal is exact)
                proposal = torch.cat([proposal, proposal[-1:].expand(k - proposal.numel())])
            new = speculative_decode(
                model, draft_model, seq[0, T + n - 1], T + n - 1, k, proposal, decode_fn, verify_fn, **sampling_kwargs
            )
        accept_counts[len(new) - 1] += 1
        new = new[: max_new_tokens - n]  # a full step can overshoot max_new_tokens
        hit = torch.isin(new, stop).nonzero() if stop is not None else new[:0]
        if hit.numel():
            new = new[: int(hit[0]) + 1]  # cut after the first stop token
        for i, t in enumerate(new if callback is not None else ()):
            if callback(t.view(1, 1)):  # a stop string: keep the tokens up to it
                new, hit = new[: i + 1], new[:1]
                break
        seq[0, T + n : T + n + len(new)] = new
        history = torch.cat([history, new.cpu()])
        n += len(new)
        if hit.numel():
            break
    stats["accept_counts"] = accept_counts
    return seq[:, : T + n], stats


def cache_length(T: int, max_new_tokens: int, speculate: Optional[str], speculate_k: int, block_size: int) -> int:
    """The KV-cache positions that generating max_new_tokens after T prompt tokens writes, within the context; a
    speculative verification writes up to k + 1 past the end."""
    return min(T + max_new_tokens + (speculate_k + 1 if speculate else 0), block_size)


def _now(device: torch.device) -> float:
    """Host time after the device has finished what was queued."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


# ---------------------------------------------------------------- loading


def load_model(
    checkpoint_path,
    device,
    precision=torch.bfloat16,
    use_tp: bool = False,
    kernels_mode: str = "auto",
    pdl: bool = False,
    rows: int = 1,
) -> Transformer:
    """The model of a checkpoint (bf16, int8 or int4, read from its tensors), placed on the device with its kernels."""
    return place(quantize.load_checkpoint_model(checkpoint_path), device, precision, use_tp, kernels_mode, pdl, rows)


def place(
    model: Transformer, device, precision, use_tp: bool, kernels_mode: str = "auto", pdl: bool = False, rows: int = 1
) -> Transformer:
    """Shard (tensor parallel), move and cast; then our kernels where they run (kernels.py), and torch's int4
    kernels for the int4 layers left; rows: the rows of its decode steps, which pick the int4 kernel."""
    if use_tp:
        import tp

        tp.apply_tp(model)
    model = model.to(device=device, dtype=precision)
    kernels.use_kernels(model, device, kernels_mode, pdl, rows)
    quantize.prepare_for_device(model, device)
    return model.eval()


def repack_memory(model: Transformer, device) -> Transformer:
    """Quantizing in GPU memory leaves the allocator's blocks fragmented (far more reserved than the weights need);
    a round trip through host memory lays the weights out as loading a checkpoint does."""
    if torch.device(device).type != "cuda":
        return model
    model = model.to("cpu")
    torch.cuda.empty_cache()
    return model.to(device)


def random_model(args: ModelArgs, device, precision=torch.bfloat16, seed: int = 0) -> Transformer:
    """A model of the given shape with random weights (std 0.02): decode speed depends on bytes, not values."""
    with torch.device("meta"):
        model = Transformer(args).to(precision)
    model = model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    if args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return model.eval()


# ---------------------------------------------------------------- command line

FILE_BATCH_SIZE = 8  # --prompt_file's default --batch_size


def add_model_flags(p: argparse.ArgumentParser) -> None:
    """The flags that load and compile a model: generate.py's and serve.py's."""
    p.add_argument(
        "--checkpoint_path",
        type=Path,
        default=Path(__file__).resolve().parent / "models/stories260K/model.pth",
        help="model.pth (or model_int8.pth, model_int4.g32.pth); default: the demo model",
    )
    p.add_argument(
        "--tokenizer_path",
        type=Path,
        default=None,
        help="tokenizer file; default: tokenizer.model, else tokenizer.json, beside the checkpoint",
    )
    p.add_argument("--compile", action="store_true", help="compile the decode step (torch.compile, CUDA graphs)")
    p.add_argument(
        "--compile_prefill",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="compile prefill's layers: one layer for any prompt length (dynamic shapes), called for each layer; "
        "on by default with --compile, works without it; not for a mixture of experts",
    )
    p.add_argument(
        "--compile_layer_once",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="with --compile (on by default): compile one transformer layer and reuse it for every layer "
        "(half the compile time)",
    )
    p.add_argument(
        "--prefill_graphs",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="with --compile on CUDA (on by default): prompts of up to 64 tokens prefill in CUDA graphs, one per "
        "padded length 16, 32, 64 (a shorter time to first token, a longer first compile)",
    )
    p.add_argument(
        "--compile_cache",
        type=Path,
        default=None,
        help="file of compiled artifacts: loaded if present, written after compiling",
    )
    p.add_argument(
        "--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu", help="cuda (also ROCm) or cpu"
    )
    p.add_argument(
        "--precision",
        choices=["bf16", "fp16", "fp32"],
        default=None,
        help="weights/activations dtype; default bf16 on GPU, fp32 on CPU",
    )
    p.add_argument(
        "--random_init",
        type=str,
        default=None,
        metavar="MODEL_NAME",
        help="no checkpoint: random weights of this named config (for benchmarks)",
    )
    p.add_argument(
        "--quantize",
        choices=["int8", "int4"],
        default=None,
        help="with --random_init: quantize the random weights in memory",
    )
    p.add_argument(
        "--groupsize", type=int, default=None, help="with --random_init --quantize int4: group size (default 32)"
    )
    p.add_argument(
        "--kernels",
        choices=["auto", "gemv", "torch"],
        default=None,
        help="decode matmuls on CUDA: auto (every linear layer on our Triton GEMVs, w1/w3 as one gated kernel, "
        "the RMSNorms and residual adds inside them; batches on dequant_matmul), gemv (the GEMVs only; float: wo, "
        "w2, output) or torch (inductor's own reductions, tinygemm for int4)",
    )
    p.add_argument(
        "--attention_kernel",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="each decode step's attention (q's RoPE, softmax(q K^T) V over the cache) as one Triton kernel "
        "instead of ~6; default: on for one CUDA GPU when the head sizes are powers of two (faster)",
    )
    p.add_argument("--seed", type=int, default=1234, help="random seed for sampling and synthetic prompts")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Generate text with a Llama-family or Mixtral model.")
    add_model_flags(p)
    p.add_argument(
        "--prompt",
        type=str,
        default=None,
        help="prompt text, '-' to read it from stdin, or an integer N for a synthetic prompt of N tokens "
        "(default: 'Hello, my name is')",
    )
    p.add_argument(
        "--prompt_file",
        type=Path,
        default=None,
        help='UTF-8 file of prompts, one per line (a .jsonl file: one {"prompt": ...} per line), generated '
        "--batch_size at a time, each once",
    )
    p.add_argument(
        "--output_jsonl",
        type=Path,
        default=None,
        help='write one {"prompt": ..., "completion": ...} line per prompt (per sequence of the last sample)',
    )
    p.add_argument(
        "--stop", nargs="+", default=None, metavar="TEXT", help="stop when the output contains any of these strings"
    )
    p.add_argument("--system", type=str, default=None, help="with --interactive: a system prompt for the chat")
    p.add_argument(
        "--stream",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="print the text as it comes (default: on when writing to a terminal, with one sequence)",
    )
    p.add_argument(
        "--interactive",
        action="store_true",
        help="chat: read prompts from stdin, apply the chat template, stream the reply",
    )
    p.add_argument("--num_samples", type=int, default=None, help="how many times to generate (default 5)")
    p.add_argument("--max_new_tokens", type=int, default=200, help="tokens to generate per sample")
    p.add_argument(
        "--batch_size",
        type=int,
        default=None,
        help="sequences generated together: copies of --prompt, or prompts of --prompt_file (default 1; "
        f"with --prompt_file {FILE_BATCH_SIZE})",
    )
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 = greedy")
    p.add_argument("--top_k", type=int, default=200, help="sample only among the k most likely tokens (0 = off)")
    p.add_argument(
        "--top_p", type=float, default=1.0, help="nucleus sampling: smallest set of tokens with this much mass"
    )
    p.add_argument(
        "--prefill_chunk",
        type=int,
        default=PREFILL_CHUNK,
        help="prompt positions run per prefill step (0: the whole prompt at once); bounds the activations' memory",
    )
    p.add_argument("--draft_checkpoint_path", type=Path, default=None, help="draft model for speculative decoding")
    p.add_argument(
        "--draft_quantize",
        choices=["int8", "int4"],
        default=None,
        help="with --random_init: the draft is a quantized copy of the target",
    )
    p.add_argument(
        "--speculate",
        choices=["draft", "ngram"],
        default=None,
        help="speculative method; 'draft' is implied by --draft_checkpoint_path",
    )
    p.add_argument("--speculate_k", type=int, default=None, help="tokens proposed per speculative step (default 5)")
    p.add_argument(
        "--ignore_eos", action="store_true", help="always generate max_new_tokens, even past the end-of-sequence token"
    )
    p.add_argument("--profile", type=Path, default=None, help="write a Chrome trace of the last sample to PROFILE.json")
    args = p.parse_args(argv)
    if (args.draft_checkpoint_path is not None or args.draft_quantize) and args.speculate is None:
        args.speculate = "draft"
    check_args(args)
    args.prompt = "Hello, my name is" if args.prompt is None else args.prompt
    args.num_samples = 5 if args.num_samples is None else args.num_samples
    if args.batch_size is None:
        args.batch_size = FILE_BATCH_SIZE if args.prompt_file and not args.speculate else 1
    finish_model_args(args)
    args.speculate_k = 5 if args.speculate_k is None else args.speculate_k
    if args.stream is None:  # a terminal sees the text as it comes; pipes and benchmarks get it at the end
        args.stream = sys.stdout.isatty() and args.batch_size == 1 and not args.interactive
    return args


def finish_model_args(args) -> None:
    """The model flags' defaults that depend on other flags."""
    if args.compile_layer_once is None:  # one compiled layer is --compile's default
        args.compile_layer_once = args.compile
    if args.prefill_graphs is None:
        args.prefill_graphs = args.compile
    if args.compile_prefill is None:
        args.compile_prefill = args.compile
    args.groupsize = args.groupsize or 32
    args.kernels = args.kernels or "auto"


def check_args(args) -> None:
    """Refuse, before loading anything, flag values and combinations that have no meaning."""
    if args.prefill_chunk < 0:
        raise SystemExit(f"error: --prefill_chunk {args.prefill_chunk} is negative: use 0 for the whole prompt at once")
    if args.temperature < 0:
        raise SystemExit(f"error: --temperature {args.temperature} is negative: use 0 for greedy or a positive value")
    if args.top_k < 0:
        raise SystemExit(f"error: --top_k {args.top_k} is negative: use 0 to turn it off")
    if not 0 < args.top_p <= 1:
        raise SystemExit(f"error: --top_p {args.top_p} is outside (0, 1]: use 1 to turn it off")
    if args.speculate_k is not None and not args.speculate:
        raise SystemExit("error: --speculate_k applies to speculative decoding: add --speculate or a draft")
    if args.speculate and args.speculate_k is not None and args.speculate_k < 1:
        raise SystemExit(f"error: --speculate_k {args.speculate_k} must be at least 1")
    if args.speculate == "ngram" and (args.draft_checkpoint_path or args.draft_quantize):
        raise SystemExit("error: --speculate ngram needs no draft model: drop --draft_checkpoint_path")
    check_model_args(args)
    if args.prompt_file is not None and not args.prompt_file.is_file():
        raise SystemExit(f"error: --prompt_file {args.prompt_file} is not a file")
    if args.prompt_file is not None and args.prompt is not None:
        raise SystemExit("error: --prompt and --prompt_file both give prompts: drop one")
    if args.prompt_file is not None and (args.interactive or args.num_samples not in (None, 1)):
        raise SystemExit("error: --prompt_file generates each of its prompts once: drop --interactive or --num_samples")
    if args.system is not None and not args.interactive:
        raise SystemExit("error: --system is the chat's system prompt: add --interactive")
    if args.interactive and args.batch_size not in (None, 1):
        raise SystemExit("error: --interactive chats one sequence at a time: drop --batch_size")
    if args.stream and (args.batch_size not in (None, 1) or args.prompt_file):
        raise SystemExit("error: --stream prints one sequence as it comes: drop --batch_size or --stream")
    if args.profile is not None and args.interactive:
        raise SystemExit("error: --profile traces the samples of a run, not a chat: drop one of them")


def check_model_args(args) -> None:
    """Refuse model flags that have no meaning (add_model_flags), before anything loads."""
    if args.compile_cache is not None and not (args.compile or args.compile_prefill):
        raise SystemExit("error: --compile_cache keeps compiled code: add --compile")
    if args.kernels is not None and args.device == "cpu":
        raise SystemExit(f"error: --kernels {args.kernels} picks CUDA kernels: drop it for --device cpu")
    if args.compile_layer_once and not args.compile:
        raise SystemExit("error: --compile_layer_once shapes the compiled decode step: add --compile")
    if args.prefill_graphs and not args.compile:
        raise SystemExit("error: --prefill_graphs records compiled steps: add --compile")
    if args.attention_kernel and args.device.split(":")[0] != "cuda":
        raise SystemExit(f"error: --attention_kernel is a CUDA kernel: drop it for --device {args.device}")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", args.device):
        raise SystemExit(f"error: --device {args.device} is not supported: use cpu or cuda (cuda:N for one GPU)")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no GPU is visible: pass --device cpu")
    for flag in ("quantize", "draft_quantize"):
        if getattr(args, flag, None) and not args.random_init:
            raise SystemExit(
                f"error: --{flag} quantizes --random_init weights: for a checkpoint, run quantize.py once "
                "and pass the file it writes (model_int8.pth, model_int4.g32.pth)"
            )
    if args.groupsize is not None and "int4" not in (args.quantize, getattr(args, "draft_quantize", None)):
        raise SystemExit("error: --groupsize only applies with --quantize int4 (or --draft_quantize int4)")
    if args.groupsize is not None and args.groupsize not in quantize.GROUPSIZES:
        raise SystemExit(f"error: --groupsize {args.groupsize} is not one of {quantize.GROUPSIZES}")


def resolve_precision(name: Optional[str], device: torch.device) -> torch.dtype:
    if name is None:
        name = "fp32" if device.type == "cpu" else "bf16"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def decode_rows(args) -> int:
    """The rows of the target model's decode steps: the batch size, or k + 1 when it verifies speculation; a
    server's batches vary and are often one row: 1."""
    if args.speculate:
        return args.speculate_k + 1
    return 1 if hasattr(args, "max_batch_size") else args.batch_size


def load_models(args, device, precision, use_tp, pdl: bool = False):
    """The target model (checkpoint or random) and the optional draft; CLI errors as one line."""
    rows = decode_rows(args)
    try:
        if args.random_init:
            config = ModelArgs.from_name(args.random_init)
            model = random_model(config, device, precision, args.seed)
            if args.quantize:
                model = repack_memory(quantize.quantize_model(model, args.quantize, args.groupsize), device)
            model = place(model, device, precision, use_tp, args.kernels, pdl, rows)
            draft = None
            if args.draft_quantize:  # same random weights, quantized: a draft that mostly agrees
                draft = quantize.quantize_model(
                    random_model(config, device, precision, args.seed), args.draft_quantize, args.groupsize
                )
                draft = repack_memory(draft, device)
                draft = place(draft, device, precision, use_tp, args.kernels, pdl)
        else:
            model = load_model(args.checkpoint_path, device, precision, use_tp, args.kernels, pdl, rows)
            draft = (
                load_model(args.draft_checkpoint_path, device, precision, use_tp, args.kernels, pdl)
                if args.draft_checkpoint_path
                else None
            )
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    if args.speculate == "draft" and draft is None:
        raise SystemExit("error: --speculate draft needs --draft_checkpoint_path")
    if draft is not None and draft.config.vocab_size != model.config.vocab_size:
        raise SystemExit(
            f"error: draft vocab {draft.config.vocab_size} != target vocab {model.config.vocab_size}: "
            "use a draft of the same family"
        )
    use_kernel = args.attention_kernel
    if use_kernel is None:  # the default: measured on one GPU only
        use_kernel = device.type == "cuda" and not torch.version.hip and not use_tp
    if use_kernel:
        fits = [kernels.use_decode_attention_kernel(m, pdl) for m in (model, draft) if m is not None]
        if args.attention_kernel and not all(fits):
            raise SystemExit(
                "error: --attention_kernel needs Triton and power-of-two head sizes and query heads per key/value head"
            )
    return model, draft


def load_tokenizer(args, vocab_size: int):
    from tokenizer import find_tokenizer, get_tokenizer

    path = args.tokenizer_path or find_tokenizer(args.checkpoint_path.parent)
    if args.random_init and args.tokenizer_path is None and args.prompt.isdigit():
        return None  # synthetic prompt, no text to encode
    try:
        tok = get_tokenizer(path)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}: pass --tokenizer_path") from None
    if tok.vocab_size > vocab_size:
        raise SystemExit(
            f"error: tokenizer {path} has {tok.vocab_size} tokens but the model only {vocab_size}: wrong tokenizer?"
        )
    return tok


def encode_prompt(args, tokenizer, vocab_size: int, text: Optional[str] = None) -> Tensor:
    """Tokens [T] of text (default --prompt); a number N in --prompt: N random tokens (a synthetic prompt)."""
    if text is None and args.prompt.isdigit():
        g = torch.Generator().manual_seed(args.seed)
        return torch.randint(3, min(vocab_size, 32000), (int(args.prompt),), generator=g).int()
    if tokenizer is None:
        raise SystemExit("error: a text prompt needs a tokenizer: pass --tokenizer_path")
    return torch.tensor(tokenizer.encode(args.prompt if text is None else text), dtype=torch.int)


def read_prompts(path: Path) -> list[str]:
    """--prompt_file's prompts: each non-empty line, or the "prompt" of each line of a .jsonl file."""
    try:
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeError:
        raise SystemExit(f"error: --prompt_file {path} is not UTF-8 text") from None
    try:
        prompts = [json.loads(line)["prompt"] for line in lines] if path.suffix == ".jsonl" else lines
        valid = all(isinstance(p, str) and p for p in prompts)
    except (ValueError, KeyError, TypeError):  # not JSON, no "prompt" key, or not an object
        valid = False
    if not valid:
        raise SystemExit(f'error: --prompt_file {path}: each line of a .jsonl file must be {{"prompt": "text"}}')
    if not prompts:
        raise SystemExit(f"error: --prompt_file {path} holds no prompt")
    return prompts


def read_prompt(args) -> str:
    """The prompt text: stdin for --prompt -, else --prompt; one-line errors for what is not text."""
    try:
        if args.prompt == "-":
            text = sys.stdin.read()
        else:
            text = args.prompt
        text.encode("utf-8")  # command-line bytes that are not UTF-8 arrive as lone surrogates
    except UnicodeError:
        raise SystemExit("error: the prompt is not valid UTF-8 text") from None
    return text


def model_config(args) -> tuple[ModelArgs, int]:
    """The model's config and the bytes its weights (and a draft's) take in memory, read before anything loads."""
    precision = resolve_precision(args.precision, torch.device(args.device))
    if args.random_init:
        config = ModelArgs.from_name(args.random_init)
        with torch.device("meta"):
            n = sum(p.numel() for p in Transformer(config).parameters())
        return config, n * precision.itemsize * (2 if args.draft_quantize else 1)  # float before quantizing
    total = 0
    for path in (args.checkpoint_path, args.draft_checkpoint_path):
        if path is None:
            continue
        tensors = quantize.read_state_dict(path).values()
        total += sum(t.numel() * (precision.itemsize if t.is_floating_point() else t.element_size()) for t in tensors)
    return ModelArgs.from_checkpoint(args.checkpoint_path), total


def free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():  # MemAvailable counts the page cache the kernel can reclaim
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_fits(args, cfg: ModelArgs, weight_bytes: int, prompt_len: int, device: torch.device, world: int = 1) -> None:
    """Refuse, before loading anything, what cannot fit the context or the memory."""
    if prompt_len < 1:
        raise SystemExit("error: the prompt is empty: pass some text or a token count of at least 1")
    if args.max_new_tokens < 1 or args.batch_size < 1 or args.num_samples < 1:
        raise SystemExit("error: --max_new_tokens, --batch_size and --num_samples must be at least 1")
    if args.speculate and args.batch_size != 1:
        raise SystemExit(f"error: speculative decoding runs at batch size 1, not {args.batch_size}: drop --batch_size")
    if prompt_len + args.max_new_tokens > cfg.block_size:
        raise SystemExit(
            f"error: prompt ({prompt_len} tokens) + --max_new_tokens ({args.max_new_tokens}) = "
            f"{prompt_len + args.max_new_tokens} "
            f"exceeds the context length {cfg.block_size}: shorten the prompt or lower --max_new_tokens"
        )
    itemsize = resolve_precision(args.precision, device).itemsize
    seq = prompt_len + args.max_new_tokens + args.speculate_k + 1
    kv_bytes = 2 * cfg.n_layer * args.batch_size * cfg.n_local_heads * cfg.head_dim * seq * itemsize // world
    weight_bytes //= world
    free = free_memory(device)
    if weight_bytes > free:
        raise SystemExit(
            f"error: the weights need {weight_bytes / 1e9:.1f} GB on {device} but {free / 1e9:.1f} GB is free: "
            "use a smaller model, --precision bf16, or an int8 / int4 checkpoint (quantize.py)"
        )
    if weight_bytes + kv_bytes > free:
        raise SystemExit(
            f"error: the KV cache for --batch_size {args.batch_size} needs {kv_bytes / 1e9:.1f} GB "
            f"but {(free - weight_bytes) / 1e9:.1f} GB is free beside the weights: lower --batch_size"
        )


def use_pdl(device: torch.device, use_tp: bool) -> bool:
    """Programmatic dependent launch: each kernel starts launching while the one before it drains (Hopper and
    later). On by default on one GPU (same logits as without); TORCHINDUCTOR_ENABLE_PDL=0 turns it off, =1 on under
    tensor parallel too, where it is not measured."""
    forced = os.environ.get("TORCHINDUCTOR_ENABLE_PDL")
    if device.type != "cuda" or torch.version.hip or forced == "0":
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9 and (forced == "1" or not use_tp)  # the PTX needs sm_90


def set_inductor_options(device: str, pdl: bool = False) -> None:
    """Inductor settings for fast batch-1 decode and quick warm starts (process-wide, as torch keeps them)."""
    import torch._inductor.config as inductor_config

    kernels.lower_materialize_to_a_buffer()
    inductor_config.triton.enable_pdl = pdl  # use_pdl decides
    inductor_config.coordinate_descent_tuning = True  # tunes the GEMV-shaped kernels of batch-1 decode
    inductor_config.triton.unique_kernel_names = True
    inductor_config.fx_graph_cache = True  # reuse compiled kernels between runs
    if device == "cuda" and "TORCHINDUCTOR_COMPILE_THREADS" not in os.environ:
        # a warm start loads ~90 Triton kernels from disk; starting a worker pool costs more
        inductor_config.compile_threads = 1
    if torch.__version__ < (2, 12) and hasattr(inductor_config, "use_static_cuda_launcher"):
        # torch <= 2.11 re-tunes every kernel at warm start through it (pytorch#172819)
        inductor_config.use_static_cuda_launcher = False


# Under torch.compile, layers of one shape share one compiled graph instead of one inlined copy each: the cold
# compile takes about half as long, and decode is as fast or faster. Eager, it is a plain call.
run_layer_once = torch.compiler.nested_compile_region(run_layer)


def compile_prefill_layer():
    """Prefill's layer call under --compile_prefill: one layer compiled for any prompt length (dynamic shapes) and
    called for each layer, whose weights are its graph's inputs, so one graph serves them all. It compiles one layer
    where a compiled prefill would inline every one, and launches inductor's fused kernels where eager launches each
    op from Python, which costs more than the math below a few hundred positions."""
    # outside CUDA graphs each launch costs host time, which torch's static launcher cuts; set_inductor_options turns
    # it off on torch <= 2.11, whose warm start re-tunes through it, so this graph skips coordinate-descent tuning
    import torch._inductor.config as inductor_config

    options = {"coordinate_descent_tuning": False}
    if hasattr(inductor_config, "use_static_cuda_launcher"):
        options["use_static_cuda_launcher"] = True
    return torch.compile(run_layer, dynamic=True, fullgraph=True, options=options)


def compile_steps(args, device: torch.device, fused_kernels_ok: bool, pdl: bool = False):
    """The step functions, compiled when asked: decode and short prompts (on CUDA) with CUDA graphs (prefill's
    layers are compiled in setup: compile_prefill_layer)."""
    steps = {"prefill_fn": prefill, "decode_fn": decode_one_token, "verify_fn": model_forward}
    if not (args.compile or args.compile_prefill):
        return steps
    set_inductor_options(args.device, pdl)
    if args.compile:
        steps["decode_fn"] = torch.compile(decode_one_token, mode="reduce-overhead", fullgraph=True)
    if args.compile and args.speculate:
        steps["verify_fn"] = torch.compile(model_forward, mode="reduce-overhead", fullgraph=True)
    if args.prefill_graphs and fused_kernels_ok and device.type == "cuda":  # (a mixture of experts keeps its own)
        padded = torch.compile(prefill_padded, mode="reduce-overhead", fullgraph=True, dynamic=False)
        steps["prefill_fn"] = bucketed_prefill(padded, steps["prefill_fn"])
    return steps


class TextStream:
    """The reply as text, token by token (a host sync each): printed as it comes when echo, and a stop when it holds
    one of stop_strings. The whole reply is decoded each time, so word boundaries come out right; the last
    characters wait until they cannot be the start of a stop string."""

    def __init__(
        self, tokenizer, stop_ids=(), stop_strings=(), echo: bool = True, emit: Optional[Callable] = None, context=()
    ):
        self.tokenizer, self.stop_ids, self.stop_strings, self.echo = tokenizer, set(stop_ids), stop_strings, echo
        self.emit = emit or (lambda text: print(text, end="", flush=True))  # serve.py sends it to a client
        self.ids, self.text, self.printed, self.stopped = list(context), "", 0, False
        self.skip = len(tokenizer.decode(self.ids))  # context: the prompt's last tokens (the first word's space)
        self.hold = max((len(s) for s in stop_strings), default=1) - 1

    def __call__(self, token: Tensor) -> bool:
        return self.add(int(token.view(-1)[0]))

    def add(self, t: int) -> bool:
        """One more token id of the reply; True once its text holds a stop string."""
        if self.stopped or t in self.stop_ids:
            return self.stopped
        self.ids.append(t)
        self.text = self.tokenizer.decode(self.ids)[self.skip :]
        cut = min((i for i in (self.text.find(s) for s in self.stop_strings) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.stopped = self.text[:cut], True
        upto = len(self.text) if self.stopped else len(self.text) - self.hold
        while not self.stopped and 0 < upto and self.text[upto - 1] == "\ufffd":  # a character cut between pieces
            upto -= 1
        self.show(upto)
        return self.stopped

    def show(self, upto: int) -> None:
        if self.echo and upto > self.printed:
            self.emit(self.text[self.printed : upto])
            self.printed = upto

    def finish(self) -> str:
        """Print what was held back; the reply's text."""
        self.show(len(self.text))
        return self.text


def run_sample(
    model, prompt: Tensor | list[Tensor], args, steps, stop_ids, draft, callback, device, profile: bool, cached: int = 0
):
    """Generate once; returns (tokens [B, T+n], timings). cached: as generate()'s."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    ctx = torch.profiler.profile() if profile else contextlib.nullcontext()
    with ctx as prof:
        sync()
        t0 = time.perf_counter()
        y, stats = generate(
            model, prompt, args.max_new_tokens, batch_size=args.batch_size, draft_model=draft, speculate=args.speculate,
            speculate_k=args.speculate_k, callback=callback, stop_ids=stop_ids, prefill_chunk=args.prefill_chunk,
            cached=cached, temperature=args.temperature,
            top_k=args.top_k or None, top_p=args.top_p, **steps,
        )  # fmt: skip
        sync()
        t1 = time.perf_counter()
    if profile:
        prof.export_chrome_trace(f"{args.profile}.json")
        key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=25))
    prompt_len = max(p.numel() for p in prompt) if isinstance(prompt, list) else prompt.numel()
    stats.update(total=t1 - t0, ttft=stats["prefill_end"] - t0, new_tokens=y.shape[1] - prompt_len)
    return y, stats


def report(i, stats, bytes_per_token, device, bandwidth=None, batch_size: int = 1, label: str = "Sample") -> dict:
    decode_s = stats["total"] - stats["ttft"]
    tok_s = (stats["new_tokens"] - 1) / decode_s if stats["new_tokens"] > 1 else float("nan")
    total = f" per sequence, {batch_size * tok_s:.2f} in total" if batch_size > 1 else ""
    row = {"tok_s": tok_s, "gb_s": bytes_per_token * tok_s / 1e9, "ttft": stats["ttft"], "total": stats["total"]}
    pct = f" ({100 * row['gb_s'] / bandwidth:.1f}% of measured read bandwidth)" if bandwidth else ""
    mem = f", memory {torch.cuda.max_memory_reserved() / 1e9:.2f} GB" if device.type == "cuda" else ""
    print(
        f"{label} {i}: {stats['total']:.2f} s total, {stats['new_tokens']} tokens, "
        f"time to first token {row['ttft'] * 1e3:.1f} ms, "
        f"decode {tok_s:.2f} tokens/s{total}, {row['gb_s']:.1f} GB/s{pct}{mem}"
    )
    if "accept_counts" in stats:
        counts = stats["accept_counts"]
        mean = sum((n + 1) * c for n, c in enumerate(counts)) / max(sum(counts), 1)
        print(f"  acceptance histogram (tokens per step 1..k+1): {counts}; mean {mean:.2f} tokens per target forward")
    return row


def shared_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens a and b have in common."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def warm_up_chat(model, args, steps, draft, device) -> None:
    """Compile before the first prompt rather than inside the first replies: the decode step at the cache length the
    first turns use, and the graph of each prompt bucket (a turn's new tokens may fall in any)."""
    t0 = time.perf_counter()
    length = cache_length(PREFILL_BUCKETS[-1], args.max_new_tokens, args.speculate, args.speculate_k,
                          model.config.block_size)  # fmt: skip
    for m in (model, draft) if draft is not None else (model,):
        m.setup_caches(1, length)
    few = argparse.Namespace(**{**vars(args), "max_new_tokens": 4})
    for n in warm_up_prompt_lengths(length, few.max_new_tokens):
        run_sample(model, torch.ones(n, dtype=torch.int, device=device), few, steps, [], draft, None, device, False)
    print(f"Compiled for the chat in {time.perf_counter() - t0:.1f} s")


def interactive_loop(model, tokenizer, args, steps, draft, device):
    """A multi-turn chat in the model's chat template: the whole conversation is each reply's prompt, of which only
    what the KV cache does not hold yet is prefilled; it restarts when it outgrows the context. Ctrl-C stops the
    reply being written and the chat goes on; Ctrl-C or Ctrl-D at the prompt leaves."""
    stop_ids = tokenizer.stop_ids()
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    in_cache: list[int] = []  # the tokens whose keys and values the cache holds, from position 0
    if args.compile and device.type == "cuda":
        warm_up_chat(model, args, steps, draft, device)
    while True:
        try:
            message = input("\nWhat is your prompt? ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        try:
            ids = tokenizer.encode_dialog(messages + [{"role": "user", "content": message}])
            if len(ids) + args.max_new_tokens > model.config.block_size and len(messages) > len(system):
                messages = list(system)
                ids = tokenizer.encode_dialog(messages + [{"role": "user", "content": message}])
                print("(the conversation no longer fits the context: starting a new one)")
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
        if len(ids) + args.max_new_tokens > model.config.block_size:
            print(
                f"(prompt of {len(ids)} tokens is too long for --max_new_tokens {args.max_new_tokens}; "
                "try a shorter one)"
            )
            continue
        need = cache_length(len(ids), args.max_new_tokens, args.speculate, args.speculate_k, model.config.block_size)
        if model.max_seq_length < need:  # a new, empty cache, twice as long: few of them (and recompiles) in a chat
            model.setup_caches(1, min(model.config.block_size, max(need, 2 * model.max_seq_length)))
            in_cache = []
        # a draft model's cache is not kept in step (and check_args keeps a chat to one row)
        cached = min(shared_prefix(in_cache, ids), len(ids) - 1) if draft is None else 0
        prompt = torch.tensor(ids, dtype=torch.int, device=device)
        stream = TextStream(tokenizer, stop_ids, args.stop or ())
        try:
            y, _ = run_sample(model, prompt, args, steps, stop_ids, draft, stream, device, profile=False, cached=cached)
        except KeyboardInterrupt:
            in_cache = in_cache[:cached]  # the prefill writes from position `cached` on
            print("\n(stopped: this turn is left out of the conversation)")
            continue
        in_cache = y[0, :-1].tolist()  # the last token was sampled, never fed
        reply_ids = [t for t in y[0, len(ids) :].tolist() if t not in stop_ids]  # built-in formats keep the tokens
        messages += [{"role": "user", "content": message}]
        messages += [{"role": "assistant", "content": stream.finish(), "ids": reply_ids}]
        print()


def main(argv=None):
    args = parse_args(argv)
    import tp

    rank = tp.maybe_init_dist(args.device)
    if rank is None:
        try:
            return run(args, rank)
        except KeyboardInterrupt:  # Ctrl-C: leave without a traceback
            print("\n(interrupted)", file=sys.stderr)
            sys.exit(130)
        except BrokenPipeError:  # the reader of our output left (| head): so do we, quietly
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(1)
    code = 0
    try:
        run(args, rank)
    except SystemExit as e:  # our one-line errors: print, then leave like any other exit
        code = e.code if isinstance(e.code, int) else 1
        if not isinstance(e.code, int):
            print(e.code, file=sys.__stderr__)
    if args.device == "cuda":  # NCCL work captured in CUDA graphs can hang the teardown: leave at once
        sys.stdout.flush()
        sys.__stdout__.flush()
        os._exit(code)
    torch.distributed.destroy_process_group()
    sys.exit(code)


def prepare_prompt(args, rank: Optional[int] = None):
    """(tokenizer, prompt tokens [T] on the CPU or, for --prompt_file, a list of them, the file's prompts or None),
    the prompts and the sizes checked before any model loads."""
    texts = read_prompts(args.prompt_file) if args.prompt_file else None
    args.prompt = read_prompt(args)
    try:
        config, weight_bytes = model_config(args)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    tokenizer = load_tokenizer(args, config.vocab_size)
    if texts is not None:
        prompt = [encode_prompt(args, tokenizer, config.vocab_size, text) for text in texts]
    else:
        prompt = encode_prompt(args, tokenizer, config.vocab_size)
    if args.output_jsonl is not None and tokenizer is None:
        raise SystemExit("error: --output_jsonl writes text: a synthetic prompt has none (pass --tokenizer_path)")
    world = torch.distributed.get_world_size() if rank is not None else 1
    longest = max(p.numel() for p in prompt) if texts is not None else prompt.numel()
    check_fits(args, config, weight_bytes, longest, pick_device(args, rank), world)
    return tokenizer, prompt, texts


def pick_device(args, rank: Optional[int] = None) -> torch.device:
    return torch.device(f"cuda:{rank}" if rank is not None and args.device == "cuda" else args.device)


def setup(args, rank: Optional[int] = None):
    """The device, the models and the step functions the flags ask for (run() and the tests share it)."""
    use_tp = rank is not None
    device = pick_device(args, rank)
    precision = resolve_precision(args.precision, device)
    pdl = use_pdl(device, use_tp)
    t0 = time.perf_counter()
    model, draft = load_models(args, device, precision, use_tp, pdl)
    print(f"Loaded model in {time.perf_counter() - t0:.2f} s")
    steps = compile_steps(args, device, fused_kernels_ok=not model.config.num_experts, pdl=pdl)
    # a mixture of experts keeps an eager prefill: its expert loop's shapes depend on the routing (a compile per length)
    prefill_layer = compile_prefill_layer() if args.compile_prefill and not model.config.num_experts else run_layer
    for m in (model, draft) if draft is not None else (model,):
        if args.compile or args.compile_prefill:
            kernels.store_hidden(m)
        m.decode_layer = run_layer_once if args.compile_layer_once else run_layer
        m.prefill_layer = prefill_layer
    if (args.compile or args.compile_prefill) and args.compile_cache is not None and args.compile_cache.is_file():
        torch.compiler.load_cache_artifacts(args.compile_cache.read_bytes())  # a warm start, even on a new machine
    return device, model, draft, steps


def run(args, rank):
    if rank is not None and rank != 0:
        sys.stdout = open(os.devnull, "w")  # only rank 0 prints
    torch.manual_seed(args.seed)
    tokenizer, prompt, texts = prepare_prompt(args, rank)
    device, model, draft, steps = setup(args, rank)
    if args.interactive:
        return interactive_loop(model, tokenizer, args, steps, draft, device)
    stop_ids = None if (args.ignore_eos or tokenizer is None) else tokenizer.stop_ids()
    if args.stop and tokenizer is None:
        raise SystemExit("error: --stop compares text: a synthetic prompt has no tokenizer (pass --tokenizer_path)")
    if texts is not None:
        prompts = [p.to(device) for p in prompt]
        return run_prompt_file(model, draft, tokenizer, texts, prompts, args, steps, stop_ids, device)
    prompt = prompt.to(device)
    bytes_per_token = weight_bytes_per_token(model)
    bandwidth = measure_read_bandwidth(device) if device.type == "cuda" else None
    rows = []
    warm_up(args, device, lambda: run_sample(model, prompt, args, steps, stop_ids, draft, None, device, False)[1])
    for i in range(args.num_samples):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        stream = None
        if tokenizer is not None and (args.stream or args.stop):
            stream = (
                TextStream(tokenizer, stop_ids or (), args.stop or (), echo=args.stream)
                if args.batch_size == 1
                else RowStops(tokenizer, args.batch_size, stop_ids or (), args.stop)
            )
            if args.stream:
                print(args.prompt, end="", flush=True)
        last = args.profile is not None and i == args.num_samples - 1
        y, stats = run_sample(model, prompt, args, steps, stop_ids, draft, stream, device, profile=last)
        if tokenizer is not None:
            texts = completions(tokenizer, y, prompt.numel(), stats["start"], stop_ids, args.stop)
            shown = tokenizer.decode(prompt.tolist()) if args.prompt.isdigit() else args.prompt
            if args.stream:
                stream.finish()
                print()
            for b, text in enumerate(texts if not args.stream else ()):
                if y.shape[0] > 1:
                    print(f"--- sequence {b + 1} of {y.shape[0]} ---")
                print(shown + text)
            if args.output_jsonl is not None and i == args.num_samples - 1:
                write_jsonl(args.output_jsonl, [args.prompt] * len(texts), texts)
        rows.append(report(i, stats, bytes_per_token, device, bandwidth, args.batch_size))
    summarize(rows, bytes_per_token, bandwidth, args.batch_size)


def run_prompt_file(model, draft, tokenizer, texts: list[str], prompts: list[Tensor], args, steps, stop_ids, device):
    """Each prompt of --prompt_file once, --batch_size at a time (the longest first: rows of one batch need less
    padding); the completions printed and written in the file's order."""
    B = args.batch_size
    order = sorted(range(len(prompts)), key=lambda i: -prompts[i].numel())
    longest = cache_length(prompts[order[0]].numel(), args.max_new_tokens, args.speculate, args.speculate_k,
                           model.config.block_size)  # fmt: skip
    model.setup_caches(B, longest)  # one compiled step for all
    bytes_per_token = weight_bytes_per_token(model)
    bandwidth = measure_read_bandwidth(device) if device.type == "cuda" else None
    batches = [order[i : i + B] for i in range(0, len(order), B)]
    full = [[prompts[i] for i in b] + [prompts[b[-1]]] * (B - len(b)) for b in batches]  # one compiled batch size
    warm_up(args, device, lambda: run_sample(model, full[0], args, steps, stop_ids, draft, None, device, False)[1])
    results, rows = [""] * len(prompts), []
    for n, batch in enumerate(batches):
        stops = RowStops(tokenizer, B, stop_ids or (), args.stop) if args.stop else None
        y, stats = run_sample(model, full[n], args, steps, stop_ids, draft, stops, device, False)
        replies = completions(tokenizer, y, y.shape[1] - stats["new_tokens"], stats["start"], stop_ids, args.stop)
        for i, reply in zip(batch, replies, strict=False):
            results[i] = reply
        rows.append(report(n, stats, bytes_per_token, device, bandwidth, len(batch), label="Batch"))  # real rows
    for i, (prompt, text) in enumerate(zip(texts, results, strict=True)):
        print(f"--- prompt {i + 1} of {len(results)} ---")
        print(prompt + text)
    if args.output_jsonl is not None:
        write_jsonl(args.output_jsonl, texts, results)
    summarize(rows, bytes_per_token, bandwidth, B)


def completions(tokenizer, y: Tensor, T: int, start: list[int], stop_ids, stop_strings=None) -> list[str]:
    """The text each row of y [B, T + n] adds to its prompt (row b's from start[b] to T), up to its first stop token
    and before its first stop string. Decoded with the prompt, so that the first word keeps its leading space."""
    texts = []
    for b, row in enumerate(y.tolist()):
        prompt, reply = row[start[b] : T], row[T:]
        cut = next((i for i, t in enumerate(reply) if t in (stop_ids or ())), len(reply))
        text = tokenizer.decode(prompt + reply[:cut])[len(tokenizer.decode(prompt)) :]
        hits = [i for i in (text.find(s) for s in stop_strings or ()) if i >= 0]
        texts.append(text[: min(hits)] if hits else text)
    return texts


class RowStops:
    """Stop strings for a batch: a TextStream per row, printing nothing (a host sync per step); True once every row
    has met a stop token or string."""

    def __init__(self, tokenizer, rows: int, stop_ids, stop_strings):
        self.streams = [TextStream(tokenizer, (), stop_strings, echo=False) for _ in range(rows)]
        self.stop_ids, self.done = set(stop_ids), [False] * rows

    def __call__(self, token: Tensor) -> bool:
        for b, t in enumerate(token.view(-1).tolist()):
            self.done[b] = self.done[b] or t in self.stop_ids or self.streams[b].add(t)
        return all(self.done)


def write_jsonl(path: Path, prompts: list[str], completions: list[str]) -> None:
    pairs = zip(prompts, completions, strict=True)
    lines = "".join(json.dumps({"prompt": p, "completion": c}, ensure_ascii=False) + "\n" for p, c in pairs)
    quantize.save_atomic(lines.encode(), path)


def warm_up(args, device: torch.device, sample_once: Callable[[], dict]) -> None:
    """Run a sample (sample_once returns its stats) before the measured ones, so that compiling and first-run costs
    (library handles) stay out of the figures: twice with CUDA graphs, which record on a step's second call (prefill
    is called once per sample). Prints the time and saves the compiled artifacts."""
    compiling = args.compile or args.compile_prefill
    runs = (2 if args.compile else 1) if device.type == "cuda" else int(compiling)
    if runs:
        seconds = sum(sample_once()["total"] for _ in range(runs))
        print(
            f"Compilation and warm-up: {seconds:.2f} s ({compile_cache_summary()})"
            if compiling
            else f"Warm-up: {seconds:.2f} s"
        )
        save_compile_cache(args.compile_cache)


def compile_cache_summary() -> str:
    """What the caches saved at start-up: a warm start loads every graph and runs no tuning benchmarks."""
    from torch._dynamo.utils import counters

    c = counters["inductor"]
    new = c["fxgraph_cache_miss"] + c["fxgraph_cache_bypass"]
    loaded, tuning = c["async_compile_cache_miss"], c["coordesc_tuning_bench"]
    hits = c["fxgraph_cache_hit"]
    return f"graphs: {hits} from cache, {new} compiled; kernels loaded: {loaded}; tuning benchmarks: {tuning}"


def save_compile_cache(path: Optional[Path]) -> None:
    if path is None:
        return
    artifacts = torch.compiler.save_cache_artifacts()  # None when nothing was compiled
    if artifacts is not None:
        from quantize import save_atomic

        save_atomic(artifacts[0], path)


def summarize(rows, bytes_per_token, bandwidth, batch_size: int = 1):
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
    print("==========")
    print(f"Average decode tokens/s: {mean['tok_s']:.2f}" + (" per sequence" if batch_size > 1 else ""))
    if batch_size > 1:
        print(f"Average decode tokens/s, all {batch_size} sequences: {batch_size * mean['tok_s']:.2f}")
    print(f"Average time to first token: {mean['ttft'] * 1e3:.1f} ms")
    print(
        f"Average bandwidth achieved: {mean['gb_s']:.1f} GB/s (weights read per token: {bytes_per_token / 1e9:.2f} GB)"
    )
    if bandwidth:
        print(
            f"Measured read bandwidth of this card: {bandwidth:.0f} GB/s; "
            f"achieved {100 * mean['gb_s'] / bandwidth:.1f}%"
        )


if __name__ == "__main__":
    main()
