#!/usr/bin/env bash
# Follow-up device call to scripts/gpu_benches.sh (same wheels, logs to $OUT): the CUDA tests it
# cut off (interrupted with SIGINT at the cap so pytest still prints what ran), the INT4 batch-64
# decode outlier re-timed with torch.profiler's view of the host, the prefix-cache bench with
# warm-ups that compile the extend-over-prefix kernels off the clock, KV capacity with each
# engine's memory handed back before the next, and the fused FP8 producers (issue 18 point 3).
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
source "$(dirname "$0")/gpu_env.sh"
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/build/triton-cache}
W=/tmp/mixq-e2e

echo "== 1. tests on CUDA"
MIXQ_TEST_DEVICE=cuda timeout -s INT 140 python3 -m pytest -q -p no:cacheprovider -rf --durations=6 \
  tests/engine/test_fp8_kv_engine.py "tests/test_gguf_llamacpp.py::test_ggml_kernel_on_llama_cpp_blocks" \
  tests/kernels/test_ggml.py tests/kernels/test_wna16.py 2>&1 | tee "$OUT/tests.log" | tail -22

echo "== 2. engine, Llama-3.2-1B shape, with a profile at batch 64"
timeout -s INT 170 python3 bench/engine.py --shape llama-1b --engines bf16-no-overlap,bf16,int4 --profile \
  --batches 1,16,64 --new-tokens 32 --repeats 2 --workdir "$W" --out "$OUT/engine.json" > "$OUT/engine.log" 2>&1
grep -v '^{' "$OUT/engine.log" | grep -v "Writing model\|Loading weights" | cut -c1-160 | tail -120

echo "== 3. prefix cache and KV capacity"
timeout 80 python3 bench/prefix_cache.py --model-path "$W/llama-1b/bf16" --device cuda --random-ids \
  --out "$OUT/prefix.json" 2>&1 | tee "$OUT/prefix.log" | tail -12
timeout 50 python3 bench/kv_capacity.py --model-path "$W/llama-1b/bf16" --gpu-memory --context 8192 --device cuda \
  --out "$OUT/kv.json" 2>&1 | tee "$OUT/kv.log" | tail -6

echo "== 4. fused FP8 producers"
timeout 90 python3 bench/fp8_fused.py --out "$OUT/fp8_fused.json" 2>&1 | tee "$OUT/fp8.log" | grep -v '^{' | tail -25
exit 0
