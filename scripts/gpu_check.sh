#!/usr/bin/env bash
# One device call: the model/engine/kernel tests on CUDA, then the kernel benchmark.
# Run on the GPU machine from the repo root with the wheels of scripts/gpu_wheels.txt in .whl/.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
MIXQ_TEST_DEVICE=cuda python3 -m pytest -q -p no:cacheprovider tests/kernels tests/test_models_hf.py \
  tests/test_mixed_models.py tests/engine tests/test_formats_fixtures.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -15
PYTHONUNBUFFERED=1 python3 bench/kernels.py ${BENCH_ARGS:-} --out "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.log"
