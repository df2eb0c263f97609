"""The CPU KV cache is sized to the work: the flag's budget, the requests' need, or the
tokens `mixq generate` is given; never the old fixed 4 GiB."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import transformers

from mixq.cli import main as cli_main
from mixq.engine.engine import LLM
from mixq.errors import ConfigError
from mixq.server.args import ServerArgs

FIX = Path(__file__).parents[1] / "fixtures" / "tiny-llama" / "bf16"


def _bytes_per_token(dtype: torch.dtype) -> int:
    """K and V of every layer for one token, from the checkpoint's config.json."""
    c = json.loads((FIX / "config.json").read_text())
    return 2 * c["num_hidden_layers"] * c["num_key_value_heads"] * c["head_dim"] * dtype.itemsize


def _cache_bytes(llm: LLM) -> int:
    r = llm.engine.runner
    return sum(m.k_cache.numel() * m.k_cache.element_size() + m.v_cache.numel() * m.v_cache.element_size()
               for m in r.attn_layers)


@pytest.mark.parametrize("space_gb, running, max_len, want_tokens", [
    (1.0, 4, 256, 4 * 256),  # the requests need less than the budget: what they need
    (2048 * 1024 / 2**30, 64, 512, 2048),  # the budget binds: 2048 tokens of 1 KiB each
])
def test_cpu_cache_is_the_smaller_of_budget_and_need(space_gb, running, max_len, want_tokens):
    per_tok = _bytes_per_token(torch.float32)
    assert per_tok == 1024  # the parametrization above assumes it
    llm = LLM(model_path=str(FIX), device="cpu", dtype="float32", page_size=8, cpu_kv_cache_space=space_gb,
              max_running_requests=running, max_model_len=max_len)
    assert llm.engine.kv_cache_tokens == want_tokens
    assert llm.engine.kv_cache_bytes == want_tokens * per_tok
    # what is allocated: the scheduler's blocks plus the runner's one scratch block
    assert _cache_bytes(llm) == (want_tokens + 8) * per_tok


def test_cpu_budget_below_one_sequence_is_refused_naming_the_flag():
    with pytest.raises(ConfigError, match="--cpu-kv-cache-space .* less than one 512-token sequence"):
        LLM(model_path=str(FIX), device="cpu", dtype="float32", cpu_kv_cache_space=100 * 1024 / 2**30,
            max_model_len=512)


def test_max_total_tokens_overrides_the_budget():
    llm = LLM(model_path=str(FIX), device="cpu", dtype="float32", page_size=8, max_total_tokens=100,
              cpu_kv_cache_space=1e-6)
    assert llm.engine.kv_cache_tokens == 104  # 13 pages of 8


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_serve_flag_refuses_non_positive_budgets(value):
    with pytest.raises(ConfigError, match="--cpu-kv-cache-space must be > 0"):
        ServerArgs(cpu_kv_cache_space=float(value)).validate()


def test_serve_flag_reaches_the_engine_config():
    from mixq.server.launch import engine_config

    assert engine_config(ServerArgs(model_path=str(FIX), cpu_kv_cache_space=0.25)).cpu_kv_cache_space == 0.25


def test_generate_sizes_the_cache_to_its_prompts_and_prints_it_with_peak_rss(capfd):
    import resource

    prompts = ["the cat sat on the mat and then", "a"]
    argv = ["generate", "--model-path", str(FIX), "--max-new-tokens", "9", "--device", "cpu", "--dtype", "float32"]
    for p in prompts:
        argv += ["--prompt", p]
    assert cli_main(argv) == 0
    out = capfd.readouterr().out
    tok = transformers.AutoTokenizer.from_pretrained(FIX)
    pages = sum(-(-(len(tok.encode(p)) + 9) // 16) for p in prompts)  # the engine's default page size
    m = re.search(r"^KV cache (\d+) tokens \(([\d.]+) MiB\); peak RSS (\d+) MiB$", out, re.M)
    assert m, out
    assert int(m.group(1)) == pages * 16
    assert float(m.group(2)) == pytest.approx(pages * 16 * _bytes_per_token(torch.float32) / 2**20, abs=0.05)
    # this process's peak so far bounds the printed one from above (Linux: KiB)
    assert 0 < int(m.group(3)) <= resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 + 1
