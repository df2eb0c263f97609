"""KV-cache bytes: what `mixq inspect` predicts from config.json, and what the engine
reports in /memory_stats against the cache tensors it actually allocated."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mixq.engine.engine import LLM

FIX = Path(__file__).parent / "fixtures" / "tiny-llama" / "bf16"
CFG = json.loads((FIX / "config.json").read_text())


def per_token(value_bytes: int, kv_heads: int | None = None) -> int:
    """From config.json: layers x (K, V) x KV heads x head dim x bytes."""
    return (CFG["num_hidden_layers"] * 2 * (kv_heads or CFG["num_key_value_heads"]) * CFG["head_dim"]
            * value_bytes)


def test_inspect_reports_kv_bytes_per_token_per_dtype_and_rank():
    def report(*extra):
        out = subprocess.run([sys.executable, "-m", "mixq", "inspect", "--model-path", str(FIX), "--json", *extra],
                             capture_output=True, text=True, check=True).stdout
        return json.loads(out)["kv_cache"]

    one, two = report(), report("--tp-size", "2")
    assert one["bytes_per_token"] == {"float32": per_token(4), "bfloat16": per_token(2), "float16": per_token(2),
                                      "fp8_e4m3": per_token(1), "fp8_e5m2": per_token(1)}
    assert one["fp8_saved_per_token"] == per_token(1)
    # tp 2 over 2 KV heads: one head per rank
    assert two["tp_size"] == 2 and two["bytes_per_token"]["fp8_e4m3"] == per_token(1, kv_heads=1)


@pytest.mark.parametrize("kv", ["bfloat16", "fp8_e4m3"])
def test_engine_kv_stats_are_the_allocated_cache(kv):
    eng = LLM(model_path=str(FIX), kv_cache_dtype=kv, device="cpu", max_total_tokens=640, page_size=16).engine
    stats = eng.kv_cache_stats()
    # every layer's K and V tensors, less the runner's one scratch block (graph padding)
    held = sum(m.k_cache.nbytes + m.v_cache.nbytes for m in eng.runner.attn_layers)
    scratch = held // (eng.runner.num_blocks + 1)
    assert stats["capacity_tokens"] == 640 and stats["bytes_per_token"] * 640 == held - scratch
    assert stats["dtype"] == kv and stats["bf16_bytes_per_token"] == per_token(2)
    assert stats["memory_saved_mb"] == pytest.approx((per_token(2) - per_token(1 if kv != "bfloat16" else 2))
                                                     * 640 / 2**20)
