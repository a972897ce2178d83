"""Convert a Hugging Face Llama / Mistral / Mixtral checkpoint folder into gpt-fast's model.pth.

Reads safetensors or pytorch_model*.bin, sharded (with an index json) or single; maps names, un-permutes
q/k from HF's rotate-half layout to the interleaved RoPE layout, fuses q/k/v into wqkv, stacks Mixtral
experts, writes model.pth and model_config.json and copies the tokenizer files beside them. Tensors are read one
at a time (safetensors lazily, .bin memory-mapped), so the peak memory is about one copy of the model.
"""

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from model import ModelArgs, Transformer  # noqa: E402
from quantize import save_model  # noqa: E402

TOP_KEYS = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
LAYER_KEYS = {
    "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "block_sparse_moe.gate.weight": "block_sparse_moe.gate.weight",
    "mlp.gate.weight": "block_sparse_moe.gate.weight",  # transformers >= 5 Mixtral naming
}
EXPERT_RE = re.compile(r"block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight")


def weight_files(checkpoint_dir: Path) -> list[Path]:
    """The checkpoint's tensor files: from an index json when sharded, else the single file."""
    for index_name, single in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        index = checkpoint_dir / index_name
        if index.is_file():
            try:
                files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError) as e:
                raise ValueError(f"{index} is not a valid weight index: {e!r}") from None
            missing = [f for f in files if not (checkpoint_dir / f).is_file()]
            if missing:
                raise ValueError(f"{index} lists shards that are not there: {missing}: download again")
            return [checkpoint_dir / f for f in files]
        if (checkpoint_dir / single).is_file():
            return [checkpoint_dir / single]
    raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin (or their index json) in {checkpoint_dir}")


def iter_tensors(path: Path):
    """(name, tensor) pairs of one file, one tensor in memory at a time."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        else:
            yield from torch.load(str(path), mmap=True, weights_only=True, map_location="cpu").items()
    except Exception as e:  # safetensors and torch raise many kinds for a truncated or corrupt file
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ValueError(f"cannot read {path} (corrupt or truncated? download again): {reason}") from None


def unpermute(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """HF stores q/k rows as [first halves | second halves] per head (rotate-half); we interleave the pairs."""
    return w.view(n_heads, 2, head_dim // 2, -1).transpose(1, 2).reshape(n_heads * head_dim, -1)


def convert_state_dict(tensors, args: ModelArgs) -> dict:
    """Map an iterable of HF (name, tensor) pairs to our state dict."""
    out, qkv, experts = {}, {}, {}
    for name, t in tensors:
        if name.endswith("rotary_emb.inv_freq"):
            continue  # recomputed from the config
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
        layer, rest = (int(m.group(1)), m.group(2)) if m else (None, name)
        prefix = f"layers.{layer}." if m else ""
        if not m and name in TOP_KEYS:
            out[TOP_KEYS[name]] = t
        elif m and rest in LAYER_KEYS:
            out[prefix + LAYER_KEYS[rest]] = t
        elif m and rest in ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"):
            qkv.setdefault(layer, {})[rest[10]] = t
            if len(qkv[layer]) == 3:  # fuse as soon as a layer's q, k and v are all read
                parts = qkv.pop(layer)
                q = unpermute(parts["q"], args.n_head, args.head_dim)
                k = unpermute(parts["k"], args.n_local_heads, args.head_dim)
                out[f"layers.{layer}.attention.wqkv.weight"] = torch.cat([q, k, parts["v"]])
        elif m and (em := EXPERT_RE.fullmatch(rest)):
            experts.setdefault((layer, em.group(2)), {})[int(em.group(1))] = t
            if len(experts[(layer, em.group(2))]) == args.num_experts:
                parts = experts.pop((layer, em.group(2)))
                out[f"layers.{layer}.block_sparse_moe.cond_ffn.{em.group(2)}"] = torch.stack(
                    [parts[e] for e in range(args.num_experts)]
                )
        elif m and rest == "mlp.experts.gate_up_proj":  # transformers >= 5: [E, 2I, D]
            out[f"layers.{layer}.block_sparse_moe.cond_ffn.w1"], out[f"layers.{layer}.block_sparse_moe.cond_ffn.w3"] = (
                t.chunk(2, dim=1)
            )
        elif m and rest == "mlp.experts.down_proj":
            out[f"layers.{layer}.block_sparse_moe.cond_ffn.w2"] = t
        else:
            raise ValueError(f"unexpected tensor {name!r}: not a Llama, Mistral or Mixtral checkpoint")
    if qkv or experts:
        raise ValueError(
            f"incomplete checkpoint: layers {sorted({k if isinstance(k, int) else k[0] for k in [*qkv, *experts]})} "
            "lack q/k/v or experts"
        )
    if args.tie_embeddings:
        out.pop("output.weight", None)  # the loader ties it to tok_embeddings
    return out


def check_complete(state_dict: dict, args: ModelArgs) -> None:
    with torch.device("meta"):
        expected = {k: v.shape for k, v in Transformer(args).state_dict().items()}
    if args.tie_embeddings:
        expected.pop("output.weight")
    missing = sorted(set(expected) - set(state_dict))
    wrong = [k for k in expected if k in state_dict and state_dict[k].shape != expected[k]]
    if missing or wrong:
        raise ValueError(
            f"checkpoint does not match its config: missing {missing[:3]}, wrong shape {wrong[:3]}: "
            "is a shard missing or the config wrong?"
        )


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)


def copy_tokenizer(checkpoint_dir: Path, out_dir: Path) -> None:
    """tokenizer.model (Llama 3 keeps its tiktoken file in original/) and Hugging Face's tokenizer files."""
    copies = [
        (checkpoint_dir / c, out_dir / "tokenizer.model") for c in ("original/tokenizer.model", "tokenizer.model")
    ]
    copies = [c for c in copies if c[0].is_file()][-1:]  # tokenizer.model wins over original/
    copies += [(checkpoint_dir / f, out_dir / f) for f in TOKENIZER_FILES if (checkpoint_dir / f).is_file()]
    for src, dst in copies:
        if src.resolve() != dst.resolve():
            shutil.copyfile(src, dst)  # the data, not a read-only mode
    if not any(dst.name in ("tokenizer.model", "tokenizer.json") for _, dst in copies):
        print(f"note: no tokenizer.model or tokenizer.json in {checkpoint_dir}; pass --tokenizer_path to generate.py")


@torch.no_grad()
def convert_hf_checkpoint(checkpoint_dir: Path, model_name: str | None = None, out_dir: Path | None = None) -> Path:
    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir or checkpoint_dir)
    files = weight_files(checkpoint_dir)
    config_file = checkpoint_dir / "config.json"
    if config_file.is_file():
        try:
            args = ModelArgs.from_hf_config(json.loads(config_file.read_text()))
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"cannot read {config_file}: {e!r}") from None
    else:
        args = ModelArgs.from_name(model_name or checkpoint_dir.name)
    tensors = tqdm((kv for f in files for kv in iter_tensors(f)), desc="converting", unit=" tensors", disable=None)
    state_dict = convert_state_dict(tensors, args)
    check_complete(state_dict, args)
    path = save_model(state_dict, args, out_dir)
    copy_tokenizer(checkpoint_dir, out_dir)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description="Convert a Hugging Face checkpoint folder to model.pth.")
    p.add_argument("--checkpoint_dir", type=Path, required=True, help="folder with config.json and the HF weights")
    p.add_argument(
        "--model_name", type=str, default=None, help="named config to use when the folder has no config.json"
    )
    p.add_argument(
        "--out_dir", type=Path, default=None, help="where to write model.pth (default: the checkpoint folder)"
    )
    a = p.parse_args(argv)
    try:
        path = convert_hf_checkpoint(a.checkpoint_dir, a.model_name, a.out_dir)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"Wrote {path}")


if __name__ == "__main__":
    main()
