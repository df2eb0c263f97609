#!/usr/bin/env bash
# Short device call after the host-path changes (issue 18 point 5): the 1B end-to-end rows
# with and without the overlap schedule, then the ggml kernel tests (incl. the chunked
# dequantize + cuBLAS path) on CUDA. Wheels of scripts/gpu_wheels.txt in .whl/; logs to $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
source "$(dirname "$0")/gpu_env.sh"
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/build/triton-cache}
timeout -s INT ${T1:-85} python3 bench/engine.py --shape llama-1b --engines bf16-no-overlap,bf16,int4 \
  --batches 1,16,64 --new-tokens 32 --repeats 2 --workdir /tmp/mixq-e2e --out "$OUT/engine.json" > "$OUT/engine.txt" 2>&1
MIXQ_TEST_DEVICE=cuda timeout -s INT ${T2:-40} python3 -m pytest -q -p no:cacheprovider -rfE tests/kernels/test_ggml.py \
  > "$OUT/tests.txt" 2>&1
grep -v '^{' "$OUT/engine.txt" | grep -v "Writing model\|Loading weights" | tail -22
tail -4 "$OUT/tests.txt"
exit 0
