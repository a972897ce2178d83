#!/usr/bin/env bash
# The README's single-GPU figures (Llama-2-7B shape, random weights). Stages (default: all, in order):
#   check cold warm artifacts profile ttft spec_ngram spec_draft (and, not by default: check_bf16_pdl check_int8_pdl seed nopdl layer_once
#   warm_cprofile spec_draft_sampled int8 int8_nopdl int8_gemv kernels check_int4 int4 int4_tinygemm ttft_int4 no_attention
#   int8_no_attention bf16_gemv)
# e.g. STAGES="cold spec_ngram" bash scripts/bench_h100.sh; outputs go to $OUT (default bench_out).
set -u
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/ind_a
export PYTHONPYCACHEPREFIX=/tmp/pyc  # keep bytecode between runs (read-only site-packages), as a normal install does
unset PYTHONDONTWRITEBYTECODE
out="${OUT:-bench_out}"
mkdir -p "$out"
GA="generate.py --random_init 7B --max_new_tokens 200 --ignore_eos"
G="python3 $GA"
TOK="${TOK:-tokenizer.model}"  # the Llama 2 tokenizer, for the text prompt of spec_ngram
TEXT=$([ -f "$TOK" ] && echo "--tokenizer_path $TOK")  # with a tokenizer the samples are printed
REPEAT="The quick brown fox jumps over the lazy dog near the river bank at dawn, while the old miller watches from his door. Repeat the sentence above word for word: The quick brown fox"
wall() { local t0=$EPOCHREALTIME; "$@"; awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "Process wall time: %.1f s\n", b - a }'; }
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name())'
nvidia-smi --query-gpu=name,pci.bus_id,driver_version,clocks.max.sm,clocks.max.mem,power.limit,temperature.gpu --format=csv  # starts differ?
for stage in ${STAGES:-check cold warm artifacts profile ttft spec_ngram spec_draft}; do
  echo "stage $stage starts at $(date +%T)"
  case $stage in
  cold)  # empty inductor cache; writes the compile artifacts
    rm -rf /tmp/ind_a "$out/cc_bf16.bin"
    wall $G --prompt 16 --compile --num_samples 3 --compile_cache "$out/cc_bf16.bin" >"$out/bf16_cold.txt" 2>&1 ;;
  warm)  # same machine, same cache: the start-up time a user sees the second time (twice)
    for i in 1 2; do wall $G --prompt 16 --compile --num_samples 3 >"$out/bf16_warm_$i.txt" 2>&1; done ;;
  check)  # the compiled decode step against eager, PDL off and on, for bf16 and int8 (4 of the 32 layers)
    for q in "" "--quantize int8"; do python3 scripts/check_compiled.py --random_init 7B --n_layer 4 $q; done >"$out/check.txt" 2>&1
    python3 scripts/check_compiled.py --random_init 7B --n_layer 4 --pdl off --compile_layer_once >>"$out/check.txt" 2>&1 ;;
  check_bf16_pdl)  # the defaults (PDL, one compiled layer) against eager, 2 layers
    python3 scripts/check_compiled.py --random_init 7B --n_layer 2 --pdl on >"$out/check_bf16_pdl.txt" 2>&1 ;;
  check_int8_pdl)  # the same for int8: inductor's kernels and our Triton GEMVs with PDL
    python3 scripts/check_compiled.py --random_init 7B --n_layer 2 --quantize int8 --pdl on >"$out/check_int8_pdl.txt" 2>&1 ;;
  layer_once)  # --compile_layer_once: one compiled layer reused for all 32; cold, then warm (its own cache directory)
    for i in 1 2; do TORCHINDUCTOR_CACHE_DIR=/tmp/ind_l wall $G --prompt 16 --compile --compile_layer_once --num_samples 3 \
      --compile_cache "$out/cc_bf16_layer_once.bin" >"$out/bf16_layer_once_$i.txt" 2>&1; done ;;
  seed)  # the default cache filled from an earlier call's artifact file ($SEED, carried): a warm start on a new machine
    wall $G --prompt 16 --compile --num_samples 3 --compile_cache "${SEED:-$out/cc_bf16.bin}" $TEXT >"$out/bf16_seed.txt" 2>&1 ;;
  nopdl)  # without programmatic dependent launch (the default on one Hopper GPU): from $SEED_NOPDL if given, else cold
    TORCHINDUCTOR_ENABLE_PDL=0 wall $G --prompt 16 --compile --num_samples 3 --compile_cache "${SEED_NOPDL:-$out/cc_bf16_nopdl.bin}" $TEXT >"$out/bf16_nopdl.txt" 2>&1 ;;
  warm_cprofile)  # where the warm start-up time goes: Python profile, then torch's own compile-phase timers
    python3 - ${GA#generate.py } --prompt 16 --compile --num_samples 1 >"$out/bf16_warm_cprofile.txt" 2>&1 <<'PY'
import cProfile, pstats, sys
sys.path.insert(0, ".")
import generate
from torch._dynamo.utils import compile_times
cProfile.run("generate.main(sys.argv[1:])", "/tmp/warm.prof")
print(compile_times(repr="str", aggregate=True))
pstats.Stats("/tmp/warm.prof").sort_stats("cumtime").print_stats(70)
PY
    ;;
  artifacts)  # a new cache directory, as on a fresh machine, with only the artifact file
    TORCHINDUCTOR_CACHE_DIR=/tmp/ind_b wall $G --prompt 16 --compile --num_samples 1 --compile_cache "$out/cc_bf16.bin" >"$out/bf16_artifacts.txt" 2>&1 ;;
  profile)  # kernel tables of the decode step ($PROFILE: which of bf16 int8 int4)
    for q in ${PROFILE:-bf16 int8 int4}; do
      qa=$([ $q = bf16 ] || echo "--quantize $q")
      $G --prompt 16 --compile $qa --num_samples 2 --profile "/tmp/$q" >"$out/${q}_profile.txt" 2>&1
      python3 scripts/trace_summary.py "/tmp/$q.json" --steps 199 >"$out/${q}_kernels.txt" 2>&1
    done ;;
  ttft)  # 2040-token prompt (+8 new = the 2048 context): eager prefill (flash SDPA), then compiled (dynamic shapes)
    P="python3 generate.py --random_init 7B --prompt 2040 --max_new_tokens 8 --ignore_eos --num_samples 3"
    $P >"$out/ttft_eager.txt" 2>&1
    $P --compile_prefill >"$out/ttft_compiled.txt" 2>&1 ;;
  spec_ngram)  # greedy, a prompt that repeats a passage: plain decoding, then n-gram lookup
    $G --compile --temperature 0 --num_samples 3 --tokenizer_path "$TOK" --prompt "$REPEAT" >"$out/spec_plain.txt" 2>&1
    $G --compile --temperature 0 --num_samples 3 --tokenizer_path "$TOK" --prompt "$REPEAT" --speculate ngram >"$out/spec_ngram.txt" 2>&1 ;;
  spec_draft)  # greedy, bf16 target with its own int4 version as the draft
    $G --prompt 16 --compile --temperature 0 --num_samples 3 >"$out/spec_plain16.txt" 2>&1
    $G --prompt 16 --compile --temperature 0 --num_samples 3 --draft_quantize int4 >"$out/spec_draft_int4.txt" 2>&1 ;;
  int8)  # cold, writes its artifact file
    wall $G --prompt 16 --compile --quantize int8 --num_samples 3 --compile_cache "$out/cc_int8.bin" $TEXT >"$out/int8_auto.txt" 2>&1 ;;
  bf16_gemv)  # bf16 with --kernels gemv (the default before session 9: wo and w2 on our GEMV, the rest inductor's); cold
    wall $G --prompt 16 --compile --kernels gemv --num_samples 3 $TEXT >"$out/bf16_gemv.txt" 2>&1 ;;
  int8_nopdl)  # int8 without programmatic dependent launch, cold
    TORCHINDUCTOR_ENABLE_PDL=0 wall $G --prompt 16 --compile --quantize int8 --num_samples 3 $TEXT >"$out/int8_nopdl.txt" 2>&1 ;;
  int8_gemv)  # the gated w1/w3 kernel alone, then int8 without it (--kernels gemv), cold, writing its artifact file
    python3 -c 'import sys, torch; sys.path[:0] = ["scripts", "."]; import kernel_bench as kb, generate as g
bw = g.measure_read_bandwidth(torch.device("cuda")); [kb.bench_gated(*kb.SHAPES["w1/w3"], r, bw) for r in (1, 2)]' >"$out/gated_kernel.txt" 2>&1
    wall $G --prompt 16 --compile --quantize int8 --kernels gemv --num_samples 3 --compile_cache "$out/cc_int8_gemv.bin" $TEXT >"$out/int8_gemv.txt" 2>&1 ;;
  kernels)  # each GEMV kernel alone, per Llama-2-7B layer shape, at 1 row ($ROWS)
    for r in ${ROWS:-1}; do python3 scripts/kernel_bench.py --rows $r; done >"$out/kernels.txt" 2>&1 ;;
  check_int4)  # the defaults with int4 (our Triton GEMV, PDL) against the eager model (dequantize + matmul), 2 layers
    python3 scripts/check_compiled.py --random_init 7B --n_layer 2 --quantize int4 --pdl on >"$out/check_int4.txt" 2>&1 ;;
  no_attention)  # attention through inductor's kernels instead of ours (--no-attention_kernel), bf16, cold: stage cold is the baseline
    wall $G --prompt 16 --compile --no-attention_kernel --num_samples 3 $TEXT >"$out/bf16_no_attention.txt" 2>&1 ;;
  int8_no_attention)  # the same for int8 (stage int8 is the baseline)
    wall $G --prompt 16 --compile --quantize int8 --no-attention_kernel --num_samples 3 $TEXT >"$out/int8_no_attention.txt" 2>&1 ;;
  int4)  # cold, group size 32
    wall $G --prompt 16 --compile --quantize int4 --num_samples 3 $TEXT >"$out/int4.txt" 2>&1 ;;
  int4_tinygemm)  # the same on torch's tinygemm (--kernels torch), the usual approach
    wall $G --prompt 16 --compile --quantize int4 --kernels torch --num_samples 3 $TEXT >"$out/int4_tinygemm.txt" 2>&1 ;;
  ttft_int4)  # 2040-token prompt (+8 new) with int4 weights: eager prefill, dequantized from the GEMV's layout
    python3 generate.py --random_init 7B --prompt 2040 --max_new_tokens 8 --ignore_eos --num_samples 3 --quantize int4 >"$out/ttft_int4.txt" 2>&1 ;;
  spec_draft_sampled)  # default sampling (T 0.8, top-k 200): the plain figure is the cold and warm stages'
    $G --prompt 16 --compile --num_samples 3 --draft_quantize int4 >"$out/spec_draft_int4_sampled.txt" 2>&1 ;;
  esac
  echo "stage $stage done at $(date +%T)"
done
grep -H -E "^pdl|Process wall|Loaded model|Compilation|Average decode|Average time to first|achieved|acceptance|^error" "$out"/*.txt
