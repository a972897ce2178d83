"""Tensor parallelism under torchrun: shard attention by heads and the MLP by hidden units, one all-reduce each.

Column-parallel (output rows split): wqkv (per q/k/v, by heads), w1, w3, Mixtral experts' w1/w3.
Row-parallel (input columns split): wo, w2, experts' w2; their outputs are summed across ranks.
Embedding, norms, router and output layer are replicated. Works for bf16, int8 and int4 weights.
"""

import os
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor, nn

from model import Attention, FeedForward, MOEFeedForward, Transformer


def maybe_init_dist(device_type: str = "cuda") -> Optional[int]:
    """Join the process group when started by torchrun with more than one process; returns the rank or None."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size < 2 or "LOCAL_RANK" not in os.environ:
        return None
    rank = int(os.environ["LOCAL_RANK"])
    if device_type == "cuda":
        torch.cuda.set_device(rank)
    if not dist.is_initialized():
        dist.init_process_group(
            "nccl" if device_type == "cuda" else "gloo", rank=int(os.environ["RANK"]), world_size=world_size
        )
    return rank


def check_divisible(config, world_size: int) -> None:
    for what, n in (
        ("attention heads", config.n_head),
        ("key/value heads", config.n_local_heads),
        ("intermediate size", config.intermediate_size),
    ):
        if n % world_size:
            raise ValueError(
                f"{world_size} processes do not divide the model's {n} {what}: use a --nproc_per_node that divides {n}"
            )


def shard(t: Tensor, dim: int, rank: int, world: int) -> Tensor:
    return t.chunk(world, dim=dim)[rank].contiguous()


def shard_linear(lin: nn.Module, style: str, rank: int, world: int, sizes=None) -> None:
    """style 'col': split output features (per part of sizes, for fused q/k/v); 'row': split input features."""
    names = (
        {"weight": 0, "scales": 0, "scales_and_zeros": 1} if style == "col" else {"weight": 1, "scales_and_zeros": 0}
    )
    for name, dim in names.items():
        t = getattr(lin, name, None)
        if t is None:
            continue
        if name == "weight" and isinstance(t, nn.Parameter):
            t = t.data
        if sizes is not None:  # fused q/k/v: shard each part along its heads, then re-fuse
            parts = t.split(sizes, dim=dim)
            new = torch.cat([shard(p, dim, rank, world) for p in parts], dim=dim)
        else:
            if name == "scales_and_zeros" and t.shape[dim] % world:
                raise ValueError(
                    f"{t.shape[dim]} int4 groups per row do not split over {world} processes: use a smaller --groupsize"
                )
            new = shard(t, dim, rank, world)
        if isinstance(getattr(lin, name), nn.Parameter):
            setattr(lin, name, nn.Parameter(new, requires_grad=False))
        else:
            setattr(lin, name, new)
    if hasattr(lin, "out_features"):
        lin.out_features = lin.weight.shape[0]
        lin.in_features = lin.weight.shape[1] * (2 if lin.weight.dtype == torch.uint8 else 1)


def all_reduce_output(_module, _inputs, output: Tensor) -> Tensor:
    return funcol.all_reduce(output, "sum", dist.group.WORLD)


def apply_tp(model: Transformer) -> None:
    """Shard the model in place for this rank of the default process group."""
    rank, world = dist.get_rank(), dist.get_world_size()
    config = model.config
    check_divisible(config, world)
    for block in model.layers:
        attn: Attention = block.attention
        q, kv = attn.n_head * attn.head_dim, attn.n_local_heads * attn.head_dim
        shard_linear(attn.wqkv, "col", rank, world, sizes=[q, kv, kv])
        shard_linear(attn.wo, "row", rank, world)
        attn.n_head, attn.n_local_heads = attn.n_head // world, attn.n_local_heads // world
        attn.register_forward_hook(all_reduce_output)
        ffn = getattr(block, "feed_forward", None) or block.block_sparse_moe
        if isinstance(ffn, FeedForward):
            shard_linear(ffn.w1, "col", rank, world)
            shard_linear(ffn.w3, "col", rank, world)
            shard_linear(ffn.w2, "row", rank, world)
        elif isinstance(ffn, MOEFeedForward):
            experts = ffn.cond_ffn
            for name, dim in (("w1", 1), ("w3", 1), ("w2", 2), ("scales1", 1), ("scales3", 1)):
                t = getattr(experts, name, None)
                if t is not None:
                    new = shard(t.data, dim, rank, world)
                    setattr(
                        experts, name, nn.Parameter(new, requires_grad=False) if isinstance(t, nn.Parameter) else new
                    )
        ffn.register_forward_hook(all_reduce_output)
