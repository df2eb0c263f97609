"""A GGUF served alone (config and tokenizer from its metadata) under tensor parallelism on
the CPU (gloo): each rank reads its shard of the stored blocks (q/k rows in whole heads,
K in whole blocks) and the logits equal the single-process engine's (tolerance as in
test_parallel_engine.py: the all-reduce reorders fp32 sums, ~1e-7 of the largest logit)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from mixq.engine.engine import LLM
from tests.distributed.test_parallel_engine import GREEDY, KW, prompts
from tests.gguf_utils import write_gguf

FIX = Path(__file__).parents[1] / "fixtures" / "tiny-llama" / "bf16"
TYPES = {"q_proj": "q8_0", "k_proj": "q4_1", "v_proj": "q5_0", "o_proj": "q5_1", "gate_proj": "q4_0",
         "up_proj": "q8_0", "down_proj": "f16", "embed_tokens": "q8_0", "lm_head": "q4_1"}


@pytest.mark.skipif(KW["device"] != "cpu", reason="the GGUF kernels' CUDA runs are covered by the kernel tests")
def test_gguf_tensor_parallel_matches_one_process(tmp_path):
    cfg = json.loads((FIX / "config.json").read_text())
    path = write_gguf(tmp_path / "tiny.gguf", cfg, load_file(str(FIX / "model.safetensors")),
                      types=lambda n, nd: "f32" if nd == 1 else TYPES[n.rsplit(".", 2)[-2]])
    ps = prompts(7, n=3)
    with LLM(model_path=str(path), **KW) as one:
        want_tokens = [o.outputs[0].token_ids for o in one.generate(ps, GREEDY)]
        want = [one.engine.runner.score(p, list(range(8))) for p in ps[:2]]
    with LLM(model_path=str(path), tp_size=2, **KW) as llm:
        assert [o.outputs[0].token_ids for o in llm.generate(ps, GREEDY)] == want_tokens
        for p, w in zip(ps[:2], want):
            err = (llm.engine.runner.score(p, list(range(8))) - w).abs().max() / w.abs().max()
            assert err < 1e-5, err
        stats = llm.engine.dist.rank_stats
        predicted = llm.engine.dist.layout.rank_bytes(llm.engine.plan)
    assert [s["bytes"] for s in stats] == [p["bytes"] for p in predicted]
    assert {f for s in stats for f in s["by_format"]} >= {"q8_0", "q4_1", "q5_0", "q5_1", "q4_0"}
