"""scripts/convert_hf_checkpoint.py: HF folders in every layout convert to logits equal to transformers'."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, full_logits, rel_err
from convert_hf_checkpoint import convert_hf_checkpoint
from test_model import hf_model

from generate import load_model

LAYOUTS = {
    "single-safetensors": dict(),
    "sharded-safetensors": dict(max_shard_size="100KB"),
    "pytorch-bin": dict(safe_serialization=False),
}


def save_hf(kind: str, folder, **save_kwargs):
    model, _ = hf_model(kind)
    model.save_pretrained(folder, **save_kwargs)
    return model


def assert_same_logits(hf, model_pth):
    ours = load_model(model_pth, "cpu", torch.float32)
    idx = torch.randint(0, 320, (1, 100), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert rel_err(full_logits(ours, idx), hf(idx).logits) < 1e-4


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layouts_convert_to_matching_logits(layout, tmp_path):
    hf = save_hf("gqa", tmp_path, **LAYOUTS[layout])
    files = sorted(p.name for p in tmp_path.iterdir())
    if layout == "sharded-safetensors":
        assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 1
    assert_same_logits(hf, convert_hf_checkpoint(tmp_path))
    assert (
        json.loads((tmp_path / "model_config.json").read_text())["n_local_heads"] == 2
    )  # GQA: 8 query heads, 2 key/value heads


@pytest.mark.parametrize("kind", ["llama2", "mistral", "llama3.1-rope-scaling", "tied-embeddings", "mixtral"])
def test_model_kinds_convert_to_matching_logits(kind, tmp_path):
    hf = save_hf(kind, tmp_path)
    assert_same_logits(hf, convert_hf_checkpoint(tmp_path, out_dir=tmp_path / "out"))


def test_cli_and_tokenizer_copy(tmp_path, llama2_tokenizer_path):
    save_hf("llama2", tmp_path)
    (tmp_path / "original").mkdir()
    shutil.copy(llama2_tokenizer_path, tmp_path / "original" / "tokenizer.model")  # where Llama 3 keeps it
    p = subprocess.run(
        [sys.executable, "scripts/convert_hf_checkpoint.py", "--checkpoint_dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "model.pth").is_file() and (
        tmp_path / "tokenizer.model"
    ).read_bytes() == llama2_tokenizer_path.read_bytes()


def cli_error(tmp_path) -> str:
    p = subprocess.run(
        [sys.executable, "scripts/convert_hf_checkpoint.py", "--checkpoint_dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and "Traceback" not in p.stderr, p.stderr
    return p.stderr


def test_truncated_file_is_a_one_line_error(tmp_path):
    save_hf("llama2", tmp_path)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert "corrupt or truncated" in cli_error(tmp_path)


def test_config_with_more_layers_than_the_weights_is_a_one_line_error(tmp_path):
    save_hf("llama2", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["num_hidden_layers"] = 3  # mislabeled: the weights hold 2
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert "missing ['layers.2." in cli_error(tmp_path)


def test_missing_shard_and_missing_weights_are_one_line_errors(tmp_path):
    save_hf("llama2", tmp_path, max_shard_size="100KB")
    next(tmp_path.glob("model-00002-*.safetensors")).unlink()
    assert "lists shards that are not there" in cli_error(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no model.safetensors or pytorch_model.bin" in cli_error(empty)


def test_unknown_tensor_is_refused(tmp_path):
    from convert_hf_checkpoint import convert_state_dict

    from model import ModelArgs

    with pytest.raises(ValueError, match="unexpected tensor 'model.layers.0.self_attn.q_norm.weight'"):
        convert_state_dict(
            [("model.layers.0.self_attn.q_norm.weight", torch.ones(4))], ModelArgs.from_name("stories15M")
        )
