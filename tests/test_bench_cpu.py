"""bench/cpu.py --smoke runs end to end on the fixture model (one process per config) and
writes what the RESULTS table is made of."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_cpu_bench_smoke(tmp_path):
    out = tmp_path / "cpu.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "cpu.py"), "--smoke", "--threads", "1", "--only",
                        "hf-fp32,mixq-gptq-int4,mixq-fp8,llama.cpp", "--out", str(out)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    doc = json.loads(out.read_text())
    res = doc["results"]
    assert doc["meta"]["threads"] == 1 and doc["meta"]["new_tokens"] == 4
    assert set(res) == {"hf-fp32", "mixq-gptq-int4", "mixq-fp8", "llama.cpp"}
    assert "no GGUF" in res["llama.cpp"]["skipped"]
    for name in ("hf-fp32", "mixq-gptq-int4", "mixq-fp8"):
        assert all(v > 0 for v in res[name]["decode_tok_s"] + res[name]["prefill_tok_s"]), name
        assert res[name]["peak_rss"][0] > res[name]["weight_bytes"] > 0, name
    # the quantized configs ran the CPU kernels, not the reference
    assert "cpu-int4pack" in res["mixq-gptq-int4"]["methods"] and "torch-dequant" not in res["mixq-gptq-int4"]["methods"]
    assert "cpu-fp8" in res["mixq-fp8"]["methods"]
    assert "| mixq-fp8 |" in r.stdout
