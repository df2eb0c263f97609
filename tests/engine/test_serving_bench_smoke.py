"""The serving benchmarks' --smoke modes (tiny model, seconds): the scripts run end to end
and their figures say what the features promise."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]


def run(script: str, out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, f"bench/{script}", "--smoke", "--out", str(out)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(out.read_text())


def test_prefix_cache_smoke(tmp_path):
    r = run("prefix_cache.py", tmp_path / "pc.json")
    on, off = r["engines"]["cache on"], r["engines"]["cache off"]
    # 3 requests over a 100-token system prompt: uncached, every prompt token is computed
    assert off["cold"]["computed_tokens"] == off["cold"]["prompt_tokens"] and off["warm"]["cached_tokens"] == 0
    # warm: each request finds at least the system prompt's whole 16-token pages (96 tokens)
    assert on["warm"]["cached_tokens"] >= 3 * 96
    assert on["warm"]["computed_tokens"] == on["warm"]["prompt_tokens"] - on["warm"]["cached_tokens"]
    assert r["cold_greedy_differ"] == r["warm_greedy_differ"] == 0


def test_kv_capacity_and_quality_smoke(tmp_path):
    cap = run("kv_capacity.py", tmp_path / "cap.json")["kv"]
    # tiny model: 2 layers x (K, V) x 2 KV heads x 32 dims
    assert cap["bfloat16"]["bytes_per_token"] == 512 and cap["fp8_e4m3"]["bytes_per_token"] == 256
    assert cap["fp8_e4m3"]["requests_at_context"] == 2 * cap["bfloat16"]["requests_at_context"] > 0
    assert all(c["admitted_together"] == c["requests_at_context"] for c in cap.values())
    q = run("kv_quality.py", tmp_path / "q.json")["kv"]
    assert q["bfloat16"]["kld"] == 0 and q["bfloat16"]["top1_agree"] == 1
    # fp8 costs more than fp32 gains back, and e5m2 (2 mantissa bits) more than e4m3 (3)
    assert 0 < q["float32"]["kld"] < q["fp8_e4m3"]["kld"] < q["fp8_e5m2"]["kld"]
