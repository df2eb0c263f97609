#!/usr/bin/env bash
# Device-call script for issue 18's W4A16 kernel (run from the repo root on the GPU
# machine, with the wheels of scripts/gpu_wheels.txt in .whl/ and, to skip the nvcc build,
# a prebuilt library in $MIXQ_CUDA_CACHE): the kernel tests on CUDA, then the benchmark
# against Triton, cuBLAS, tinygemm and gemlite. Logs and JSON go to $OUT.
set -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
source scripts/gpu_env.sh
export PYTHONPATH=$PYTHONPATH:$PWD/bench
export MIXQ_CUDA_CACHE=${MIXQ_CUDA_CACHE:-$PWD/.gpu-cuda-cache}
python3 -c "from mixq.kernels import w4a16_mma; import torch; print('cuda lib:', w4a16_mma.build(torch.cuda.get_device_capability()))"
timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q -x -p no:cacheprovider tests/kernels/test_w4a16_mma.py tests/test_merged.py 2>&1 | tee "$OUT/tests.log" | tail -25
timeout ${BENCH_TIMEOUT:-420} python3 bench/w4a16.py --out "$OUT/w4a16.json" "$@" 2>&1 | tee "$OUT/bench.log" | grep -v '^{'
