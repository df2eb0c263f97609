"""bench/host_step.py --smoke: the host-time bench (the model replaced by a free stub) runs
this tree and a baseline revision (HEAD) in one run and reports a time per decode step for
each batch; the stubbed engine still decodes (its greedy chain is checked here against the
stub's table, computed another way)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT))


def test_host_step_bench_smoke(tmp_path):
    out = tmp_path / "host.json"
    r = subprocess.run([sys.executable, "bench/host_step.py", "--smoke", "--baseline", "HEAD", "--out", str(out)],
                       cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())["us_per_step"]
    assert len(res) == 2 and all(set(row) == {"1", "3"} and all(v > 0 for v in row.values()) for row in res.values())


def test_the_free_model_decodes_its_table_chain():
    from bench.host_step import free_model_engine
    from mixq.engine.sampling_params import SamplingParams

    llm = free_model_engine(True, 4)
    table = llm.engine.runner.model.compute_logits  # logits of token t: row t of the stub's table
    prompt = [7, 11, 13]
    got = llm.generate([prompt], SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True))[0]
    want, t = [], prompt[-1]
    for _ in range(6):
        t = int(torch.argmax(table(torch.tensor([t]))[0]))
        want.append(t)
    assert got.outputs[0].token_ids == want


def test_detok_split_bench_smoke():
    """bench/detok_split.py --smoke: inline, thread and process costs per step for each batch."""
    r = subprocess.run([sys.executable, "bench/detok_split.py", "--smoke"], cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in r.stdout.splitlines() if line.startswith("| ") and "batch" not in line]
    assert [row[0].strip() for row in rows] == ["1", "3"] and all(float(row[1]) > 0 for row in rows)
