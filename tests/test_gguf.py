"""scripts/convert_gguf.py: GGUF files written here with the gguf package convert to the weights, the config and
the tokenizer they hold."""

import json

import numpy as np
import pytest
import torch
from conftest import STORIES, STORY, full_logits, rel_err, tiny_args

gguf = pytest.importorskip("gguf")
pytest.importorskip("google.protobuf")
from convert_gguf import convert_gguf  # noqa: E402
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf import quants  # noqa: E402

import generate  # noqa: E402
from model import Transformer  # noqa: E402
from quantize import load_checkpoint_model  # noqa: E402

NAMES = {"tok_embeddings": "token_embd", "norm": "output_norm", "output": "output", "attention_norm": "attn_norm",
         "ffn_norm": "ffn_norm", "attention.wo": "attn_output", "feed_forward.w1": "ffn_gate",
         "feed_forward.w3": "ffn_up", "feed_forward.w2": "ffn_down"}  # fmt: skip


def k_quant_bytes(rows: int, cols: int, qtype, seed: int) -> np.ndarray:
    """Random Q4_K / Q6_K blocks with small finite f16 scales (gguf reads these types but does not write them)."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    data = np.random.default_rng(seed).integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    halves = np.full((rows, cols // block, 2), 0.002, dtype=np.float16).view(np.uint8)  # two f16 per block
    if qtype == Q.Q4_K:
        data[..., 0:4] = halves  # d, dmin first
    else:
        data[..., size - 2 :] = halves[..., :2]  # Q6_K: d last
    return data.reshape(rows, -1)


def sentencepiece_fields(path):
    """The GGUF tokenizer fields of a SentencePiece model, as llama.cpp writes them: a function of the writer."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    m.ParseFromString(path.read_bytes())

    def add(w):
        w.add_tokenizer_model("llama"), w.add_token_list([p.piece for p in m.pieces])
        w.add_token_scores([p.score for p in m.pieces]), w.add_token_types([p.type for p in m.pieces])
        spec = m.trainer_spec
        w.add_bos_token_id(spec.bos_id), w.add_eos_token_id(spec.eos_id), w.add_unk_token_id(spec.unk_id)

    return add


def write_gguf(path, model: Transformer, qtype=Q.F32, tokenizer_fields=None, seed: int = 0) -> dict:
    """model as llama.cpp writes it: q, k and v apart, names and metadata of the llama architecture, 2-D weights in
    qtype. Returns the weights as the file holds them (what the conversion must give back)."""
    cfg, w = model.config, gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(cfg.block_size), w.add_embedding_length(cfg.dim), w.add_block_count(cfg.n_layer)
    w.add_feed_forward_length(cfg.intermediate_size), w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_local_heads), w.add_rope_freq_base(cfg.rope_base)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    if tokenizer_fields is not None:
        tokenizer_fields(w)
    tensors = {}
    for name, t in model.state_dict().items():
        if name == "output.weight" and cfg.tie_embeddings:
            continue
        base = name.removesuffix(".weight")
        parts = {base: t}
        if base.endswith("wqkv"):
            q, k = cfg.n_head * cfg.head_dim, cfg.n_local_heads * cfg.head_dim
            parts = dict(zip(("attn_q", "attn_k", "attn_v"), t.split([q, k, k]), strict=True))
        for part, value in parts.items():
            layer = base.split(".")[1] if base.startswith("layers.") else None
            key = f"blk.{layer}.{part}" if part.startswith("attn_") else None
            if key is None:
                rest = base.split(".", 2)[2] if layer is not None else base
                key = f"blk.{layer}.{NAMES[rest]}" if layer is not None else NAMES[rest]
            x = value.float().numpy()
            kind = qtype if value.dim() == 2 and x.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0] == 0 else Q.F32
            if kind in (Q.Q4_K, Q.Q6_K):
                raw = k_quant_bytes(*x.shape, kind, seed + len(tensors))
            elif kind != Q.F32:  # rows the format's blocks do not divide stay float, as llama.cpp keeps them
                raw = quants.quantize(x, kind)
            else:
                raw = x
            if raw is x:
                w.add_tensor(key + ".weight", x)
            else:
                w.add_tensor(key + ".weight", raw, raw_dtype=kind)
            tensors[key] = torch.from_numpy(quants.dequantize(raw, kind).copy())
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return tensors


def from_file_weights(model: Transformer, tensors: dict) -> Transformer:
    """model with the file's weights (rounded to bf16, as the conversion stores them), in float32."""
    cfg, sd = model.config, {}
    for name in model.state_dict():
        base = name.removesuffix(".weight")
        if base.endswith("wqkv"):
            layer = base.split(".")[1]
            sd[name] = torch.cat([tensors[f"blk.{layer}.attn_{p}"] for p in "qkv"])
        elif base.startswith("layers."):
            sd[name] = tensors[f"blk.{base.split('.')[1]}.{NAMES[base.split('.', 2)[2]]}"]
        elif name != "output.weight" or not cfg.tie_embeddings:
            sd[name] = tensors[NAMES[base]]
    ref = Transformer(cfg)
    ref.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in sd.items()}, strict=not cfg.tie_embeddings)
    if cfg.tie_embeddings:
        ref.output.weight = ref.tok_embeddings.weight
    return ref.eval()


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q6_K], ids=lambda q: q.name)
def test_each_tensor_type_converts_to_the_weights_the_file_holds(tmp_path, qtype):
    from conftest import random_transformer

    model = random_transformer(tiny_args(dim=256, n_head=4, n_local_heads=2, intermediate_size=512, vocab_size=512))
    tensors = write_gguf(tmp_path / "m.gguf", model, qtype)
    converted = load_checkpoint_model(convert_gguf(tmp_path / "m.gguf", tmp_path / "out")).float()
    assert json.loads((tmp_path / "out" / "model_config.json").read_text())["n_local_heads"] == 2
    idx = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(0))
    ref = from_file_weights(model, tensors)
    assert rel_err(full_logits(converted, idx), full_logits(ref, idx)) < 1e-5
    if qtype in (Q.F32, Q.F16, Q.BF16, Q.Q8_0):  # and close to the weights before they were stored
        assert rel_err(full_logits(converted, idx), full_logits(model, idx)) < 5e-2  # bf16 and Q8_0 rounding


def test_the_demo_model_through_gguf_tells_its_story(tmp_path):
    model = load_checkpoint_model(STORIES / "model.pth").float()
    write_gguf(tmp_path / "stories.gguf", model, Q.F32, sentencepiece_fields(STORIES / "tokenizer.model"))
    out = convert_gguf(tmp_path / "stories.gguf", tmp_path / "out")
    from tokenizer import get_tokenizer

    tok = get_tokenizer(out.parent / "tokenizer.model")
    prompt = torch.tensor(tok.encode("Once upon a time"), dtype=torch.int)
    y, _ = generate.generate(load_checkpoint_model(out).float(), prompt, 64, temperature=0)
    assert tok.decode(y[0].tolist()).startswith(STORY)


def test_a_bpe_vocabulary_becomes_a_tokenizer_json_that_encodes_the_same(hf_tokenizer_folder, tmp_path):
    """A gpt2-style (byte-level BPE) vocabulary, as llama.cpp stores a tokenizer.json's: tokens, merges, types."""
    from conftest import HF_TEXTS, random_transformer

    from tokenizer import get_tokenizer

    source = json.loads((hf_tokenizer_folder / "tokenizer.json").read_text())
    vocab = source["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    special = {t["content"] for t in source["added_tokens"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in source["model"]["merges"]]

    def add(w):
        w.add_tokenizer_model("gpt2"), w.add_tokenizer_pre("gpt-2"), w.add_token_list(tokens)
        w.add_token_merges(merges), w.add_token_types([3 if t in special else 1 for t in tokens])
        w.add_bos_token_id(vocab["<s>"]), w.add_eos_token_id(vocab["</s>"])

    path = tmp_path / "bpe.gguf"
    write_gguf(path, random_transformer(tiny_args(vocab_size=512)), Q.F32, add)
    out = convert_gguf(path, tmp_path / "out")
    ours, theirs = get_tokenizer(out.parent / "tokenizer.json"), get_tokenizer(hf_tokenizer_folder / "tokenizer.json")
    for text in HF_TEXTS:
        assert ours.encode(text) == theirs.encode(text) and ours.decode(ours.encode(text)) == text
    assert ours.bos_id() == vocab["<s>"] and ours.stop_ids() == [vocab["</s>"]]


def test_what_does_not_convert_is_a_one_line_error(tmp_path, capsys):
    from conftest import random_transformer
    from convert_gguf import main

    model = random_transformer(tiny_args(vocab_size=512))
    write_gguf(tmp_path / "m.gguf", model, Q.F32, lambda w: w.add_tensor("rope_freqs.weight", np.ones(8, np.float32)))
    with pytest.raises(SystemExit, match="rope_freqs .Llama 3.1 rope scaling. is not supported"):
        main([str(tmp_path / "m.gguf"), str(tmp_path / "out")])
    with pytest.raises(SystemExit, match="GGUF file not found"):
        main([str(tmp_path / "missing.gguf"), str(tmp_path / "out")])
