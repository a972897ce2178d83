#!/usr/bin/env bash
# The README's tensor-parallel and Mixtral figures, on a machine with 2 GPUs (Llama-2-7B shape, random weights):
# 1 GPU and Mixtral int8 side by side (one GPU each), then both GPUs (NCCL all-reduces).
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # no NVLink multicast
out="${OUT:-bench_out}"
budget="${BUDGET_S:-590}"  # stop in time for the outputs to come back
mkdir -p "$out"
G="generate.py --random_init 7B --prompt 16 --max_new_tokens 200 --ignore_eos --compile --num_samples 3"
nvidia-smi topo -m >"$out/topo.txt" 2>&1
CUDA_VISIBLE_DEVICES=0 timeout 330 python3 $G >"$out/tp1.txt" 2>&1 &
CUDA_VISIBLE_DEVICES=1 timeout 330 python3 generate.py --random_init Mixtral-8x7B-v0.1 --quantize int8 --prompt 16 --max_new_tokens 200 \
  --ignore_eos --compile --num_samples 2 >"$out/mixtral_int8.txt" 2>&1 &
wait
echo "1-GPU jobs done at ${SECONDS}s"
timeout $((budget - SECONDS)) torchrun --standalone --nproc_per_node=2 $G >"$out/tp2.txt" 2>&1
echo "2-GPU job done at ${SECONDS}s"
grep -H -E "Compilation|Average decode|achieved|^error|Error" "$out"/*.txt | cut -c1-300
