"""Tensor and expert parallelism end to end on the CPU (gloo): this test process is rank 0
of the group and spawns the other ranks. Every layout must give the single-process
engine's greedy tokens and logits within float tolerance, each rank having read only its
part of the weights (mixed formats from the real fixtures, GPTQ act-order row-parallel
included).

Tolerance: fp32 on the CPU; a TP rank sums its K slice and the all-reduce adds the
partial sums in another order than one process's GEMM, which changes rounding by a few
ulps (~1e-7 relative per sum here, measured 3e-7..7e-7 of the largest logit over two
layers). 1e-5 of the largest logit leaves a 10x margin and is far below any real bug
(a wrong shard or a lost all-reduce moves logits by O(1)).

Formats that quantize their inputs (W8A8, FP8 dynamic) sit only where every rank sees the
whole input (column-parallel): a row-parallel one quantizes each rank's K slice with its
own per-token scale (as vLLM does), a different rounding than one process's.
"""

from __future__ import annotations

import multiprocessing
import random
from pathlib import Path

import pytest
import torch

from mixq.engine.engine import LLM
from mixq.engine.sampling_params import SamplingParams
from tests.devices import DEVICE

HERE = Path(__file__).parent
# MIXQ_TEST_DEVICE=cuda runs the same checks over NCCL, one GPU per rank
KW = dict(device=DEVICE, dtype="float32", max_total_tokens=512, page_size=8, chunked_prefill_size=32,
          dist_timeout_s=120)  # a stuck collective fails the test instead of hanging it
GREEDY = SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True)
LOGPROBS = SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True, logprobs=0)


def prompts(seed: int, n: int = 5) -> list[list[int]]:
    """Random token ids: the tiny random models give varied continuations for them
    (plain words make them repeat one token pair)."""
    rng = random.Random(seed)
    return [[rng.randrange(3, 256) for _ in range(rng.randint(2, 40))] for _ in range(n)]


class Reference:
    """The single-process engine's greedy tokens and full-sequence logits."""

    def __init__(self, cfg: str, seed: int):
        self.prompts = prompts(seed)
        with LLM(mixed_precision_config=str(HERE / cfg), **KW) as llm:
            self.tokens = [o.outputs[0].token_ids for o in llm.generate(self.prompts, GREEDY)]
            self.logits = [llm.engine.runner.score(p, list(range(8))) for p in self.prompts[:2]]
            self.total_bytes = sum(t.nbytes for t in llm.engine.plan.tensors.values())


@pytest.fixture(scope="module")
def ref_llama():
    return Reference("mix-llama.yaml", 1)


@pytest.fixture(scope="module")
def ref_moe_ep():
    return Reference("mix-qwen3-moe-ep.yaml", 2)


@pytest.fixture(scope="module")
def ref_moe_tp():
    return Reference("mix-qwen3-moe-tp.yaml", 3)


@pytest.fixture(scope="module")
def ref_mixtral():
    return Reference("mix-mixtral.yaml", 4)


def check_parallel(ref: Reference, cfg: str, tol: float = 1e-5, **parallel) -> list[dict]:
    """Run the layout, compare with the reference, return the per-rank load stats."""
    if DEVICE == "cuda" and torch.cuda.device_count() < parallel["tp_size"]:
        pytest.skip(f"needs {parallel['tp_size']} GPUs")  # never on the CPU: gloo ranks need none
    with LLM(mixed_precision_config=str(HERE / cfg), **KW, **parallel) as llm:
        first = llm.generate(ref.prompts, LOGPROBS)
        assert [o.outputs[0].token_ids for o in first] == ref.tokens
        # again: the prompts' whole pages come from the prefix cache, on every rank alike
        again = llm.generate(ref.prompts, LOGPROBS)
        assert llm.engine.scheduler.cached_tokens >= sum((len(p) - 1) // 8 * 8 for p in ref.prompts)
        for a, b in zip(first, again):
            assert a.outputs[0].token_ids == b.outputs[0].token_ids
            assert max(abs(x - y) for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs)) < 1e-4
        for p, want in zip(ref.prompts, ref.logits):
            logits = llm.engine.runner.score(p, list(range(8)))
            err = (logits - want).abs().max() / want.abs().max()
            assert err < tol, f"max logit difference {err:.2e} of the largest logit"
        stats = llm.engine.dist.rank_stats
        predicted = llm.engine.dist.layout.rank_bytes(llm.engine.plan)
    assert multiprocessing.active_children() == []  # every rank process reaped
    # what each rank read is what the headers predicted (mixq inspect --tp-size)
    assert [s["bytes"] for s in stats] == [p["bytes"] for p in predicted]
    assert [s["by_format"] for s in stats] == [p["by_format"] for p in predicted]
    return stats


@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_mixed_formats(ref_llama, tp):
    stats = check_parallel(ref_llama, "mix-llama.yaml", tp_size=tp)
    share = ref_llama.total_bytes / tp
    for s in stats:
        # ~1/tp each: norms are replicated, TP=4 replicates the 2 KV heads and keeps the
        # act-order scale tables whole (measured 1.02x at TP=2, 1.13x at TP=4)
        assert share <= s["bytes"] <= 1.15 * share, (s, share)
    assert {f for s in stats for f in s["by_format"]} == {"bf16", "fp8", "int4", "int8"}


@pytest.mark.parametrize("tp,ep,dispatch", [(2, 2, "all-reduce"), (2, 2, "all-to-all")])
def test_expert_parallel_each_expert_in_its_own_format(ref_moe_ep, tp, ep, dispatch):
    stats = check_parallel(ref_moe_ep, "mix-qwen3-moe-ep.yaml", tp_size=tp, ep_size=ep, moe_dispatch=dispatch)
    assert [s["experts"] for s in stats] == [[0, 1], [2, 3]]
    # rank 0 holds the GPTQ and AWQ experts (int4 only), rank 1 the FP8/INT8 and CT-INT4 ones;
    # attention (FP8 q/k/v, INT8 o_proj) is on both
    assert set(stats[0]["by_format"]) == {"bf16", "fp8", "int4", "int8"}
    assert set(stats[1]["by_format"]) == {"bf16", "fp8", "int4", "int8"}
    assert stats[0]["by_format"]["int8"] < stats[1]["by_format"]["int8"]  # rank 1 adds expert 2's down_proj
    # nothing is read twice but the norms and routers: the ranks' parts add up to ~the model
    assert sum(s["bytes"] for s in stats) <= 1.05 * ref_moe_ep.total_bytes
    assert all(s["bytes"] < 0.6 * ref_moe_ep.total_bytes for s in stats)


def test_tp4_with_ep2_shards_experts_over_their_group(ref_moe_tp):
    # FP8 inputs after a row-parallel sum: a ~1e-7 difference upstream can move a code across
    # an e4m3 rounding boundary (one step = 1/8 of that element), measured 2.4e-5 of the
    # largest logit; a sharding bug moves logits by O(1)
    stats = check_parallel(ref_moe_tp, "mix-qwen3-moe-tp.yaml", tol=2e-4, tp_size=4, ep_size=2)
    assert [s["experts"] for s in stats] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert stats[0]["bytes"] == stats[1]["bytes"] and stats[2]["bytes"] == stats[3]["bytes"]
    assert sum(s["bytes"] for s in stats) <= 1.1 * ref_moe_tp.total_bytes


def test_mixtral_all_to_all(ref_mixtral):
    stats = check_parallel(ref_mixtral, "mix-mixtral.yaml", tp_size=2, ep_size=2, moe_dispatch="all-to-all")
    assert [s["experts"] for s in stats] == [[0, 1], [2, 3]]


def test_logits_compare_like_for_like(ref_llama):
    """The tolerance above is not vacuous: a rank computing with a wrong shard (here: the
    reference with one o_proj input slice dropped, as a lost all-reduce would) is far off."""
    ref = ref_llama
    with LLM(mixed_precision_config=str(HERE / "mix-llama.yaml"), **KW) as llm:
        o = llm.engine.model.model.layers[1].self_attn.o_proj
        forward = o.forward
        o.forward = lambda x: forward(torch.cat([x[:, :64], torch.zeros_like(x[:, 64:])], 1))
        logits = llm.engine.runner.score(ref.prompts[0], list(range(8)))
    err = (logits - ref.logits[0]).abs().max() / ref.logits[0].abs().max()
    assert err > 1e-2
