"""bench/cpu_ops.py runs (a few repetitions) and each new op agrees with its float64
reference as its format allows: the attention and the norm round to bf16 (2**-9 relative
per element), the q8_0 head returns fp32 sums of exact products, rotary and the gather are
compared with the torch code they replace (bit-identical)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_cpu_ops_bench(tmp_path):
    out = tmp_path / "ops.json"
    r = subprocess.run([sys.executable, "bench/cpu_ops.py", "--reps", "3", "--out", str(out)], cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {x["op"]: x for x in json.loads(out.read_text())["rows"]}
    assert len(rows) == 8
    for op, row in rows.items():
        tol = 1e-6 if "head" in op else 0.0 if "rotary" in op or "gather" in op else 5e-3
        assert row["after_err"] <= tol, (op, row["after_err"])
        assert row["before_us"] > 0 and row["after_us"] > 0
