"""Every command in the README runs as written, on the demo model (paths in the README point to a workspace that
holds copies of it). A command the README gains is run too: it must work, or be listed in NOT_RUN with a reason."""

import importlib.util
import re
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, STORIES, STORY

README = ROOT / "README.md"
NOT_RUN = {  # the one-line reason each is not run here
    "pip install -r requirements.txt": "installs packages",
    "pip install huggingface_hub && ./scripts/prepare.sh meta-llama/Llama-2-7b-chat-hf": "downloads from the Hub",
    "python scripts/download.py --repo_id meta-llama/Llama-2-7b-chat-hf --hf_token $HF_TOKEN": "downloads from the Hub",
    "pip install lm_eval && python eval.py --checkpoint_path .../model.pth --tasks hellaswag --limit 200": "downloads",
    "pip install -r requirements.txt -r requirements-test.txt": "installs packages",
    "pip install gguf protobuf": "installs packages",
    "python -m pytest tests": "this suite",
    "python -m pytest -m gpu -n 16": "this suite",
    "pip install starlette uvicorn": "installs packages",
    "python serve.py --checkpoint_path checkpoints/.../model.pth --compile --max_batch_size 8": (
        "a server that runs until stopped (tests/test_serve.py starts one on the demo model)"
    ),
    'curl http://127.0.0.1:8000/v1/chat/completions -d \'{"messages": [{"role": "user", "content": "Hi"}], '
    '"max_tokens": 64}\'': "needs the server above",
    "python bench.py --random_init 7B --precisions bf16 int8 int4 --batch_sizes 1 8 64 --num_samples 2": (
        "the benchmark of a 7B shape (tests/test_bench.py runs bench.py on the demo model)"
    ),
    "python bench.py --random_init Llama-3.1-8B --precisions bf16 int8 int4 --prompt_lengths 16 128 512 2048 8192 "
    "--max_new_tokens 100 --num_samples 2 --plot prompt_lengths.png": (
        "the benchmark of an 8B shape (tests/test_bench.py runs bench.py on the demo model)"
    ),
}
HF_REPO = "checkpoints/meta-llama/Llama-2-7b-chat-hf"
HAS_GGUF = importlib.util.find_spec("gguf") is not None


def readme_commands() -> list[str]:
    """The commands of the README's bash blocks, continuation lines joined and trailing comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line:
                commands.append(re.sub(r"\s+", " ", line))
    return commands


def needs_gpu(command: str) -> bool:
    """Compiled runs are too slow for the CPU suite: the gpu suite runs them (on CUDA, where they are meant to run)."""
    return "--compile" in command or command.startswith("torchrun")


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """A folder laid out as the README's paths expect: the demo model under checkpoints/..., its int8 and
    int4 copies, a draft, an HF-format folder to convert, and the text files the commands read."""
    tmp_path = tmp_path_factory.mktemp("workspace")
    import transformers
    from convert_hf_checkpoint import convert_hf_checkpoint

    from quantize import main as quantize_main

    demo = tmp_path / "demo"
    shutil.copytree(STORIES, demo)
    for mode in ("int8", "int4"):  # the files the README's generate commands read
        quantize_main(["--checkpoint_path", str(demo / "model.pth"), "--mode", mode, "--device", "cpu"])
    shutil.copytree(STORIES, demo / "draft")
    hf = tmp_path / "hf"
    shape = dict(
        hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4
    )
    cfg = transformers.LlamaConfig(vocab_size=512, max_position_embeddings=512, **shape)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(hf)
    shutil.copy(STORIES / "tokenizer.model", hf / "tokenizer.model")
    convert_hf_checkpoint(hf)  # as prepare.sh leaves it
    if HAS_GGUF:  # an optional dependency: without it only the GGUF commands skip
        from convert_gguf import convert_gguf
        from test_gguf import sentencepiece_fields, write_gguf

        from quantize import load_checkpoint_model

        model = load_checkpoint_model(STORIES / "model.pth").float()
        write_gguf(demo / "model.gguf", model, tokenizer_fields=sentencepiece_fields(STORIES / "tokenizer.model"))
        convert_gguf(demo / "model.gguf", demo / "from_gguf")  # what the README's generate command reads
    (tmp_path / "prompts.txt").write_text("Once upon a time\nLily and Tom\nOne day, a little dog\n")
    for name, repeats in (("my_text.txt", 40), ("passage.txt", 2), ("wiki.test.raw", 40)):
        (tmp_path / name).write_text((STORY + "\n") * repeats)
    return tmp_path


def as_run_here(command: str, paths: dict) -> str:
    command = command.replace(HF_REPO, str(paths["hf"])).replace("checkpoints/...", str(paths["demo"]))
    command = command.replace(".../", f"{paths['demo']}/")
    command = re.sub(r"(^|\s)python (\S+\.py)", lambda m: f"{m[1]}{sys.executable} {ROOT / m[2]}", command)
    command = command.replace("torchrun ", f"{sys.executable} -m torch.distributed.run ").replace(
        " generate.py", f" {ROOT}/generate.py"
    )
    return command


ON_GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="compiles: in the gpu suite")]
COMMANDS = [pytest.param(c, marks=ON_GPU) if needs_gpu(c) else c for c in readme_commands() if c not in NOT_RUN]


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_runs_as_written(command, template, tmp_path):
    if ("gguf" in command) and not HAS_GGUF:
        pytest.skip("needs the optional gguf package (pip install gguf protobuf)")
    if command.startswith("torchrun") and torch.cuda.device_count() < 2:
        pytest.skip("tensor parallel over 2 processes needs 2 GPUs (tests/test_tp.py runs it on the CPU)")
    shutil.copytree(template, tmp_path, dirs_exist_ok=True)  # each command on fresh copies
    paths = {"demo": tmp_path / "demo", "hf": tmp_path / "hf"}
    p = subprocess.run(
        ["bash", "-c", as_run_here(command, paths)], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert p.returncode == 0, f"{command}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    assert "Traceback" not in p.stderr


def test_the_readme_python_example_tells_the_story():
    code = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(code) == 2 and "OpenAI(" in code[1]  # the second calls a running server: tests/test_serve.py does
    p = subprocess.run([sys.executable, "-c", code[0]], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.startswith(STORY[:100])


def test_every_readme_command_is_run_or_has_a_reason():
    commands = readme_commands()
    assert set(NOT_RUN) <= set(commands), (
        f"NOT_RUN names commands the README no longer has: {set(NOT_RUN) - set(commands)}"
    )
    assert any(c.startswith("python generate.py") for c in commands)
