"""Decode steps replayed from CUDA graphs (mixq.engine.cuda_graph) against eager steps.

On CUDA the graphs are really captured and replayed. On the CPU the same static-buffer path
runs eagerly (capture=False): inputs copied into the buffers, padded to the bucket with
inert rows, logits cut back; the triton attention kernel runs in the interpreter. Either
way the engine must give the same tokens and logprobs as without graphs, padding rows
must not touch any sequence's KV cache, and expert tracking must not count them."""

from __future__ import annotations

import os

import pytest

from mixq.engine.cuda_graph import graph_batch_sizes
from mixq.engine.engine import LLM
from mixq.engine.sampling_params import SamplingParams
from mixq.errors import ConfigError
from tests.devices import DEVICE
from tests.engine.test_engine import FIX, prompts
from tests.tracking.routing_ref import FIXTURE

CAPTURE = DEVICE == "cuda"
needs_triton = pytest.mark.skipif(DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
                                  reason="the triton attention backend runs on the CPU only under TRITON_INTERPRET=1")


def test_batch_size_buckets():
    assert graph_batch_sizes(1) == [1]
    assert graph_batch_sizes(6) == [1, 2, 4, 6]
    assert graph_batch_sizes(40) == [1, 2, 4, 8, 16, 24, 32, 40]
    assert graph_batch_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert graph_batch_sizes(64, [8, 3, 3]) == [3, 8]
    with pytest.raises(ValueError, match="must be >= 1"):
        graph_batch_sizes(8, [0, 4])


def _count_replays(runner, monkeypatch) -> list[tuple[int, int]]:
    seen = []
    run = runner.graphs.run
    monkeypatch.setattr(runner.graphs, "run", lambda chunks, bs, *prev: seen.append((len(chunks), bs)) or run(chunks, bs, *prev))
    return seen


@needs_triton
def test_graph_decode_equals_eager_decode(monkeypatch):
    """Five prompts of ragged lengths finishing at different steps: decode batches of 5, 4,
    3, 2, 1 sequences run in buckets 8, 4, 4, 2, 1 (padding rows in most). Greedy tokens are
    identical and logprobs equal to fp32 rounding (same kernels, same order, except that
    a padded batch may pick other GEMM tiles: ~1e-6)."""
    kw = dict(model_path=str(FIX / "bf16"), max_running_requests=8, max_total_tokens=1024, page_size=8,
              device=DEVICE, dtype="float32", attention_backend="triton")
    eager = LLM(disable_cuda_graph=True, **kw)
    assert eager.engine.runner.graphs is None
    fast = LLM(**kw)
    runner = fast.engine.runner
    runner.capture_decode_graphs([1, 2, 4, 8], -(-fast.engine.max_model_len // 8), capture=CAPTURE)
    replays = _count_replays(runner, monkeypatch)
    ps = prompts(5, seed=3)
    params = [SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True, logprobs=1) for n in (2, 6, 4, 9, 3)]
    ref = eager.generate(ps, params)
    got = fast.generate(ps, params)
    assert {(5, 8), (3, 4), (2, 2), (1, 1)} <= set(replays)
    for a, b in zip(ref, got):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert max(abs(x - y) for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs)) < 1e-4
    # the same requests again: nothing the padding rows wrote leaked into the reused blocks
    again = fast.generate(ps, params)
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in ref]


@needs_triton
@pytest.mark.parametrize("family", ["qwen3-moe"])
def test_expert_counts_skip_padding_rows_and_stop_record(family, monkeypatch):
    """Tracking through graph decode steps (3 sequences padded to 4) counts exactly what the
    eager engine counts; with recording stopped the captured hooks add nothing."""
    kw = dict(model_path=str(FIXTURE[family]), max_running_requests=4, max_total_tokens=512, device=DEVICE, dtype="float32",
              attention_backend="triton", enable_expert_tracking=True)
    eager = LLM(disable_cuda_graph=True, **kw)
    fast = LLM(**kw)
    eng = fast.engine
    eng.expert_tracker.counters.reserve(4)
    eng.runner.capture_decode_graphs([4], -(-eng.max_model_len // eng.cfg.page_size), capture=CAPTURE)
    eng.expert_tracker.reset_stats()
    replays = _count_replays(eng.runner, monkeypatch)
    ids = [[5, 17, 99, 42, 7], [3, 4], [9, 10, 11]]
    sp = SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True)
    outs = [llm.generate(ids, sp) for llm in (eager, fast)]
    assert [o.outputs[0].token_ids for o in outs[0]] == [o.outputs[0].token_ids for o in outs[1]]
    assert (3, 4) in replays

    def counts(llm):  # everything but wall-clock times
        doc = llm.engine.expert_tracker.stats()
        return ({k: {f: v for f, v in e.items() if f != "last_activation_time"} for k, e in doc["expert_stats"].items()},
                doc["layer_stats"])

    got = counts(fast)
    assert got == counts(eager)
    assert sum(e["total_tokens_processed"] for e in got[0].values()) > 0
    eng.expert_tracker.stop_record()
    fast.generate(ids, sp)
    assert counts(fast) == got


def test_cuda_graph_plan_and_flags():
    llm = LLM(model_path=str(FIX / "bf16"), max_total_tokens=256, device=DEVICE, dtype="float32",
              max_running_requests=12)
    sizes, why = llm.engine.cuda_graph_plan()
    if DEVICE == "cuda":  # captured at start by default: buckets up to --max-running-requests
        assert sizes == [1, 2, 4, 8, 12] and llm.engine.runner.graphs.sizes == sizes
    else:
        assert sizes is None and why == "device cpu" and llm.engine.runner.graphs is None

    import argparse

    from mixq.server.args import add_server_flags, from_namespace
    from mixq.server.launch import engine_config

    p = argparse.ArgumentParser()
    add_server_flags(p)
    args = from_namespace(p.parse_args(["--model-path", str(FIX / "bf16"), "--cuda-graph-max-bs", "16",
                                        "--cuda-graph-bs", "1", "3", "16"]))
    args.validate()
    ecfg = engine_config(args)
    assert (ecfg.cuda_graph_max_bs, ecfg.cuda_graph_bs, ecfg.disable_cuda_graph) == (16, [1, 3, 16], False)
    assert engine_config(from_namespace(p.parse_args(["--model-path", str(FIX / "bf16"),
                                                      "--disable-cuda-graph"]))).disable_cuda_graph
    for bad, msg in ((["--cuda-graph-max-bs", "0"], "--cuda-graph-max-bs must be >= 1"),
                     (["--cuda-graph-bs", "0", "2"], "--cuda-graph-bs must list batch sizes >= 1")):
        with pytest.raises(ConfigError, match=msg):
            from_namespace(p.parse_args(bad)).validate()


def test_a_failed_capture_names_the_sizes_and_the_way_out(monkeypatch):
    llm = LLM(model_path=str(FIX / "bf16"), max_total_tokens=256, device=DEVICE, dtype="float32",
              disable_cuda_graph=True)
    eng = llm.engine

    def fail(sizes, max_blocks, capture=True):
        raise ValueError("a kernel synced the host during capture")

    monkeypatch.setattr(eng, "cuda_graph_plan", lambda: ([1, 2, 4], ""))
    monkeypatch.setattr(eng.runner, "capture_decode_graphs", fail)
    with pytest.raises(RuntimeError, match=r"batch sizes \[1, 2, 4\] failed: a kernel synced .*--disable-cuda-graph"):
        eng._capture_cuda_graphs()
