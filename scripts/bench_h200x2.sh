#!/usr/bin/env bash
# The README's tensor-parallel, Mixtral and speculative-decoding figures, on a machine with 2 GPUs:
# first Llama-2-7B over both GPUs, then two single-GPU jobs side by side.
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
out="${OUT:-bench_out}"
mkdir -p "$out"
torchrun --standalone --nproc_per_node=2 generate.py --random_init 7B --prompt 16 --max_new_tokens 200 --num_samples 3 --compile >"$out/tp2.txt" 2>&1
tail -n 5 "$out/tp2.txt"
(
  CUDA_VISIBLE_DEVICES=0 python3 bench.py --random_init 7B --precisions bf16 --num_samples 3 --json "$out/tp1.json" >"$out/tp1.txt" 2>&1
  CUDA_VISIBLE_DEVICES=0 python3 bench.py --random_init Mixtral-8x7B-v0.1 --precisions int8 --num_samples 2 --json "$out/mixtral.json" >"$out/mixtral.txt" 2>&1
) &
CUDA_VISIBLE_DEVICES=1 python3 bench.py --random_init 7B --precisions bf16 --speculate ngram draft-int4 --num_samples 2 \
  --json "$out/spec.json" >"$out/spec.txt" 2>&1 &
wait
for f in tp1 mixtral spec; do tail -n 5 "$out/$f.txt"; done
