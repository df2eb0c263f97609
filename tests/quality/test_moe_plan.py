"""The measure -> plan pipeline on the tiny Qwen3-MoE and Mixtral: per-expert formats, the
budget kept, a deliberately damaged expert put in the better format by both estimators,
routing frequency from a stats file steering the proxy, and the planned config served."""

from __future__ import annotations

import json

import pytest

from mixq.cli import main
from mixq.engine.engine import LLM
from mixq.engine.sampling_params import SamplingParams
from mixq.tracking.experts import ExpertActivationTracker
from tests.quality.conftest import FIX
from tests.quality.test_measure_plan import CAL, _damaged_gptq, inspect_bytes

MODELS = {  # model -> (damaged expert projection, its unit id)
    "tiny-qwen3-moe": ("model.layers.1.mlp.experts.2.down_proj", "L1.E2.down"),
    "tiny-mixtral": ("model.layers.0.block_sparse_moe.experts.1.w2", "L0.E1.down"),
}


@pytest.fixture(scope="module", params=list(MODELS))
def measured(request, tmp_path_factory):
    name = request.param
    tmp = tmp_path_factory.mktemp(name)
    damaged, _ = MODELS[name]
    gptq = _damaged_gptq(FIX / name / "bf16", tmp / "gptq", damaged)
    out = tmp / "m.json"
    assert main(["measure", "--model-path", str(FIX / name / "bf16"), "--int4-path", str(gptq), *CAL,
                 "-o", str(out)]) == 0
    return name, tmp, json.loads(out.read_text())


def expert_formats(prec: dict) -> dict[tuple[int, int], str]:
    out = {}
    for n, p in prec.items():
        parts = n.split(".")
        if "experts" in parts:
            out[(int(parts[2]), int(parts[parts.index("experts") + 1]), parts[-2])] = "bf16" if p == "fp16" else p
    return out


@pytest.mark.parametrize("estimator", ["exact", "proxy"])
def test_damaged_expert_gets_the_better_format(measured, estimator, capsys):
    name, tmp, doc = measured
    damaged, uid = MODELS[name]
    d = next(e for e in doc["entries"] if e["units"] == [uid])
    experts = [e for e in doc["entries"] if ".E" in e["units"][0]]
    assert max(experts, key=lambda e: e[estimator]) is d  # the worst expert unit by either estimator
    # a budget halfway between every unit in INT4 and every unit in BF16
    lo = doc["model"]["fixed_bytes"] + sum(e["bytes"] for e in doc["entries"])
    hi = doc["model"]["fixed_bytes"] + sum(u["bytes"]["bf16"] for u in doc["units"])
    budget = (lo + hi) // 2
    out = tmp / f"plan-{estimator}.yaml"
    assert main(["plan", "--measure", str(tmp / "m.json"), "--estimator", estimator, "--budget-gb",
                 repr(budget / 2**30), "-o", str(out)]) == 0
    total, prec = inspect_bytes(capsys, out)
    assert total <= budget
    fmts = expert_formats(prec)
    assert prec[f"{damaged}.weight"] in ("bf16", "fp16")  # the base (unmapped tensors read "fp16")
    assert {"bf16", "int4"} <= set(fmts.values())  # experts of the model differ: per-expert planning
    for layer, e, _ in fmts:  # gate and up share one format (one fused GEMM)
        leaves = [k for k in fmts if k[:2] == (layer, e)]
        ups = {fmts[k] for k in leaves if k[2] in ("gate_proj", "up_proj", "w1", "w3")}
        assert len(ups) == 1
    # the planned mix loads and generates
    llm = LLM(mixed_precision_config=str(out), device="cpu", dtype="float32", max_total_tokens=256)
    got = llm.generate([[3, 4, 5, 6]], SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True))
    assert len(got[0].outputs[0].token_ids) == 4


def test_stats_frequency_steers_the_proxy(measured, tmp_path, capsys):
    name, tmp, doc = measured
    if name != "tiny-qwen3-moe":
        pytest.skip("one model is enough")
    lo = doc["model"]["fixed_bytes"] + sum(e["bytes"] for e in doc["entries"])
    hi = doc["model"]["fixed_bytes"] + sum(u["bytes"]["bf16"] for u in doc["units"])
    budget = lo + (hi - lo) // 4
    got = {}
    for label, hot in (("hot", 10_000), ("cold", 0)):
        t = ExpertActivationTracker(num_experts=4)
        for layer in (0, 1):
            for e in range(4):
                t.record_expert_activation(layer, e, tokens_processed=hot if (layer, e) == (0, 3) else 10)
        t.export_stats(tmp_path / f"{label}.json")
        out = tmp_path / f"{label}.yaml"
        assert main(["plan", "--measure", str(tmp / "m.json"), "--estimator", "proxy", "--stats",
                     str(tmp_path / f"{label}.json"), "--budget-gb", repr(budget / 2**30), "-o", str(out)]) == 0
        total, prec = inspect_bytes(capsys, out)
        assert total <= budget
        got[label] = expert_formats(prec)
    assert got["hot"][(0, 3, "down_proj")] == "bf16" and got["cold"][(0, 3, "down_proj")] == "int4"
