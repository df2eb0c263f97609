#!/usr/bin/env bash
# One device call for the GPU halves of issues 15 and 17 and the 1B end-to-end rerun of issue 18:
#   1. CUDA runs of the tests that were cut off or failed last time (FP8-KV engine, the ggml
#      kernel on llama.cpp's own blocks, wna16);
#   2. bench/kernels.py --gguf (every GGUF type in its kernel vs dequantize + cuBLAS);
#   3. bench/engine.py on the Llama-3.2-1B shape (writes its random BF16 checkpoint to /tmp/mixq-e2e);
#   4. prefix caching (2k-token shared system prompt, 16 requests) and KV capacity (8k context,
#      FP8 vs BF16 KV, sized from --mem-fraction-static) on that checkpoint.
# The embedded SmolLM2 GGUF (98 MB) is over the carry limit, so the GPU benches use the 1B shape.
# Needs the wheels of scripts/gpu_wheels.txt in .whl/ (carry .whl). Logs go to $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
source "$(dirname "$0")/gpu_env.sh"
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/build/triton-cache}
W=/tmp/mixq-e2e
T1=${T1:-150} T2=${T2:-110} T3=${T3:-190} T4=${T4:-100}

echo "== 1. tests on CUDA"
MIXQ_TEST_DEVICE=cuda timeout "$T1" python3 -m pytest -q -p no:cacheprovider --durations=5 \
  tests/engine/test_fp8_kv_engine.py "tests/test_gguf_llamacpp.py::test_ggml_kernel_on_llama_cpp_blocks" \
  tests/kernels/test_wna16.py 2>&1 | tee "$OUT/tests.log" | tail -15

echo "== 2. GGUF kernels"
timeout "$T2" python3 bench/kernels.py --gguf --out "$OUT/gguf.json" 2>&1 | tee "$OUT/gguf.log" | grep -v '^{'

echo "== 3. engine, Llama-3.2-1B shape"
timeout "$T3" python3 bench/engine.py --shape llama-1b --engines hf,bf16-no-overlap,bf16,fp8,int4,mix \
  --batches 1,16,64 --new-tokens 32 --repeats 1 --workdir "$W" --out "$OUT/engine.json" 2>&1 \
  | tee "$OUT/engine.log" | grep -v '^{' | tail -30

echo "== 4. prefix cache and KV capacity"
timeout "$T4" python3 bench/prefix_cache.py --model-path "$W/llama-1b/bf16" --device cuda --random-ids --out "$OUT/prefix.json" \
  2>&1 | tee "$OUT/prefix.log" | tail -20
timeout 60 python3 bench/kv_capacity.py --model-path "$W/llama-1b/bf16" --gpu-memory --context 8192 --device cuda \
  --out "$OUT/kv.json" 2>&1 | tee "$OUT/kv.log" | tail -10
exit 0
