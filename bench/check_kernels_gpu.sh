#!/usr/bin/env bash
# One GPU call: the kernel tests on CUDA, then the kernel benchmark (under 8 minutes on an
# H100: tests <= 4.5 min, most of it Triton compiling each kernel variant; benchmark <= 3.5 min,
# printing each shape's tables as it completes, so a timeout still leaves the shapes done).
#   bash bench/check_kernels_gpu.sh [OUTDIR]    (default: $OUT if set, else /tmp/mixq-kernels)
# Writes OUTDIR/pytest_kernels.txt, OUTDIR/kernels.md (the tables) and OUTDIR/kernels.json.
# Config search for the 8-bit kernels is a separate call: python bench/kernels.py --sweep w8
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-/tmp/mixq-kernels}}
mkdir -p "$out"
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1
# compiled kernels in an ignored folder of the tree: the device keeps it between calls, and
# the benchmark reuses what the tests compiled (Triton keys its cache by source and options)
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/build/triton-cache}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

start=$SECONDS
# the *_gpu_paths tests (every forced launch config: ~90 more compiles) have their own call,
# scripts/gpu_paths.sh, to keep this one under the 10-minute limit
timeout 270 python -m pytest -q -p no:cacheprovider --durations=15 tests/kernels --ignore-glob='*_gpu_paths.py' 2>&1 \
  | tee "$out/pytest_kernels.txt"
test_rc=${PIPESTATUS[0]}
echo "tests: rc=$test_rc in $((SECONDS - start)) s"

start=$SECONDS
timeout 210 python bench/kernels.py --out "$out/kernels.json" 2>&1 | tee "$out/kernels.md"
bench_rc=${PIPESTATUS[0]}
echo "benchmark: rc=$bench_rc in $((SECONDS - start)) s"
exit $(( test_rc != 0 || bench_rc != 0 ))
