"""The stats document: MISSION.md's schema key by key, export/import round trips, the
by-hand API, load balance, the module-level functions."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mixq.engine.engine import LLM
from mixq.engine.sampling_params import SamplingParams
from mixq.tracking import experts as ex
from mixq.tracking.expert_stats import ExpertTable, load_balance, merge_stats
from mixq.tracking.experts import ExpertActivationTracker
from tests.devices import DEVICE
from tests.tracking.routing_ref import FIXTURE

# The export example of MISSION.md ("Expert activation tracking"), verbatim.
MISSION_EXAMPLE = json.loads("""
{"expert_stats": {"layer_0_expert_1": {"layer_id": 0, "expert_id": 1,
   "activation_count": 150, "last_activation_time": 1640995200.0,
   "total_tokens_processed": 1500}},
 "layer_stats": {"0": {"total_experts": 8, "total_activations": 1200,
   "total_tokens": 12000, "experts": {"1": {"activation_count": 150,
   "total_tokens_processed": 1500}}}},
 "top_experts": [{"layer_id": 0, "expert_id": 1, "activation_count": 150,
   "total_tokens_processed": 1500}]}
""")


@pytest.fixture(scope="module")
def served():
    """A tracked engine after some traffic on the tiny Qwen3-MoE."""
    llm = LLM(model_path=str(FIXTURE["qwen3-moe"]), device=DEVICE, dtype="float32", chunked_prefill_size=8,
              max_total_tokens=512, enable_expert_tracking=True)
    llm.generate([[5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [20, 21, 22]],
                 SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True))
    return llm


def types_of(d: dict) -> dict:
    return {k: type(v) for k, v in d.items()}


def test_schema_matches_mission_key_by_key(served):
    doc = served.engine.expert_tracker.stats()
    m = MISSION_EXAMPLE
    m_expert, m_layer = m["expert_stats"]["layer_0_expert_1"], m["layer_stats"]["0"]
    assert set(m) <= set(doc)  # MISSION's sections, plus ours: load_balance, tokens_by_slot, requests, meta
    assert set(doc) - set(m) == {"load_balance", "tokens_by_slot", "requests", "meta"}
    for key, e in doc["expert_stats"].items():
        assert key == f"layer_{e['layer_id']}_expert_{e['expert_id']}"
        want = types_of(m_expert)
        if e["last_activation_time"] is None:  # an expert never routed to
            want["last_activation_time"] = type(None)
        assert types_of(e) == want
    for lid, ls in doc["layer_stats"].items():
        assert lid.isdigit() and types_of(ls) == types_of(m_layer)
        assert ls["total_experts"] == 4 and list(ls["experts"]) == ["0", "1", "2", "3"]
        assert ls["total_tokens"] == sum(v["total_tokens_processed"] for v in ls["experts"].values())
        assert ls["total_activations"] == sum(v["activation_count"] for v in ls["experts"].values())
        for e, v in ls["experts"].items():
            assert types_of(v) == types_of(m_layer["experts"]["1"])
            full = doc["expert_stats"][f"layer_{lid}_expert_{e}"]
            assert v == {"activation_count": full["activation_count"],
                         "total_tokens_processed": full["total_tokens_processed"]}
    assert doc["top_experts"] and all(types_of(t) == types_of(m["top_experts"][0]) for t in doc["top_experts"])
    assert list(types_of(doc["top_experts"][0])) == list(m["top_experts"][0])  # same key order too


def test_export_import_round_trip_keeps_every_number(served, tmp_path):
    t = served.engine.expert_tracker
    doc = t.export_stats(tmp_path / "a.json", top_k=100)
    assert json.loads((tmp_path / "a.json").read_text()) == doc
    back = ExpertActivationTracker.load_stats(tmp_path / "a.json")
    again = back.export_stats(tmp_path / "b.json", top_k=100)
    assert (tmp_path / "a.json").read_text() == (tmp_path / "b.json").read_text()
    # the numbers are the device counters', exactly
    snap = t.counters.snapshot()
    table = ExpertTable.from_doc(again)
    assert torch.equal(table.slot_tokens, snap.slot_tokens) and torch.equal(table.activations, snap.activations)
    assert torch.equal(table.tokens, snap.slot_tokens.sum(1)) and torch.equal(table.last_time, snap.last_time)
    # two ranks' exports add up
    two = merge_stats(doc, again)
    t2 = ExpertTable.from_doc(two)
    assert torch.equal(t2.tokens, 2 * table.tokens) and torch.equal(t2.activations, 2 * table.activations)
    assert torch.equal(t2.last_time, table.last_time) and two["meta"]["num_forward_passes"] == 2 * doc["meta"][
        "num_forward_passes"]


def test_by_hand_api_numbers_and_load_balance():
    t = ExpertActivationTracker(num_experts=4)
    for e, n in ((0, 6), (1, 2), (0, 0)):
        t.record_expert_activation(3, e, tokens_processed=n, request_id="r1")
    t.record_expert_activation(5, 2, tokens_processed=7)
    t.record_request("r1", input_length=10, output_length=4)
    assert t.get_expert_stats(3, 0)["activation_count"] == 2 and t.get_expert_stats(3, 0)["total_tokens_processed"] == 6
    assert set(t.get_expert_stats(layer_id=5)) == {f"layer_5_expert_{e}" for e in range(4)}
    assert t.get_expert_stats(3, 2)["last_activation_time"] is None
    assert [(x["layer_id"], x["expert_id"]) for x in t.get_top_experts(3)] == [(5, 2), (3, 0), (3, 1)]
    ls = t.get_layer_stats()
    assert ls[3]["total_tokens"] == 8 and ls[3]["total_activations"] == 3 and ls[3]["experts"][1] == {
        "activation_count": 1, "total_tokens_processed": 2}
    # layer 3 loads [6, 2, 0, 0]: mean 2, max 6; entropy of (3/4, 1/4)
    b = ls[3]["load_balance"]
    h = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
    assert b["max_over_mean"] == pytest.approx(3.0) and b["entropy_bits"] == pytest.approx(h)
    assert b["normalized_entropy"] == pytest.approx(h / 2)
    assert load_balance([5, 5, 5, 5]) == {"max_over_mean": 1.0, "entropy_bits": 2.0, "normalized_entropy": 1.0}
    assert load_balance([0, 0]) == {"max_over_mean": None, "entropy_bits": None, "normalized_entropy": None}
    req = t.stats()["requests"]
    assert req["num_requests"] == 1 and req["by_request"]["r1"] == {
        "expert_tokens": {"layer_3_expert_0": 6, "layer_3_expert_1": 2}, "input_length": 10, "output_length": 4}
    with pytest.raises(ValueError, match="layer_id 4 is not a tracked MoE layer"):
        t.stats(layer_id=4)
    with pytest.raises(ValueError, match="expert_id 9 is out of range"):
        t.stats(expert_id=9)
    t.reset_stats()
    assert t.get_top_experts() == [] and t.stats()["requests"]["num_requests"] == 0


def test_module_functions_use_the_engines_tracker(served, tmp_path):
    ex.set_global_expert_tracker(served.engine.expert_tracker)
    full = ex.get_expert_activation_stats()
    one = ex.get_expert_activation_stats(layer_id=1, expert_id=2)
    assert one["expert_stats"] == {"layer_1_expert_2": full["expert_stats"]["layer_1_expert_2"]}
    assert list(one["layer_stats"]) == ["1"] and all(x["expert_id"] == 2 for x in one["top_experts"])
    assert ex.get_expert_activation_stats()["top_experts"] == full["top_experts"]
    assert ex.export_expert_activation_stats(tmp_path / "s.json") == json.loads((tmp_path / "s.json").read_text())
    ex.reset_expert_activation_stats()
    assert all(v["total_tokens_processed"] == 0 for v in ex.get_expert_activation_stats()["expert_stats"].values())
    ex.set_global_expert_tracker(None)
    with pytest.raises(RuntimeError, match="enable it with --enable-expert-tracking"):
        ex.get_expert_activation_stats()


def test_malformed_stats_are_refused(tmp_path):
    from mixq.tracking.expert_stats import read_stats

    (tmp_path / "x.json").write_text('{"layer_stats": {}}')
    with pytest.raises(ValueError, match="not an expert stats document"):
        read_stats(tmp_path / "x.json")
    (tmp_path / "y.json").write_text('{"expert_stats": {"a": {"layer_id": 0}}}')
    with pytest.raises(ValueError, match="malformed expert_stats entry"):
        read_stats(tmp_path / "y.json")
    (tmp_path / "z.json").write_text("{")
    with pytest.raises(ValueError, match="invalid JSON"):
        read_stats(tmp_path / "z.json")
