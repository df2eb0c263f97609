"""The device counters against routing recomputed independently (tests/tracking/routing_ref.py),
through the engine (batched, chunked prefill, decode, n > 1) and on a bare model (padding
rows); and tracking off: no hook, no extra op, same outputs."""

from __future__ import annotations

import random
import time
from collections import Counter

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from mixq.engine.engine import LLM
from mixq.engine.model_runner import ModelRunner, SeqChunk
from mixq.engine.sampling_params import SamplingParams
from mixq.errors import ConfigError
from mixq.layers.moe import SparseMoE
from mixq.tracking.experts import ExpertActivationTracker
from tests.devices import DEVICE
from tests.test_models_hf import load_mixq
from tests.tracking.routing_ref import FIX, FIXTURE, router_logits, slot_counts, topk_of_logits

MIN_GAP = 1e-6  # float64 sort vs mixq's float32 softmax of the same logits: ~1e-7 relative apart


@pytest.fixture(scope="module", params=["qwen3-moe", "mixtral"])
def family_dir(request):
    return request.param, FIXTURE[request.param]


def test_engine_counts_equal_independent_routing(family_dir):
    family, path = family_dir
    # eager steps: the router_logits hooks must see every forward (graph replays run no Python;
    # tests/engine/test_cuda_graph.py checks graph steps count the same as eager ones)
    # no prefix caching: the count below has every sequence compute its whole prompt (n=2's
    # second sequence would otherwise find the first's pages)
    llm = LLM(model_path=str(path), device=DEVICE, dtype="float32", max_total_tokens=512, chunked_prefill_size=8, page_size=4,
              max_running_requests=4, enable_expert_tracking=True, disable_cuda_graph=True, disable_radix_cache=True)
    steps, times = [], []

    def record_step(batch):  # runs after the tracker's own step hook, which the engine installed first
        steps.append([(i.start, i.num_new_tokens) for i in batch.items])
        times.append(time.time())

    llm.engine.step_hooks.append(record_step)
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 256) for _ in range(n)] for n in (1, 5, 9, 17, 30, 12)]
    params = [SamplingParams(max_new_tokens=rng.randint(1, 7), temperature=0, ignore_eos=True) for _ in prompts]
    params[3] = SamplingParams(max_new_tokens=5, temperature=1.0, n=2, seed=7, ignore_eos=True)  # two seqs, one prompt
    with router_logits(llm.engine.model) as passes:
        outs = llm.generate(prompts, params)
    assert len(passes) == len(steps)
    assert any(start > 0 and n > 1 for items in steps for start, n in items)  # a prompt prefilled in chunks
    assert any(len({n > 1 for _, n in items}) == 2 for items in steps)  # prefill chunks batched with decodes

    layers = sorted(passes[0])
    E, k = passes[0][layers[0]].shape[1], llm.engine.model_config.top_k
    per_pass = [slot_counts([topk_of_logits(p[lid], k, MIN_GAP) for lid in layers], E) for p in passes]
    want_slots = sum(per_pass)
    want_active = sum((c.sum(1) > 0).long() for c in per_pass)  # [L, E] passes with >= 1 token
    last_pass = torch.full((len(layers), E), -1)
    for j, c in enumerate(per_pass):
        last_pass[c.sum(1) > 0] = j
    # every sequence computes its prompt and all its outputs but the last, each once
    n_tokens = sum(len(prompts[i]) + len(c.token_ids) - 1 for i, o in enumerate(outs) for c in o.outputs)
    assert int(want_slots.sum()) == n_tokens * k * len(layers)

    doc = llm.engine.expert_tracker.stats()
    assert doc["meta"]["layer_ids"] == layers and doc["meta"]["top_k"] == k and doc["meta"]["num_experts"] == E
    assert torch.equal(torch.tensor([doc["tokens_by_slot"][str(i)] for i in layers]), want_slots)
    assert doc["meta"]["num_forward_passes"] == len(passes)
    for r, lid in enumerate(layers):
        for e in range(E):
            s = doc["expert_stats"][f"layer_{lid}_expert_{e}"]
            assert s["total_tokens_processed"] == int(want_slots[r, :, e].sum())
            assert s["activation_count"] == int(want_active[r, e])
            j = int(last_pass[r, e])
            if j < 0:
                assert s["last_activation_time"] is None
            else:  # stamped by the tracker's hook of step j: after our hook of step j-1, before ours of step j
                assert (times[j - 1] if j else 0) <= s["last_activation_time"] <= times[j]
    req = doc["requests"]
    assert req["num_requests"] == len(prompts) and req["input_tokens"] == sum(map(len, prompts))
    assert req["output_tokens"] == sum(len(c.token_ids) for o in outs for c in o.outputs)


def test_padding_rows_are_not_counted_and_bare_models_count_per_forward(family_dir):
    family, path = family_dir
    model = load_mixq(path)
    runner = ModelRunner(model, num_blocks=96, block_size=4, dtype=torch.float32, device=DEVICE)
    tracker = ExpertActivationTracker()
    tracker.attach(model, DEVICE, auto_pass=False)
    k = model.config.top_k
    ids = torch.randint(3, 256, (300,), generator=torch.Generator().manual_seed(3)).tolist()
    # 300 rows > the 256 the counters start with; the last 10 play padding (e.g. a CUDA-graph batch)
    tracker.begin_pass(num_valid_rows=290)
    with router_logits(model) as passes:
        runner.forward([SeqChunk(ids, 0, list(range(75)))])
    layers = sorted(passes[0])
    E = passes[0][layers[0]].shape[1]
    routes = [topk_of_logits(passes[0][lid], k, MIN_GAP) for lid in layers]
    got = torch.tensor([tracker.stats()["tokens_by_slot"][str(i)] for i in layers])
    assert torch.equal(got, slot_counts([r[:290] for r in routes], E))
    assert not torch.equal(got, slot_counts(routes, E))  # the padding rows did route somewhere
    # auto passes (no engine): each forward is one pass, all rows real
    tracker.reset_stats()
    tracker.counters.auto_pass = True
    with router_logits(model) as passes:
        runner.forward([SeqChunk(ids[:40], 0, list(range(10)))])
        runner.forward([SeqChunk(ids[40:41], 40, list(range(11)))])
    doc = tracker.stats()
    assert doc["meta"]["num_forward_passes"] == 2
    per_pass = [slot_counts([topk_of_logits(p[lid], k, MIN_GAP) for lid in layers], E) for p in passes]
    assert torch.equal(torch.tensor([doc["tokens_by_slot"][str(i)] for i in layers]), sum(per_pass))
    active = sum((c.sum(1) > 0).long() for c in per_pass)
    for r, lid in enumerate(layers):
        for e in range(E):
            assert doc["expert_stats"][f"layer_{lid}_expert_{e}"]["activation_count"] == int(active[r, e])


def _moe_ops(moe, x):
    with profile(activities=[ProfilerActivity.CPU]) as prof, torch.inference_mode():
        out = moe(x)
    return Counter(e.name for e in prof.events()), out


VIEW_OPS = {"aten::view", "aten::slice", "aten::as_strided", "aten::reshape", "aten::_reshape_alias"}


def test_tracking_off_adds_no_op_and_changes_no_output(family_dir):
    family, path = family_dir
    off = LLM(model_path=str(path), device=DEVICE, dtype="float32", max_total_tokens=512)
    moes = [m for m in off.engine.model.modules() if isinstance(m, SparseMoE)]
    assert moes and all(not m.route_hooks for m in moes)  # off: nothing installed
    assert off.engine.expert_tracker is None and not off.engine.step_hooks and not off.engine.finish_hooks

    bare = load_mixq(path)  # a model no engine touched: the untracked forward
    bare_moe = next(m for m in bare.modules() if isinstance(m, SparseMoE))
    x = torch.randn(37, bare_moe.gate.in_features, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    base_ops, base_out = _moe_ops(bare_moe, x)
    off_ops, off_out = _moe_ops(moes[0], x)
    assert off_ops == base_ops and torch.equal(off_out, base_out)

    tracker = ExpertActivationTracker()
    tracker.attach(bare, DEVICE)
    on_ops, on_out = _moe_ops(bare_moe, x)
    extra = on_ops - base_ops
    # what tracking costs per MoE layer: one add (flat index) and one index_add_; the rest are views
    # (CUDA runtime calls such as cudaLaunchKernel are those ops' launches, not more ops)
    ops = {n: c for n, c in extra.items() if n not in VIEW_OPS and not n.startswith("cuda")}
    assert ops == {"aten::add": 1, "aten::index_add_": 1}, extra
    assert not base_ops - on_ops and torch.equal(on_out, base_out)
    tracker.stop_record()  # recording paused: the hook returns before any op
    assert _moe_ops(bare_moe, x)[0] == base_ops
    tracker.start_record()
    tracker.detach()
    assert _moe_ops(bare_moe, x)[0] == base_ops and not bare_moe.route_hooks

    on = LLM(model_path=str(path), device=DEVICE, dtype="float32", max_total_tokens=512, enable_expert_tracking=True)
    ids = [[5, 17, 99, 42, 7, 8, 200], [3, 4]]
    sp = SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True)
    assert [o.outputs[0].token_ids for o in on.generate(ids, sp)] == [o.outputs[0].token_ids for o in off.generate(ids, sp)]


def test_stop_start_record_and_dense_model_refusal(family_dir):
    family, path = family_dir
    llm = LLM(model_path=str(path), device=DEVICE, dtype="float32", max_total_tokens=512, enable_expert_tracking=True)
    t = llm.engine.expert_tracker
    sp = SamplingParams(max_new_tokens=3, temperature=0, ignore_eos=True)
    llm.generate([[5, 6, 7]], sp)
    before = t.stats()
    assert before["meta"]["num_forward_passes"] == 3
    t.stop_record()
    llm.generate([[8, 9]], sp)
    after = t.stats()
    assert after["expert_stats"] == before["expert_stats"] and after["requests"] == before["requests"]
    t.start_record()
    assert sum(s["total_tokens_processed"] for s in t.stats()["expert_stats"].values()) == 0
    llm.generate([[8, 9]], sp)  # 2 prompt + 2 decode tokens, top_k pairs each, per layer
    doc = t.stats()
    for ls in doc["layer_stats"].values():
        assert ls["total_tokens"] == 4 * doc["meta"]["top_k"]

    with pytest.raises(ConfigError, match=r"the model \(LlamaForCausalLM\) has no MoE layer to track"):
        LLM(model_path=str(FIX / "tiny-llama" / "bf16"), device=DEVICE, max_total_tokens=512, enable_expert_tracking=True)
