"""Where the model/engine tests run: CPU here and in CI; `MIXQ_TEST_DEVICE=cuda` on the
GPU machine runs the same tests there (references stay on the CPU)."""

import os

DEVICE = os.environ.get("MIXQ_TEST_DEVICE", "cpu")
