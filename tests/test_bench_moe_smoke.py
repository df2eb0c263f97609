"""bench/moe.py --smoke: the fused MoE benchmark runs on the CPU (Triton interpreter) on a
tiny "mixed" layer (8 experts: 6 GPTQ-INT4, 2 FP8 W8A8; the 10% BF16 share rounds to none)
and checks the fused output against its float64 reference over the dequantized experts. A W8A8 expert runs weight-only in the fused
kernels, so the reference must not quantize activations: quantizing them per token to e4m3
(3 mantissa bits) moved this layer's output by ~4% where bf16 rounding alone stays < 1%."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_moe_bench_smoke(tmp_path):
    out = tmp_path / "moe.json"
    r = subprocess.run([sys.executable, "bench/moe.py", "--smoke", "--mix", "mixed", "--out", str(out)], cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["mixes"]["mixed"]["experts_per_format"] == {"gptq4": 6, "fp8": 2, "bf16": 0}
    rows = {x["tokens"]: x for x in doc["rows"]}
    assert set(rows) == {1, 3}
    for row in rows.values():
        # bf16 activations, intermediate and output (2**-9 relative each) against float64;
        # an error of exactly 0 would mean the reference is the fused path itself
        assert 1e-4 < row["error"] < 1e-2, row["error"]
