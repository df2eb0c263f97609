#!/usr/bin/env bash
# Third device call: the CUDA tests of scripts/gpu_benches2.sh part 1 (whose log did not come
# back), then bench/engine.py on the Llama-3-8B shape. The tests' summary is printed again last.
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
source "$(dirname "$0")/gpu_env.sh"
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/build/triton-cache}
MIXQ_TEST_DEVICE=cuda timeout -s INT 170 python3 -m pytest -q -p no:cacheprovider -rfE --durations=6 \
  tests/engine/test_fp8_kv_engine.py "tests/test_gguf_llamacpp.py::test_ggml_kernel_on_llama_cpp_blocks" \
  tests/kernels/test_ggml.py tests/kernels/test_wna16.py > "$OUT/tests.txt" 2>&1
timeout -s INT 380 python3 bench/engine.py --shape llama-8b --engines hf,bf16,fp8,int4,mix \
  --batches 1,16,64 --new-tokens 32 --repeats 1 --workdir /tmp/mixq-e2e --out "$OUT/engine8b.json" > "$OUT/engine8b.txt" 2>&1
grep -v '^{' "$OUT/engine8b.txt" | grep -v "Writing model\|Loading weights" | tail -40
echo "== tests"; tail -25 "$OUT/tests.txt"
exit 0
