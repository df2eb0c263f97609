#!/usr/bin/env bash
# One device call: the model/engine/kernel tests on CUDA, then the kernel benchmark.
# (tests/kernels includes the forced GPU-path tests, *_gpu_paths.py; when the call runs out
# of time, scripts/gpu_paths.sh runs them, and the engine logprob tests, in a call of their own)
# Run on the GPU machine from the repo root with the wheels of scripts/gpu_wheels.txt in .whl/.
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
MIXQ_TEST_DEVICE=cuda python3 -m pytest -q -p no:cacheprovider tests/kernels tests/test_models_hf.py \
  tests/test_mixed_models.py tests/engine tests/test_formats_fixtures.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -15
PYTHONUNBUFFERED=1 python3 bench/kernels.py ${BENCH_ARGS:-} --out "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.log"
