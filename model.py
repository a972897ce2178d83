"""Llama-family and Mixtral transformer for inference: static KV cache, GQA, RoPE, RMSNorm, SwiGLU, MoE.

The state-dict key names are gpt-fast's, so gpt-fast `model.pth` files load unchanged.
"""

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor
from torch.nn import functional as F


def find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - (n % k)


@dataclass
class ModelArgs:
    block_size: int = 2048  # longest sequence (prompt + generated) the model supports
    vocab_size: int = 32000
    n_layer: int = 32
    n_head: int = 32
    dim: int = 4096
    intermediate_size: Optional[int] = None
    n_local_heads: int = -1  # key/value heads (GQA); -1 means n_head
    head_dim: Optional[int] = None
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    rope_scaling: Optional[dict] = None  # {"rope_type": "llama3" | "linear", "factor": ..., ...}
    tie_embeddings: bool = False
    num_experts: int = 0  # > 0 makes every feed-forward a sparse mixture of experts
    num_activated_experts: int = 0

    def __post_init__(self):
        if self.n_local_heads == -1:
            self.n_local_heads = self.n_head
        if self.intermediate_size is None:
            self.intermediate_size = find_multiple(int(2 * 4 * self.dim / 3), 256)
        if self.head_dim is None:
            self.head_dim = self.dim // self.n_head
        if self.n_head % self.n_local_heads != 0:
            raise ValueError(f"n_head={self.n_head} is not a multiple of n_local_heads={self.n_local_heads}")
        if self.num_experts and not 0 < self.num_activated_experts <= self.num_experts:
            raise ValueError(f"num_activated_experts={self.num_activated_experts} must be in 1..{self.num_experts}")

    @classmethod
    def from_name(cls, name: str) -> "ModelArgs":
        """Exact config name, else the longest config name contained in `name` (case-insensitive)."""
        if name in transformer_configs:
            return cls(**transformer_configs[name])
        matches = [k for k in transformer_configs if k.lower() in name.lower()]
        if not matches:
            raise ValueError(f"unknown model name {name!r}; known: {', '.join(transformer_configs)}")
        return cls(**transformer_configs[max(matches, key=len)])

    @classmethod
    def from_dict(cls, d: dict) -> "ModelArgs":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ModelArgs fields {unknown}")
        return cls(**d)

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "ModelArgs":
        """ModelArgs from a Hugging Face config.json of a Llama, Mistral or Mixtral model."""
        model_type = cfg.get("model_type", "llama")
        if model_type not in ("llama", "mistral", "mixtral"):
            raise ValueError(f"unsupported model_type {model_type!r}: only llama, mistral and mixtral")
        if cfg.get("attention_bias") or cfg.get("mlp_bias"):
            raise ValueError("models with attention or MLP biases are not supported")
        rope = dict(cfg.get("rope_scaling") or {})
        rope.update(cfg.get("rope_parameters") or {})  # transformers >= 5 keeps theta and scaling here
        rope_base = cfg.get("rope_theta") or rope.pop("rope_theta", 10000.0)
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3", "linear"):
            raise ValueError(f"unsupported rope scaling type {rope_type!r}")
        rope_scaling = None
        if rope_type != "default":
            keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
            rope_scaling = {"rope_type": rope_type, **{k: rope[k] for k in keys if k in rope}}
        block_size = cfg.get("max_position_embeddings", 2048)
        if cfg.get("sliding_window"):  # we attend to the whole context, so stay inside the window
            block_size = min(block_size, cfg["sliding_window"])
        n_head = cfg["num_attention_heads"]
        return cls(
            block_size=block_size,
            vocab_size=cfg["vocab_size"],
            n_layer=cfg["num_hidden_layers"],
            n_head=n_head,
            dim=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            n_local_heads=cfg.get("num_key_value_heads") or n_head,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // n_head,
            rope_base=float(rope_base),
            norm_eps=cfg.get("rms_norm_eps", 1e-5),
            rope_scaling=rope_scaling,
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            num_experts=cfg.get("num_local_experts", 0),
            num_activated_experts=cfg.get("num_experts_per_tok", 0) if cfg.get("num_local_experts") else 0,
        )

    @classmethod
    def from_checkpoint(cls, checkpoint_path) -> "ModelArgs":
        """Config for a checkpoint: our model_config.json, else HF config.json, else the folder name."""
        folder = Path(checkpoint_path).parent
        for fname, parse in (("model_config.json", cls.from_dict), ("config.json", cls.from_hf_config)):
            if (folder / fname).is_file():
                try:
                    return parse(json.loads((folder / fname).read_text()))
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ValueError(f"cannot read model config {folder / fname}: {e!r}") from None
        return cls.from_name(folder.name)


_LLAMA3_ROPE = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
_LLAMA3 = dict(n_local_heads=8, vocab_size=128256, rope_base=500000.0)
_LLAMA3_1 = dict(
    block_size=131072, vocab_size=128256, rope_base=500000.0, rope_scaling={"rope_type": "llama3", **_LLAMA3_ROPE}
)
transformer_configs = {
    "CodeLlama-7b-Python-hf": dict(block_size=16384, vocab_size=32000, n_layer=32, dim=4096, rope_base=1000000.0),
    "CodeLlama-7b": dict(block_size=16384, vocab_size=32016, n_layer=32, dim=4096, rope_base=1000000.0),
    "7B": dict(n_layer=32, n_head=32, dim=4096),
    "13B": dict(n_layer=40, n_head=40, dim=5120),
    "34B": dict(n_layer=48, n_head=64, dim=8192, n_local_heads=8, intermediate_size=22016, rope_base=1000000.0),
    "70B": dict(n_layer=80, n_head=64, dim=8192, n_local_heads=8, intermediate_size=28672),
    "Mistral-7B": dict(block_size=4096, n_layer=32, n_head=32, n_local_heads=8, dim=4096, intermediate_size=14336),
    "stories15M": dict(n_layer=6, n_head=6, dim=288, intermediate_size=768),
    "stories42M": dict(n_layer=8, n_head=8, dim=512, intermediate_size=1376),
    "stories110M": dict(n_layer=12, n_head=12, dim=768, intermediate_size=2048),
    "Llama-3-8B": dict(block_size=8192, n_layer=32, n_head=32, dim=4096, intermediate_size=14336, **_LLAMA3),
    "Llama-3-70B": dict(block_size=8192, n_layer=80, n_head=64, dim=8192, intermediate_size=28672, **_LLAMA3),
    "Llama-3.1-8B": dict(n_layer=32, n_head=32, n_local_heads=8, dim=4096, intermediate_size=14336, **_LLAMA3_1),
    "Llama-3.1-70B": dict(n_layer=80, n_head=64, n_local_heads=8, dim=8192, intermediate_size=28672, **_LLAMA3_1),
    "Llama-3.1-405B": dict(n_layer=126, n_head=128, n_local_heads=8, dim=16384, intermediate_size=53248, **_LLAMA3_1),
    "Mixtral-8x7B-v0.1": dict(block_size=32768, n_layer=32, n_head=32, n_local_heads=8, dim=4096, intermediate_size=14336, rope_base=1e6, num_experts=8, num_activated_experts=2),  # noqa: E501
}  # fmt: skip


class KVCache(nn.Module):
    def __init__(self, max_batch_size, max_seq_length, n_heads, head_dim, dtype, device):
        super().__init__()
        shape = (2, max_batch_size, n_heads, max_seq_length, head_dim)  # [k|v, B, H_kv, S_max, D]: one write
        self.register_buffer("kv", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def k_cache(self) -> Tensor:
        return self.kv[0]

    @property
    def v_cache(self) -> Tensor:
        return self.kv[1]

    def update(self, input_pos: Tensor, k_val: Tensor, v_val: Tensor):
        """Write k/v [B, H_kv, S, D] at positions input_pos [S]; return the whole caches. One index_put for both:
        compiled, one kernel per layer and step instead of two."""
        B = k_val.shape[0]
        self.kv[:, :B, :, input_pos] = torch.stack([k_val, v_val])
        return self.k_cache[:B], self.v_cache[:B]


class Transformer(nn.Module):
    def __init__(self, config: ModelArgs):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.max_batch_size = -1
        self.max_seq_length = -1
        self.left_padded = False  # set_row_starts: rows of different prompts, padded on the left
        self.decode_layer = run_layer  # how decode steps call each layer: generate.py's --compile_layer_once swaps it
        self.prefill_layer = run_layer  # how prefill calls each layer: generate.py's --compile_prefill swaps it

    @classmethod
    def from_name(cls, name: str) -> "Transformer":
        return cls(ModelArgs.from_name(name))

    def setup_caches(self, max_batch_size: int, max_seq_length: int) -> bool:
        """Allocate the KV caches, RoPE table and causal mask on the model's device and dtype, unless those there are
        large enough; returns whether it allocated (new caches hold nothing)."""
        if max_seq_length > self.config.block_size:
            raise ValueError(f"max_seq_length={max_seq_length} exceeds the model's block_size={self.config.block_size}")
        if self.max_seq_length >= max_seq_length and self.max_batch_size >= max_batch_size:
            return False
        # aligned rows; nearby lengths share one compiled decode graph
        max_seq_length = find_multiple(max_seq_length, 64)
        max_seq_length = min(max_seq_length, self.config.block_size)
        self.max_seq_length, self.max_batch_size = max_seq_length, max_batch_size
        dtype, device = self.norm.weight.dtype, self.norm.weight.device  # norms are never quantized
        for b in self.layers:
            b.attention.kv_cache = KVCache(
                max_batch_size, max_seq_length, b.attention.n_local_heads, self.config.head_dim, dtype, device
            )
        freqs = precompute_freqs_cis(
            max_seq_length, self.config.head_dim, self.config.rope_base, self.config.rope_scaling
        )
        self.register_buffer("freqs_cis", freqs.to(device=device, dtype=dtype), persistent=False)
        mask = torch.tril(torch.ones(max_seq_length, max_seq_length, dtype=torch.bool, device=device))
        self.register_buffer("causal_mask", mask, persistent=False)
        self.register_buffer("row_start", torch.zeros(max_batch_size, dtype=torch.int, device=device), persistent=False)
        self.left_padded = False
        return True

    def set_row_starts(self, start: Optional[Tensor]) -> None:
        """Prompts of different lengths in one batch, padded on the left to a common length: row b's tokens start
        at position start[b] [B], and attention ignores the cache before it. RoPE depends only on the distance
        between positions, so a row's attention is that of its prompt alone; every row shares one position, so the
        cache writes and the decode step stay those of a batch of one prompt. None: no padding."""
        self.left_padded = start is not None and bool((start > 0).any())
        self.row_start.zero_()
        if self.left_padded:
            self.row_start[: start.numel()] = start.to(self.row_start.device)

    def padding_mask(self, input_pos: Tensor, batch: int) -> Tensor:
        """The causal mask without each row's left padding [B, 1, S, S_max]; a padding position attends to itself
        alone, so that no row of its softmax is empty (NaN)."""
        kv = torch.arange(self.max_seq_length, device=input_pos.device)
        own = kv[None, :] == input_pos[:, None]  # [S, S_max]
        real = kv >= self.row_start[:batch, None, None, None]  # [B, 1, 1, S_max]
        return self.causal_mask[None, None, input_pos] & (real | own)

    def forward(
        self, idx: Tensor, input_pos: Tensor, prefill: bool = False, continued: bool = False, last_only: bool = False
    ) -> Tensor:
        """idx [B, S] token ids at positions input_pos [S]; returns logits [B, S, V] ([B, 1, V] with last_only).

        prefill=True: prompt tokens, each layer called by prefill_layer (decode_layer: decode steps'). It promises
        input_pos == arange(S), so that attention is plain causal over these S tokens, which the flash SDPA kernel
        can run; unless continued: a later chunk of the prompt, which attends over the cache through the mask.
        last_only: the logits of the last position alone, so that a long prompt makes no [B, S, V] tensor.
        """
        if self.max_seq_length < 0:
            raise RuntimeError("call setup_caches() before forward()")
        if self.left_padded:
            mask = self.padding_mask(input_pos, idx.shape[0])  # [B, 1, S, S_max]
        elif prefill and continued:  # a later chunk attends to the keys up to its last position, none past it
            mask = self.causal_mask[None, None, input_pos, : int(input_pos[-1]) + 1]  # [1, 1, S, end]
        else:
            mask = None if prefill else self.causal_mask[None, None, input_pos]  # [1, 1, S, S_max]
        freqs_cis = self.freqs_cis[input_pos]  # [S, D/2, 2]
        x = self.tok_embeddings(idx)  # [B, S, dim]
        run = self.prefill_layer if prefill else self.decode_layer
        for layer in self.layers:
            x = run(layer, x, input_pos, freqs_cis, mask)
        if last_only:
            x = x[:, -1:]
        return self.output(self.norm(x))


def run_layer(
    layer: "TransformerBlock", x: Tensor, input_pos: Tensor, freqs_cis: Tensor, mask: Optional[Tensor]
) -> Tensor:
    return layer(x, input_pos, freqs_cis, mask)


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelArgs):
        super().__init__()
        self.attention = Attention(config)
        if config.num_experts:
            self.block_sparse_moe = MOEFeedForward(config)  # gpt-fast's Mixtral key name
        else:
            self.feed_forward = FeedForward(config)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)

    def forward(self, x: Tensor, input_pos: Tensor, freqs_cis: Tensor, mask: Optional[Tensor]) -> Tensor:
        h = x + self.attention(self.attention_norm(x), freqs_cis, mask, input_pos)
        ffn = self.block_sparse_moe if hasattr(self, "block_sparse_moe") else self.feed_forward
        return h + ffn(self.ffn_norm(h))


class Attention(nn.Module):
    def __init__(self, config: ModelArgs):
        super().__init__()
        total_head_dim = (config.n_head + 2 * config.n_local_heads) * config.head_dim
        self.wqkv = nn.Linear(config.dim, total_head_dim, bias=False)  # q, k and v in one matrix: one read
        self.wo = nn.Linear(config.n_head * config.head_dim, config.dim, bias=False)
        self.kv_cache = None
        self.n_head, self.n_local_heads, self.head_dim = config.n_head, config.n_local_heads, config.head_dim
        self._register_load_state_dict_pre_hook(self._fuse_wq_wk_wv)

    def _fuse_wq_wk_wv(self, state_dict, prefix, *args):
        """Older gpt-fast checkpoints keep wq/wk/wv apart."""
        if prefix + "wq.weight" in state_dict:
            parts = [state_dict.pop(prefix + f"w{n}.weight") for n in "qkv"]
            state_dict[prefix + "wqkv.weight"] = torch.cat(parts)

    def forward(self, x: Tensor, freqs_cis: Tensor, mask: Optional[Tensor], input_pos: Tensor) -> Tensor:
        return self.wo(self.attend(self.wqkv(x), freqs_cis, mask, input_pos))

    def write_cache(
        self, qkv: Tensor, freqs_cis: Tensor, input_pos: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Split qkv [B, S, (H + 2 H_kv) D], rotate k, write k and v into the cache at input_pos.
        Returns q [B, S, H D] (not rotated), the new k, v [B, H_kv, S, D] and the caches [B, H_kv, S_max, D]."""
        B, S, _ = qkv.shape
        q_size, kv_size = self.n_head * self.head_dim, self.n_local_heads * self.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        k = apply_rotary_emb(k.view(B, S, self.n_local_heads, self.head_dim), freqs_cis)  # [B, S, H_kv, D]
        v = v.view(B, S, self.n_local_heads, self.head_dim)
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # [B, H_kv, S, D]
        k_all, v_all = self.kv_cache.update(input_pos, k, v)  # [B, H_kv, S_max, D]
        return q, k, v, k_all, v_all

    def attend(self, qkv: Tensor, freqs_cis: Tensor, mask: Optional[Tensor], input_pos: Tensor) -> Tensor:
        """Projected q, k, v [B, S, (H + 2 H_kv) D] -> attention output [B, S, H D], before wo; writes the KV cache."""
        B, S, _ = qkv.shape
        q, k, v, k_all, v_all = self.write_cache(qkv, freqs_cis, input_pos)
        q = apply_rotary_emb(q.view(B, S, self.n_head, self.head_dim), freqs_cis).transpose(1, 2)  # [B, H, S, D]
        gqa = self.n_head != self.n_local_heads
        if mask is None:  # prefill from position 0: causal over the new tokens alone (flash-eligible)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:  # over the keys the mask covers: the whole cache, or those of a prompt chunk
            n = mask.shape[-1]
            y = F.scaled_dot_product_attention(q, k_all[:, :, :n], v_all[:, :, :n], attn_mask=mask, enable_gqa=gqa)
        return y.transpose(1, 2).contiguous().view(B, S, self.n_head * self.head_dim)


class FeedForward(nn.Module):
    def __init__(self, config: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(config.dim, config.intermediate_size, bias=False)
        self.w3 = nn.Linear(config.dim, config.intermediate_size, bias=False)
        self.w2 = nn.Linear(config.intermediate_size, config.dim, bias=False)
        self.store_hidden = nn.Identity()  # kernels.store_hidden: computed once for w2, not inside w2's reduction

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(self.store_hidden(F.silu(self.w1(x)) * self.w3(x)))


class ConditionalFeedForward(nn.Module):
    """The experts' SwiGLU weights stacked: w1/w3 [E, I, D], w2 [E, D, I] (gpt-fast's layout)."""

    def __init__(self, config: ModelArgs):
        super().__init__()
        E, I, D = config.num_experts, config.intermediate_size, config.dim
        self.w1 = nn.Parameter(torch.empty(E, I, D))
        self.w2 = nn.Parameter(torch.empty(E, D, I))
        self.w3 = nn.Parameter(torch.empty(E, I, D))
        self.store_hidden = nn.Identity()  # as in FeedForward

    def expert_weight(self, name: str, idx) -> Tensor:
        """Weights of the experts in idx, in compute dtype (quantized subclasses dequantize here)."""
        return getattr(self, name)[idx]

    def forward(self, x: Tensor, expert_indices: Tensor) -> Tensor:
        """x [T, D], expert_indices [T, A] -> [T, A, D]; reads only the selected experts' weights."""
        # multiply-and-sum rather than einsum: inductor fuses the gather (and int8 dequantization) into one
        # reduction that reads each selected expert once, where a bmm would first materialize the weights
        x = x[:, None, None, :]  # [T, 1, 1, D]
        w1, w3 = self.expert_weight("w1", expert_indices), self.expert_weight("w3", expert_indices)  # [T, A, I, D]
        a, b = torch.sum(x * w1, dim=-1, dtype=torch.float), torch.sum(x * w3, dim=-1, dtype=torch.float)  # [T, A, I]
        h = self.store_hidden((F.silu(a) * b).to(x.dtype))[:, :, None, :]  # [T, A, 1, I]
        y = torch.sum(h * self.expert_weight("w2", expert_indices), dim=-1, dtype=torch.float)  # [T, A, D]
        return y.to(x.dtype)

    def forward_expert(self, x: Tensor, e: int) -> Tensor:
        """All rows of x [N, D] through expert e -> [N, D]."""
        w1, w2, w3 = (self.expert_weight(n, e) for n in ("w1", "w2", "w3"))
        return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)


class MOEFeedForward(nn.Module):
    def __init__(self, config: ModelArgs):
        super().__init__()
        self.gate = nn.Linear(config.dim, config.num_experts, bias=False)
        self.cond_ffn = ConditionalFeedForward(config)
        self.dim, self.num_activated_experts = config.dim, config.num_activated_experts

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x = x.reshape(-1, self.dim)  # [T, D]
        probs = F.softmax(self.gate(x), dim=-1, dtype=torch.float)  # [T, E]
        weights, indices = torch.topk(probs, self.num_activated_experts, dim=-1)  # [T, A]
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype)
        if x.shape[0] <= 8:  # decode: gather the few selected experts, static shapes for CUDA graphs
            out = torch.einsum("tad,ta->td", self.cond_ffn(x, indices), weights)
        else:  # prefill: each expert once over its own tokens, so no [T, A, I, D] gather
            out = torch.zeros_like(x)
            for e in range(self.cond_ffn.w1.shape[0]):
                token, slot = torch.where(indices == e)
                if token.numel():
                    y = self.cond_ffn.forward_expert(x[token], e) * weights[token, slot, None]
                    out.index_add_(0, token, y)
        return out.view(shape)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def scale_rope_freqs(freqs: Tensor, rope_scaling: dict) -> Tensor:
    """Llama 3.1 ("llama3") or linear position interpolation of the RoPE frequencies."""
    factor = rope_scaling["factor"]
    if rope_scaling.get("rope_type", "llama3") == "linear":
        return freqs / factor
    low, high = rope_scaling["low_freq_factor"], rope_scaling["high_freq_factor"]
    old_len = rope_scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / freqs
    smooth = (old_len / wavelen - low) / (high - low)
    mid = (1 - smooth) * freqs / factor + smooth * freqs
    return torch.where(wavelen < old_len / high, freqs, torch.where(wavelen > old_len / low, freqs / factor, mid))


def precompute_freqs_cis(
    seq_len: int, n_elem: int, base: float = 10000.0, rope_scaling: Optional[dict] = None
) -> Tensor:
    freqs = 1.0 / (base ** (torch.arange(0, n_elem, 2, dtype=torch.int64).float() / n_elem))  # [D/2]
    if rope_scaling is not None:
        freqs = scale_rope_freqs(freqs, rope_scaling)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float), freqs)  # [S, D/2]
    return torch.stack([angles.cos(), angles.sin()], dim=-1)  # [S, D/2, 2]


def apply_rotary_emb(x: Tensor, freqs_cis: Tensor) -> Tensor:
    """Rotate interleaved pairs (x0, x1) of x [B, S, H, D] by the angles in freqs_cis [S, D/2, 2]."""
    xs = x.float().reshape(*x.shape[:-1], -1, 2)  # [B, S, H, D/2, 2]
    fc = freqs_cis.view(1, xs.size(1), 1, xs.size(3), 2)
    out = torch.stack(
        [xs[..., 0] * fc[..., 0] - xs[..., 1] * fc[..., 1], xs[..., 1] * fc[..., 0] + xs[..., 0] * fc[..., 1]], dim=-1
    )
    return out.flatten(3).type_as(x)
