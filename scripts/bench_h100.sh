#!/usr/bin/env bash
# The README's single-GPU figures (Llama-2-7B shape, random weights): bf16 cold / warm / artifact start,
# a decode profile per precision, and time to first token for a 2048-token prompt.
set -u
export PYTHONUNBUFFERED=1
out="${OUT:-bench_out}"
mkdir -p "$out"
G="python3 generate.py --random_init 7B --prompt 16 --max_new_tokens 200 --ignore_eos"
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name())'
rm -rf /tmp/ind_a /tmp/ind_b /tmp/cc_bf16.bin
# cold: empty inductor cache; writes the compile artifacts
TORCHINDUCTOR_CACHE_DIR=/tmp/ind_a $G --compile --num_samples 3 --compile_cache /tmp/cc_bf16.bin >"$out/bf16_cold.txt" 2>&1
# warm: same machine, same cache; the last sample is profiled
TORCHINDUCTOR_CACHE_DIR=/tmp/ind_a $G --compile --num_samples 2 --profile /tmp/bf16 >"$out/bf16_warm.txt" 2>&1
python3 scripts/trace_summary.py /tmp/bf16.json --steps 199 >"$out/bf16_kernels.txt" 2>&1
# a new cache directory, as on a fresh machine, with only the artifact file
TORCHINDUCTOR_CACHE_DIR=/tmp/ind_b $G --compile --num_samples 1 --compile_cache /tmp/cc_bf16.bin >"$out/bf16_artifacts.txt" 2>&1
for q in ${QUANT:-int8}; do
  TORCHINDUCTOR_CACHE_DIR=/tmp/ind_a $G --compile --quantize "$q" --num_samples 2 --profile "/tmp/$q" >"$out/${q}_profile.txt" 2>&1
  python3 scripts/trace_summary.py "/tmp/$q.json" --steps 199 >"$out/${q}_kernels.txt" 2>&1
done
# time to first token, 2048-token prompt: eager prefill (flash SDPA), then compiled prefill (dynamic shapes)
P="python3 generate.py --random_init 7B --prompt 2048 --max_new_tokens 8 --ignore_eos --num_samples 3"
$P >"$out/ttft_eager.txt" 2>&1
TORCHINDUCTOR_CACHE_DIR=/tmp/ind_a $P --compile_prefill >"$out/ttft_compiled.txt" 2>&1
grep -H -E "Compilation|Average decode|Average time to first|achieved|Error|error" "$out"/*.txt
head -n 4 "$out"/*_kernels.txt
