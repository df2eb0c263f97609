"""bench/quality.py --smoke: the whole frontier pipeline on the tiny Llama (a few tokens);
what it writes is checked, not only its exit code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quality_bench_smoke(tmp_path):
    out = tmp_path / "bq"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "quality.py"), "--smoke", "--out-dir", str(out)],
                       capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    doc = json.loads((out / "results.json").read_text())
    rows = doc["rows"]
    planned = [x for x in rows.values() if x["name"].startswith("planned")]
    assert len(planned) >= 5 and {"bf16", "fp8", "int8", "gptq-int4", "awq-int4", "llama.cpp-style rule"} <= set(rows)
    for x in planned:  # verified: the written contender is the one of least calibration KLD
        assert x["weight_bytes"] <= x["budget_bytes"]
        v = x["verification"]["contenders"]
        assert x["written"] == min(v, key=lambda c: v[c]["kld_mean"]) and x["weight_bytes"] == v[x["written"]]["bytes"]
    assert rows["bf16"]["kld_mean"] == 0 and rows["gptq-int4"]["kld_mean"] > 0
    # the most generous plan (the FP8 size) has no more KLD than the cheapest
    by_size = sorted(planned, key=lambda x: x["weight_bytes"])
    assert by_size[-1]["kld_mean"] <= by_size[0]["kld_mean"]
    md = (out / "results.md").read_text()
    assert "| config | weights MiB |" in md and "Rank correlation (Spearman)" in md
    assert (out / "frontier.png").read_bytes()[:4] == b"\x89PNG"
