#!/usr/bin/env bash
# One device call on a multi-GPU machine (2 or 4 GPUs): the tensor/expert-parallel engine
# tests over NCCL, then bench/parallel.py (TP=1/2/4 and TP=4 x EP=4 on a Qwen3-30B-A3B-
# shaped random mix: greedy/logits vs one GPU, decode tok/s, per-GPU memory).
# Run from the repo root with the wheels of scripts/gpu_wheels.txt in .whl/.
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
MIXQ_TEST_DEVICE=cuda python3 -m pytest -q -p no:cacheprovider tests/distributed/test_parallel_engine.py \
  2>&1 | tee "$OUT/parallel_tests.log" | tail -15
PYTHONUNBUFFERED=1 python3 bench/parallel.py ${BENCH_ARGS:-} --out "$OUT/parallel.json" 2>&1 | tee "$OUT/parallel.log"
