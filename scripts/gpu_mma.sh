#!/usr/bin/env bash
# Device call for the compiled W4A16 kernels (issue 18 points 1 and 5): the CUDA build in the
# background while the 1B end-to-end rows run (host share at batch 64; they use the default
# Triton INT4 path), then the kernel tests on CUDA, ncu of the few-row GEMV on gate_up, the
# table against cuBLAS / tinygemm / gemlite and the launch sweep at decode row counts.
# Wheels of scripts/gpu_wheels.txt in .whl/; logs to $OUT. Env: T_E2E, T_TEST, T_NCU,
# T_BENCH (timeouts), BENCH_ARGS, TESTS, SKIP_E2E, SKIP_NCU, E2E_FLAGS (extra bench/engine.py
# flags, e.g. "--load-format dummy" to write no checkpoints).
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
source "$(dirname "$0")/gpu_env.sh"
export PYTHONPATH=$PYTHONPATH:$PWD/bench
export MIXQ_CUDA_CACHE=${MIXQ_CUDA_CACHE:-$PWD/.gpu-cuda-cache}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/build/triton-cache}
t0=$(date +%s)
python3 -c "from mixq.kernels import w4a16_mma; import torch; print('cuda lib:', w4a16_mma.build(torch.cuda.get_device_capability()))" > "$OUT/build.log" 2>&1 &
build=$!
if [ -z "${SKIP_E2E:-}" ]; then
  timeout -s INT ${T_E2E:-120} python3 bench/engine.py --shape llama-1b --engines bf16-no-overlap,bf16,int4 \
    --batches 1,16,64 --new-tokens 64 --repeats 2 --workdir /tmp/mixq-e2e ${E2E_FLAGS:-} --out "$OUT/engine.json" > "$OUT/engine.txt" 2>&1
  grep -v '^{' "$OUT/engine.txt" | grep -v "Writing model\|Loading weights" | tail -14
  python3 bench/detok_split.py --batches 1,16,64 > "$OUT/detok.txt" 2>&1; tail -8 "$OUT/detok.txt"
  echo "e2e done at $(( $(date +%s) - t0 )) s"
fi
wait $build; tail -2 "$OUT/build.log"
echo "build done at $(( $(date +%s) - t0 )) s"
timeout -s INT ${T_TEST:-150} python3 -m pytest -q -p no:cacheprovider -rfE ${TESTS:-tests/kernels/test_w4a16_mma.py} > "$OUT/tests.log" 2>&1
grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests.log" | tail -12
echo "tests done at $(( $(date +%s) - t0 )) s"
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
if [ -n "$NCU" ] && [ -z "${SKIP_NCU:-}" ]; then
  timeout -s INT ${T_NCU:-60} "$NCU" --clock-control none -k regex:w4a16_ --launch-skip 1 --launch-count 1 \
    --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section Occupancy --section LaunchStats \
    python3 scripts/ncu_w4a16.py 4096x28672 1 > "$OUT/ncu_m1.txt" 2>&1
  grep -E "w4a16_|Duration|DRAM Throughput|Issue Slots Busy|Eligible Warps|Active Warps Per|No Eligible|Warp Cycles Per Issued|Registers Per|Achieved Occupancy|Block Limit (Reg|Shared)" "$OUT/ncu_m1.txt" | head -20
fi
echo "ncu done at $(( $(date +%s) - t0 )) s"
timeout -s INT ${T_BENCH:-240} python3 bench/w4a16.py --out "$OUT/w4a16.json" ${BENCH_ARGS:---ms 1,16,64 --sweep --sweep-ms 1,16 --budget-s 100 --sweep-s 120} 2>&1 \
  | tee "$OUT/bench.log" | grep -v '^{'
echo "bench done at $(( $(date +%s) - t0 )) s"
if [ -z "${SKIP_E2E:-}" ]; then  # the 1B INT4 engine on the compiled kernels (cuda-w4a16)
  MIXQ_W4A16_MMA=1 timeout -s INT ${T_E2E2:-90} python3 bench/engine.py --shape llama-1b --engines int4 \
    --batches 1,16,64 --new-tokens 64 --repeats 2 --workdir /tmp/mixq-e2e ${E2E_FLAGS:-} --out "$OUT/engine_mma.json" > "$OUT/engine_mma.txt" 2>&1
  grep -v '^{' "$OUT/engine_mma.txt" | grep -v "Writing model\|Loading weights" | tail -6
  echo "e2e mma done at $(( $(date +%s) - t0 )) s"
fi
exit 0
