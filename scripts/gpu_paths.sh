#!/usr/bin/env bash
# One device call: the tests that force the kernels' GPU-only paths (16-bit magic-number
# dequantization, every launch configuration the heuristics pick) and the engine's logprob
# tests against HF, on CUDA. The same tests run on the CPU under the Triton interpreter in
# CI; here they run the real kernels (mostly Triton compiles: one per forced config).
# Needs the wheels of scripts/gpu_wheels.txt in .whl/, as scripts/gpu_check.sh does.
#   bash scripts/gpu_paths.sh        writes $OUT/gpu_paths.log
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/build/triton-cache}
MIXQ_TEST_DEVICE=cuda timeout 560 python3 -m pytest -q -p no:cacheprovider --durations=10 \
  tests/kernels/test_wna16_gpu_paths.py tests/kernels/test_w8a16_gpu_paths.py tests/kernels/test_fused_moe_gpu_paths.py \
  tests/engine/test_engine_logprobs.py \
  "tests/kernels/test_extend_attention.py::test_engine_triton_backend_matches_torch_native_on_chunked_prefill" \
  tests/kernels/test_fused_moe.py::test_fused_forward_has_no_host_sync \
  tests/kernels/test_w8_kernels.py::test_scaled_mm_path_matches_reference 2>&1 | tee "$OUT/gpu_paths.log" | tail -25
exit "${PIPESTATUS[0]}"
