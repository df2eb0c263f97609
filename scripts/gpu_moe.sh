#!/usr/bin/env bash
# Device calls for the fused MoE (needs the wheels of scripts/gpu_wheels.txt in .whl/, as
# scripts/gpu_check.sh does). Each mode fits one call; timeouts keep partial output.
#   bash scripts/gpu_moe.sh tests   its tests on CUDA (mostly Triton compiles, ~5 min)
#   bash scripts/gpu_moe.sh bench   bench/moe.py, Qwen3-30B-A3B shapes (< 5 min)
#   bash scripts/gpu_moe.sh sweep   tune fused_moe.CONFIG_OVERRIDE at 1/4/16/64 tokens (< 10 min)
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
case "${1:-bench}" in
  tests)
    MIXQ_TEST_DEVICE=cuda timeout 560 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_fused_moe.py \
      tests/kernels/test_fused_moe_models.py 2>&1 | tee "$OUT/moe_tests.log" | tail -20 ;;
  bench)
    PYTHONUNBUFFERED=1 timeout 290 python3 bench/moe.py --breakdown --out "$OUT/moe.json" ${BENCH_ARGS:-} 2>&1 \
      | tee "$OUT/moe.log" ;;
  sweep)
    PYTHONUNBUFFERED=1 timeout 560 python3 bench/moe.py --mix mixed --tokens 1,4,16,64 --sweep \
      --out "$OUT/moe_sweep.json" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/moe_sweep.log" ;;
  *) echo "usage: $0 tests|bench|sweep" >&2; exit 2 ;;
esac
