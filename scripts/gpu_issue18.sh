#!/usr/bin/env bash
# Device-call script for issue 18 (repo root on the GPU machine, wheels of
# scripts/gpu_wheels.txt in .whl/, optionally a prebuilt CUDA library in $MIXQ_CUDA_CACHE):
# the kernel and layer tests on CUDA, the fused-FP8 producers, then the W4A16 table
# (shipped path, opt-in mma kernel, cuBLAS, tinygemm, gemlite). Logs to $OUT.
# TESTS overrides the test selection; extra arguments go to bench/w4a16.py.
set -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
source scripts/gpu_env.sh
export PYTHONPATH=$PYTHONPATH:$PWD/bench
export MIXQ_CUDA_CACHE=${MIXQ_CUDA_CACHE:-$PWD/.gpu-cuda-cache}
TESTS=${TESTS:-"tests/kernels/test_w4a16_mma.py tests/test_merged.py tests/test_fp8_fusion.py tests/kernels/test_quant_fused.py tests/kernels/test_wna16.py"}
timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q -p no:cacheprovider $TESTS 2>&1 | tee "$OUT/tests.log" | tail -15
timeout ${FP8_TIMEOUT:-120} python3 bench/fp8_fused.py --out "$OUT/fp8_fused.json" 2>&1 | tee "$OUT/fp8.log" | grep -v '^{'
timeout ${BENCH_TIMEOUT:-420} python3 bench/w4a16.py --out "$OUT/w4a16.json" "$@" 2>&1 | tee "$OUT/bench.log" | grep -v '^{'
