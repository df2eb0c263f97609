#!/usr/bin/env bash
# Device call for issue 18 point 2 (not yet run on a GPU): the compiled W4A16 GEMV grouped
# over experts (mixq/kernels/moe_w4a16.py). Builds the library (4 parts in parallel), runs
# its CUDA tests and the W4A16 kernel tests, then times the Qwen3-30B-A3B-shaped layer:
# the fused Triton MoE (all-INT4 and mixed) and the grouped GEMV, against the active-expert
# roofline. Wheels of scripts/gpu_wheels.txt in .whl/; logs to $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
source "$(dirname "$0")/gpu_env.sh"
export MIXQ_CUDA_CACHE=${MIXQ_CUDA_CACHE:-$PWD/.gpu-cuda-cache}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/build/triton-cache}
t0=$(date +%s)
python3 -c "from mixq.kernels import w4a16_mma; import torch; print('cuda lib:', w4a16_mma.build(torch.cuda.get_device_capability()))" 2>&1 | tail -2
echo "build done at $(( $(date +%s) - t0 )) s"
timeout -s INT ${T_TEST:-200} python3 -m pytest -q -p no:cacheprovider -rfE tests/kernels/test_moe_w4a16.py \
  tests/kernels/test_w4a16_mma.py > "$OUT/tests.log" 2>&1
grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests.log" | tail -15
echo "tests done at $(( $(date +%s) - t0 )) s"
timeout -s INT ${T_BENCH:-240} python3 bench/moe.py --mix ${MIXES:-int4,mixed} --tokens ${TOKENS:-1,4,16,64} --cuda-int4 \
  --out "$OUT/moe.json" 2>&1 | tee "$OUT/moe.log" | grep -v '^{'
echo "bench done at $(( $(date +%s) - t0 )) s"
exit 0
