# Sourced by the device-call scripts (scripts/gpu_*.sh), from the repo root on the GPU
# machine: install the carried wheels of scripts/gpu_wheels.txt (in .whl/) into /tmp/site,
# put them and the repo on PYTHONPATH, print the GPUs, and make $OUT (the folder whose
# files come back).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
