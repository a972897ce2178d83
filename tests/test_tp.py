"""Tensor parallel over 2 gloo processes on the CPU must give the logits of 1 process."""

import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import ROOT, full_logits, random_transformer, rel_err, save_checkpoint, tiny_args

import quantize
import tp
from generate import load_model

CASES = {
    "llama-fp32": (dict(), None, torch.float32),
    "llama-bf16": (dict(), None, torch.bfloat16),
    "llama-int8": (dict(), "int8", torch.float32),
    "llama-int4": (dict(dim=128, intermediate_size=256), "int4", torch.float32),
    "mixtral-fp32": (dict(num_experts=4, num_activated_experts=2), None, torch.float32),
    "mixtral-int8": (dict(num_experts=4, num_activated_experts=2), "int8", torch.float32),
}


def build(case, tmp):
    overrides, mode, dtype = CASES[case]
    model = random_transformer(tiny_args(vocab_size=512, **overrides), seed=0)
    if mode:
        quantize.quantize_model(model, mode, 32)
    return save_checkpoint(model, tmp / case), dtype


def worker(rank, world, path, dtype, idx, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["TP_TEST_PORT"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = load_model(path, "cpu", dtype, use_tp=True)
        logits = full_logits(model, idx)
        if rank == 0:
            torch.save(logits.float(), out)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_match_one(case, tmp_path):
    path, dtype = build(case, tmp_path)
    idx = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(0))
    single = load_model(path, "cpu", dtype)
    ref = full_logits(single, idx).float()
    os.environ["TP_TEST_PORT"] = str(29500 + (abs(hash(case)) % 1000))
    mp.spawn(worker, args=(2, path, dtype, idx, tmp_path / "out.pt"), nprocs=2, join=True)
    sharded = torch.load(tmp_path / "out.pt")
    assert rel_err(sharded, ref) < (2e-2 if dtype == torch.bfloat16 else 1e-5)


def test_attention_heads_are_split(tmp_path):
    """Guard: the sharded model really holds half of each layer."""
    with pytest.raises(ValueError, match="3 processes do not divide the model's 4 attention heads"):
        tp.check_divisible(tiny_args(), 3)
    shard = torch.arange(24.0).view(12, 2)
    assert tp.shard(shard, 0, 1, 2).tolist() == shard[6:].tolist()


def test_torchrun_cli_matches_single_process(tmp_path, llama2_tokenizer_path):
    """The real entry point: torchrun with 2 gloo processes prints the same greedy text as 1 process."""
    model = random_transformer(tiny_args(), seed=0)
    path = save_checkpoint(model, tmp_path)
    args = ["--checkpoint_path", str(path), "--tokenizer_path", str(llama2_tokenizer_path), "--device", "cpu"]
    args += [
        "--prompt",
        "Hello there",
        "--temperature",
        "0",
        "--max_new_tokens",
        "10",
        "--num_samples",
        "1",
        "--ignore_eos",
    ]

    def text(cmd):
        p = subprocess.run(cmd + args, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-2000:]
        return [line for line in p.stdout.splitlines() if line.startswith("Hello there")]

    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "generate.py"]
    one, two = text([sys.executable, "generate.py"]), text(torchrun)
    assert len(one) == 1 and one == two  # and rank 1 printed nothing
    args += ["--speculate", "ngram", "--speculate_k", "3"]  # speculative decoding under tensor parallel: same tokens
    assert text(torchrun) == one


def test_torchrun_with_indivisible_heads_is_a_clear_error(tmp_path, llama2_tokenizer_path):
    path = save_checkpoint(random_transformer(tiny_args(n_head=3, n_local_heads=3, dim=48), seed=0), tmp_path)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "generate.py"]
    cmd += [
        "--checkpoint_path",
        str(path),
        "--tokenizer_path",
        str(llama2_tokenizer_path),
        "--device",
        "cpu",
        "--prompt",
        "4",
    ]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode != 0
    assert (
        "error: 2 processes do not divide the model's 3 attention heads: use a --nproc_per_node that divides 3\n"
        in p.stderr
    )
