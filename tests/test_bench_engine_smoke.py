"""bench/engine.py --smoke: both families (tiny Llama, tiny Qwen3-MoE) through every engine
the GPU run measures, on the CPU. Checks what the figures rest on, against values computed
here from the shapes: the weight bytes a decode step reads (the roofline's denominator),
and that the overlap schedule decodes exactly what the engine without it does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_engine_bench_smoke(tmp_path):
    out = tmp_path / "engine.json"
    r = subprocess.run([sys.executable, "bench/engine.py", "--smoke", "--out", str(out)], cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    shapes = json.loads(out.read_text())["shapes"]
    engines = {"tiny-llama": {"hf", "bf16-eager", "bf16-no-overlap", "bf16", "fp8", "int4", "mix"},
               "tiny-moe": {"hf", "bf16-no-overlap", "bf16", "int4-experts", "mix-hot-fp8"}}
    for name, res in shapes.items():
        rows = {(x["engine"], x["batch"]): x for x in res["rows"]}
        assert set(rows) == {(e, b) for e in engines[name] for b in (1, 3)}
        for b in (1, 3):
            assert rows["bf16", b]["identical_to_no_overlap"] is True
        assert rows["bf16", 1]["step_bytes"] == rows["bf16-no-overlap", 1]["step_bytes"]
    # tiny-llama: hidden 64, 4 heads / 2 KV heads of 16, MLP 128, 2 layers, 512-word tied embedding; BF16
    layer = 64 * 64 * 2 + 32 * 64 * 2 + 3 * 128 * 64 + 2 * 64
    llama = {(x["engine"], x["batch"]): x["step_bytes"] for x in shapes["tiny-llama"]["rows"]}
    assert llama["bf16", 1] == llama["hf", 1] == 2 * (2 * layer + 512 * 64 + 64)
    assert llama["int4", 1] < llama["fp8", 1] < llama["bf16", 1]
    # tiny-moe: the same attention with q/k norms, a router of 8 experts (MLP 32, top-2), the
    # untied embedding not read, the LM head read; experts touched by B tokens: 1 - (3/4)^B
    dense = 2 * (64 * 64 * 2 + 32 * 64 * 2 + 2 * 16 + 8 * 64 + 2 * 64) + 512 * 64 + 64
    experts = 2 * 8 * 3 * 32 * 64
    moe = {(x["engine"], x["batch"]): x["step_bytes"] for x in shapes["tiny-moe"]["rows"]}
    for b in (1, 3):
        assert moe["bf16", b] == 2 * (dense + experts * (1 - 0.75**b))
        assert moe["int4-experts", b] < moe["mix-hot-fp8", b] < moe["bf16", b]
    assert shapes["tiny-moe"]["hot_experts_per_layer"] == 2


def test_engine_bench_smoke_with_dummy_weights(tmp_path):
    """--load-format dummy: no checkpoint is written (config.json and the tokenizer only), every
    engine runs on random weights in its formats, and the bytes a step reads are the same
    formula's as with real checkpoints."""
    out = tmp_path / "engine.json"
    work = tmp_path / "work"
    r = subprocess.run([sys.executable, "bench/engine.py", "--smoke", "--load-format", "dummy", "--workdir", str(work),
                        "--out", str(out)], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not list(work.rglob("*.safetensors"))
    shapes = json.loads(out.read_text())["shapes"]
    layer = 64 * 64 * 2 + 32 * 64 * 2 + 3 * 128 * 64 + 2 * 64
    llama = {(x["engine"], x["batch"]): x for x in shapes["tiny-llama"]["rows"]}
    for b in (1, 3):
        assert llama["bf16", b]["step_bytes"] == llama["hf", b]["step_bytes"] == 2 * (2 * layer + 512 * 64 + 64)
        assert llama["int4", b]["step_bytes"] < llama["fp8", b]["step_bytes"] < llama["bf16", b]["step_bytes"]
        assert llama["bf16", b]["identical_to_no_overlap"] is True
        assert "greedy_match_hf" not in llama["bf16", b]  # HF runs on other random weights
    moe = {(x["engine"], x["batch"]): x["step_bytes"] for x in shapes["tiny-moe"]["rows"]}
    for b in (1, 3):
        assert moe["int4-experts", b] < moe["mix-hot-fp8", b] < moe["bf16", b]
