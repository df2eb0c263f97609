#!/usr/bin/env bash
# One device call that checks this round's GPU code on CUDA and times what fits the rest:
#   1. kernels new or changed this round (GGUF/ggml, the Q4_1 offset in wna16, FP8 KV in the
#      paged/extend attention, fused FP8 producers, merged projections, forced GPU paths);
#   2. the engine on CUDA (overlap schedule, structured outputs, prefix cache, FP8 KV, CUDA
#      graphs, logprobs vs HF, streams/penalties);
#   3. short benchmarks (GGUF kernels, fused FP8, the engine end to end on the 1B shape).
# Needs the wheels of scripts/gpu_wheels.txt in .whl/ (carry .whl). Logs go to $OUT.
# Each part has its own time cap (T1, T2, T3 seconds) so one slow part cannot eat the others.
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
source "$(dirname "$0")/gpu_env.sh"
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/build/triton-cache}
export MIXQ_TEST_DEVICE=cuda
T1=${T1:-200} T2=${T2:-170} T3=${T3:-110}

echo "== 1. kernels"
timeout "$T1" bash -c 'python3 -m pytest -q -p no:cacheprovider --durations=8 \
  tests/kernels/test_ggml.py tests/kernels/test_wna16.py tests/kernels/test_fp8_kv.py \
  tests/kernels/test_paged_attention.py tests/kernels/test_extend_attention.py tests/kernels/test_elementwise.py \
  tests/kernels/test_quant_fused.py tests/test_merged.py tests/test_fp8_fusion.py \
  tests/kernels/test_wna16_gpu_paths.py tests/kernels/test_w8a16_gpu_paths.py tests/kernels/test_w8_methods.py' \
  2>&1 | tee "$OUT/kernels.log" | tail -25

echo "== 2. engine"
timeout "$T2" bash -c 'python3 -m pytest -q -p no:cacheprovider --durations=8 \
  tests/engine/test_overlap.py tests/engine/test_structured.py tests/engine/test_engine.py \
  tests/engine/test_engine_logprobs.py tests/engine/test_engine_prefix_cache.py tests/engine/test_fp8_kv_engine.py \
  tests/engine/test_cuda_graph.py tests/engine/test_streams_and_penalties.py tests/engine/test_sampler.py' \
  2>&1 | tee "$OUT/engine.log" | tail -25

echo "== 3. benchmarks"
timeout "$T3" python3 bench/engine.py --shape llama-1b --engines hf,bf16-no-overlap,bf16,fp8,int4,mix \
  --batches 1,16,64 --new-tokens 32 --repeats 1 --out "$OUT/engine.json" 2>&1 | tee "$OUT/bench_engine.log" | grep -v '^{' | tail -30
exit 0
