"""Convert a llama-architecture GGUF file (llama.cpp's format) into model.pth, model_config.json and a tokenizer.

usage: python scripts/convert_gguf.py FILE.gguf OUT_DIR

Every tensor is dequantized to bf16 with the `gguf` package (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K and the
other types it reads). llama.cpp keeps q and k in the interleaved RoPE layout this model uses (its converter
permutes Hugging Face's rotate-half rows into it), so they are fused into wqkv as they are. The config comes from
the file's metadata; the tokenizer is rebuilt from its vocabulary: a SentencePiece model for llama vocabularies,
a tokenizer.json for BPE (gpt2) ones. Then `generate.py --checkpoint_path OUT_DIR/model.pth` runs it.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from model import ModelArgs  # noqa: E402
from quantize import save_atomic, save_model  # noqa: E402
from tokenizer import LLAMA3_PATTERN  # noqa: E402

LAYER_KEYS = {
    "attn_norm": "attention_norm",
    "ffn_norm": "ffn_norm",
    "attn_output": "attention.wo",
    "ffn_gate": "feed_forward.w1",
    "ffn_up": "feed_forward.w3",
    "ffn_down": "feed_forward.w2",
}
TOP_KEYS = {"token_embd": "tok_embeddings", "output_norm": "norm", "output": "output"}


def need(module: str, package: str = ""):
    try:
        return __import__(module)
    except ImportError:
        package = package or module
        raise SystemExit(f"error: converting GGUF needs the {package} package: pip install {package}") from None


def metadata(reader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def model_args(meta: dict, vocab_size: int, tied: bool) -> ModelArgs:
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"general.architecture is {arch!r}: only llama-architecture GGUF files convert")
    if meta.get("llama.rope.scaling.type", "none") not in ("none", "linear"):
        raise ValueError(f"rope scaling {meta['llama.rope.scaling.type']!r} is not supported from GGUF")
    dim, n_head = meta["llama.embedding_length"], meta["llama.attention.head_count"]
    scaling = meta.get("llama.rope.scaling.factor")
    return ModelArgs(
        block_size=meta.get("llama.context_length", 2048),
        vocab_size=vocab_size,
        n_layer=meta["llama.block_count"],
        n_head=n_head,
        dim=dim,
        intermediate_size=meta["llama.feed_forward_length"],
        n_local_heads=meta.get("llama.attention.head_count_kv", n_head),
        head_dim=meta.get("llama.attention.key_length", dim // n_head),
        rope_base=float(meta.get("llama.rope.freq_base", 10000.0)),
        norm_eps=meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5),
        rope_scaling={"rope_type": "linear", "factor": scaling} if scaling else None,
        tie_embeddings=tied,
    )


def convert_tensors(reader) -> dict:
    """Our state dict from the file's tensors: dequantized to bf16, q/k/v fused, names mapped."""
    from gguf import quants

    out, qkv = {}, {}
    for t in tqdm(reader.tensors, desc="dequantizing", unit=" tensors", disable=None):
        base, _, kind = t.name.rpartition(".")  # kind: weight
        w = torch.from_numpy(quants.dequantize(t.data, t.tensor_type).copy()).to(torch.bfloat16)
        if base.startswith("blk."):
            _, layer, part = base.split(".", 2)
            if part in ("attn_q", "attn_k", "attn_v"):
                qkv.setdefault(int(layer), {})[part] = w
                continue
            if part not in LAYER_KEYS:
                raise ValueError(f"unexpected tensor {t.name!r}: not a llama-architecture file")
            out[f"layers.{layer}.{LAYER_KEYS[part]}.{kind}"] = w
        elif base in TOP_KEYS:
            out[f"{TOP_KEYS[base]}.{kind}"] = w
        elif base == "rope_freqs":  # Llama 3.1's scaled RoPE frequencies: not read from GGUF
            raise ValueError("rope_freqs (Llama 3.1 rope scaling) is not supported from GGUF: convert the HF model")
        else:
            raise ValueError(f"unexpected tensor {t.name!r}: not a llama-architecture file")
    for layer, parts in qkv.items():
        out[f"layers.{layer}.attention.wqkv.weight"] = torch.cat([parts["attn_q"], parts["attn_k"], parts["attn_v"]])
    return out


def write_sentencepiece(meta: dict, path: Path) -> None:
    """A llama vocabulary as a SentencePiece BPE model: pieces, scores and types are SentencePiece's own."""
    need("google.protobuf", "protobuf")
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(meta["tokenizer.ggml.tokens"])
    scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(types)
    for piece, score, kind in zip(meta["tokenizer.ggml.tokens"], scores, types, strict=True):
        m.pieces.add(piece=piece, score=score, type=kind)
    spec = m.trainer_spec
    spec.model_type, spec.vocab_size, spec.byte_fallback = pb.TrainerSpec.BPE, len(types), 6 in types
    spec.unk_id = meta.get("tokenizer.ggml.unknown_token_id", 0)
    spec.bos_id = meta.get("tokenizer.ggml.bos_token_id", -1)
    spec.eos_id = meta.get("tokenizer.ggml.eos_token_id", -1)
    spec.pad_id = meta.get("tokenizer.ggml.padding_token_id", -1)
    norm = m.normalizer_spec
    norm.name, norm.add_dummy_prefix = "identity", meta.get("tokenizer.ggml.add_space_prefix", True)
    norm.remove_extra_whitespaces, norm.escape_whitespaces = False, True
    save_atomic(m.SerializeToString(), path)


def write_tokenizer_json(meta: dict, folder: Path) -> None:
    """A BPE (gpt2) vocabulary as a Hugging Face tokenizer.json with its tokenizer_config.json."""
    need("tokenizers")
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    tokens = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    if meta.get("tokenizer.ggml.pre") in ("llama-bpe", "llama3"):  # Llama 3's split, then bytes
        split = pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated")
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.pre_tokenizer = pre_tokenizers.Sequence([split, byte_level])
    else:  # GPT-2's split
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    tok.add_special_tokens([t for t, kind in zip(tokens, types, strict=True) if kind == 3])
    bos, eos = meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id")
    if bos is not None and meta.get("tokenizer.ggml.add_bos_token", True):
        tok.post_processor = processors.TemplateProcessing(
            single=f"{tokens[bos]} $A", special_tokens=[(tokens[bos], bos)]
        )
    save_atomic(tok.to_str().encode(), folder / "tokenizer.json")
    config = {
        "bos_token": tokens[bos] if bos is not None else None,
        "eos_token": tokens[eos] if eos is not None else None,
    }
    if meta.get("tokenizer.chat_template"):
        config["chat_template"] = meta["tokenizer.chat_template"]
    save_atomic(json.dumps(config, indent=2).encode(), folder / "tokenizer_config.json")


def convert_gguf(path: Path, out_dir: Path) -> Path:
    gguf = need("gguf")
    reader = gguf.GGUFReader(str(path))
    meta = metadata(reader)
    state_dict = convert_tensors(reader)
    args = model_args(meta, state_dict["tok_embeddings.weight"].shape[0], "output.weight" not in state_dict)
    path = save_model(state_dict, args, out_dir)
    kind = meta.get("tokenizer.ggml.model")
    if kind == "llama":
        write_sentencepiece(meta, out_dir / "tokenizer.model")
    elif kind == "gpt2":
        write_tokenizer_json(meta, out_dir)
    else:
        print(f"note: tokenizer model {kind!r} is not rebuilt; pass --tokenizer_path to generate.py")
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description="Convert a llama-architecture GGUF file to model.pth and a tokenizer.")
    p.add_argument("gguf_file", type=Path, help="the .gguf file")
    p.add_argument("out_dir", type=Path, help="folder for model.pth, model_config.json and the tokenizer")
    a = p.parse_args(argv)
    if not a.gguf_file.is_file():
        raise SystemExit(f"error: GGUF file not found: {a.gguf_file}")
    try:
        print(f"Wrote {convert_gguf(a.gguf_file, a.out_dir)}")
    except (ValueError, KeyError) as e:
        raise SystemExit(f"error: {a.gguf_file}: {e}") from None


if __name__ == "__main__":
    main()
