import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from model import ModelArgs, Transformer  # noqa: E402

TOKENIZER = ROOT.parent / "shared" / "tokenizer.model"
STORIES = ROOT / "models" / "stories260K"  # the demo model: real trained weights, shipped with the project
STORY = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. One day, she saw "
    "a big, red ball. She wanted to play with it, but it was too high."
)  # its greedy text from "Once upon a time" in llama2.c's run.c and in transformers


@pytest.fixture(scope="session")
def llama2_tokenizer_path() -> Path:
    """The real Llama 2 SentencePiece model, kept beside the checkout (never copied into it: Meta's licence)."""
    if not TOKENIZER.is_file():
        pytest.skip(f"needs the Llama 2 tokenizer at {TOKENIZER}, which is not distributed with this project")
    return TOKENIZER


@pytest.fixture
def stories(tmp_path) -> Path:
    """A private copy of the demo model's folder (tests write quantized files beside it); returns its model.pth."""
    folder = tmp_path / "stories260K"
    folder.mkdir()
    for f in STORIES.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    return folder / "model.pth"


def tiny_args(**overrides) -> ModelArgs:
    """A model small enough for CPU tests (vocab 32000 so the real tokenizer fits)."""
    kw = dict(block_size=256, vocab_size=32000, n_layer=2, n_head=4, n_local_heads=2, dim=64, intermediate_size=96)
    kw.update(overrides)
    return ModelArgs(**kw)


def random_transformer(args: ModelArgs, seed: int = 0, dtype=torch.float32) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(args)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.05)  # larger than 0.02 so that layers visibly change the logits
    return model.to(dtype).eval()


def save_checkpoint(model: Transformer, folder: Path, name: str = "model.pth") -> Path:
    """Write model.pth + model_config.json as convert_hf_checkpoint.py would."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), folder / name)
    (folder / "model_config.json").write_text(json.dumps(asdict(model.config)))
    return folder / name


def full_logits(model: Transformer, idx: torch.Tensor) -> torch.Tensor:
    """Logits [B, S, V] of one forward over idx [B, S] from position 0 (fresh or large-enough caches)."""
    model.setup_caches(idx.shape[0], idx.shape[1])
    with torch.no_grad():
        return model(idx, torch.arange(idx.shape[1]))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def prefill_then_decode(model: Transformer, tokens: torch.Tensor, n_prefill: int) -> list:
    """Logits of a prefill of tokens[:, :n_prefill], then of one decode step per remaining token (fresh caches)."""
    model.setup_caches(tokens.shape[0], 32)
    logits = [model(tokens[:, :n_prefill], torch.arange(n_prefill))]
    return logits + [model(tokens[:, i : i + 1], torch.tensor([i])) for i in range(n_prefill, tokens.shape[1])]


def run_in_triton_interpreter(code: str) -> None:
    """Run a test script with TRITON_INTERPRET=1 (read when triton is imported, so in a fresh process); it must print
    ok. CUDA kernels run on CPU tensors this way."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr[-3000:]


HF_TEXTS = [
    "Hello, world!",
    "Ünïcödé — 東京 🙂 naïve café",
    "  two  spaces\nand lines\n",
    "def f(x):\n    return x ** 2",
]


@pytest.fixture
def hf_tokenizer_folder(tmp_path):
    """A byte-level BPE tokenizer.json trained here (as Llama 3 and most new models ship), with BOS added by its
    post-processor, and the config files transformers reads beside it."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<s>", "</s>", "<eot>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(HF_TEXTS * 20 + ["the quick brown fox jumps over the lazy dog"] * 20, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok.save(str(tmp_path / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "tokenizer_class": "PreTrainedTokenizerFast"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 2]}))
    return tmp_path
