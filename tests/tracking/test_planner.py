"""`mixq plan --stats` (the frequency-only planner) on the tiny fixtures with synthetic stats:
at each budget the written config is the assignment the documented policy gives when worked
by hand from `mixq inspect`'s bytes (not from the planner), fits the budget, and loads and
computes what HF computes on its mix."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
import yaml
from safetensors.torch import save_file

from mixq.cli import main
from mixq.config.schema import MixedPrecisionConfig
from mixq.engine.engine import LLM
from mixq.engine.sampling_params import SamplingParams
from mixq.formats import build_plan, load_weights
from mixq.tracking.experts import ExpertActivationTracker
from tests.ckpt_utils import weight_only_copy
from tests.devices import DEVICE
from tests.tracking.routing_ref import FIX

Q = FIX / "tiny-qwen3-moe"
SOURCES = ["--model-path", str(Q / "bf16"), "--fp8-path", str(Q / "fp8-dynamic"), "--int4-path", str(Q / "gptq-w4a16")]
TOKENS = {(0, 0): 400, (0, 1): 100, (0, 2): 30, (0, 3): 5, (1, 0): 10, (1, 1): 0, (1, 2): 250, (1, 3): 60}
RANK = {"bf16": 0, "fp8": 1, "int4": 2}


@pytest.fixture(scope="module")
def stats_file(tmp_path_factory):
    t = ExpertActivationTracker(num_experts=4)
    for (layer, expert), n in TOKENS.items():
        t.record_expert_activation(layer, expert, tokens_processed=n)
    path = tmp_path_factory.mktemp("stats") / "stats.json"
    t.export_stats(path)
    return path


def inspect_report(capsys, cfg) -> dict:
    capsys.readouterr()
    assert main(["inspect", "--mixed-precision-config", str(cfg), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def total_bytes(report) -> int:
    return sum(t["bytes"] for t in report["tensors"])


def write_cfg(path, mapping):
    path.write_text(yaml.safe_dump({"mixed_precision": {
        "fp16_path": str(Q / "bf16"), "fp8_path": str(Q / "fp8-dynamic"), "int4_path": str(Q / "gptq-w4a16"),
        "weight_mapping": mapping}}))
    return path


def expert_formats(report) -> dict[tuple[int, int], str]:
    out = {}
    for t in report["tensors"]:
        parts = t["name"].split(".")
        if "experts" in parts:
            key = (int(parts[2]), int(parts[5]))
            assert out.setdefault(key, t["precision"]) == t["precision"], f"{key}: gate/up/down split"
    return out


FORMATS = ("bf16", "fp8", "int4")  # best first: bytes per weight


def unit_bytes(capsys, tmp_path) -> tuple[dict, int]:
    """(format -> unit -> bytes, fixed bytes), from `mixq inspect` of hand-written configs that
    put every unit in one format; units: ("attn", layer) and ("expert", layer, expert)."""
    table = {}
    for f in FORMATS:
        mapping = {} if f == "bf16" else {"model.layers.*.self_attn.*_proj.weight": f,
                                          "model.layers.*.mlp.experts.*.*_proj.weight": f}
        rep = inspect_report(capsys, write_cfg(tmp_path / f"all-{f}.yaml", mapping))
        per, fixed = {}, 0
        for t in rep["tensors"]:
            p = t["name"].split(".")
            if ".self_attn." in t["name"] and t["name"].endswith("_proj.weight"):
                key = ("attn", int(p[2]))
            elif "experts" in p:
                key = ("expert", int(p[2]), int(p[5]))
            else:
                fixed += t["bytes"]
                continue
            per[key] = per.get(key, 0) + t["bytes"]
        table[f] = per
    return table, fixed


def expected_assignment(table: dict, fixed: int, budget: int) -> dict:
    """The policy docs/expert-tracking.md states, worked by hand: start with every unit in the
    cheapest format; attention (layer order), then experts from the most to the least loaded
    take the best format that still fits; no expert above a hotter one."""
    units = [u for u in table["bf16"] if u[0] == "attn"]
    units += sorted((u for u in table["bf16"] if u[0] == "expert"), key=lambda u: (-TOKENS[u[1:]], u[1], u[2]))
    assign = {u: "int4" for u in units}
    total = fixed + sum(table["int4"][u] for u in units)
    cap = 0
    for u in units:
        for rank, f in enumerate(FORMATS):
            if u[0] == "expert" and rank < cap:
                continue
            extra = table[f][u] - table[assign[u]][u]
            if total + extra <= budget:
                assign[u], total = f, total + extra
                break
        if u[0] == "expert":
            cap = max(cap, FORMATS.index(assign[u]))
    return assign, total


def test_plan_matches_the_documented_policy_at_each_budget(stats_file, tmp_path, capsys):
    table, fixed = unit_bytes(capsys, tmp_path)
    lo = fixed + sum(table["int4"].values())
    hi = fixed + sum(table["bf16"].values())
    totals, shares, mixes = [], [], 0
    for frac in (0.0, 0.2, 0.45, 0.7, 1.0):
        arg = repr((lo + frac * (hi - lo)) / 2**30)
        budget = int(float(arg) * 2**30)
        want, want_total = expected_assignment(table, fixed, budget)
        out = tmp_path / f"plan{frac}.yaml"
        capsys.readouterr()
        assert main(["plan", "--stats", str(stats_file), *SOURCES, "--budget-gb", arg, "-o", str(out), "--json"]) == 0
        summary = json.loads(capsys.readouterr().out)
        report = inspect_report(capsys, out)
        got = {}
        for t in report["tensors"]:
            p = t["name"].split(".")
            key = (("attn", int(p[2])) if ".self_attn." in t["name"] and t["name"].endswith("_proj.weight") else
                   ("expert", int(p[2]), int(p[5])) if "experts" in p else None)
            if key is not None:
                prec = "bf16" if t["precision"] == "fp16" else t["precision"]
                assert got.setdefault(key, prec) == prec, f"{key}: one unit, one format"
        assert got == want, f"budget {frac}"
        assert total_bytes(report) == summary["predicted_bytes"] == want_total <= budget
        assert summary["min_bytes"] == lo and summary["max_bytes"] == hi
        # the token shares: the stats' tokens on the experts of each format, by hand
        for f in FORMATS:
            share = sum(TOKENS[u[1:]] for u in want if u[0] == "expert" and want[u] == f) / sum(TOKENS.values())
            assert summary["token_share"][f] == pytest.approx(share)
        mixes += len({want[u] for u in want if u[0] == "expert"}) > 1
        totals.append(summary["predicted_bytes"])
        shares.append(summary["token_share"]["bf16"])
    assert mixes >= 2  # the budgets in between really mix formats across experts
    assert totals[0] == lo and totals[-1] == hi and totals == sorted(totals) and shares == sorted(shares)


def test_plan_loads_and_computes_its_mix(stats_file, tmp_path, capsys):
    lo = total_bytes(inspect_report(capsys, write_cfg(tmp_path / "lo.yaml", {
        "model.layers.*.self_attn.*_proj.weight": "int4", "model.layers.*.mlp.experts.*.*_proj.weight": "int4"})))
    hi = total_bytes(inspect_report(capsys, write_cfg(tmp_path / "hi.yaml", {})))
    out = tmp_path / "plan.yaml"
    # FP8 weights only: the CPU quantizes FP8-dynamic inputs per token, which the HF reference
    # below cannot do inside its fused experts
    fp8w = weight_only_copy(Q / "fp8-dynamic", tmp_path / "fp8-w")
    sources = [str(fp8w) if s == str(Q / "fp8-dynamic") else s for s in SOURCES]
    assert main(["plan", "--stats", str(stats_file), *sources, "--budget-gb", repr((lo + 0.45 * (hi - lo)) / 2**30),
                 "-o", str(out)]) == 0
    assert "routed expert tokens on:" in capsys.readouterr().out
    llm = LLM(mixed_precision_config=str(out), device=DEVICE, dtype="float32", max_total_tokens=512)
    fams = {t["name"]: t["family"] for t in inspect_report(capsys, out)["tensors"]}
    assert {fams[n] for n in fams if ".experts." in n} >= {"fp8", "int4"}
    for name, w in llm.engine.weights.items():  # what is held is what the plan said (the base held in fp32)
        assert w.spec.family == (fams[name] if fams[name] != "bf16" else "fp32"), name
    # the same numbers as HF transformers on the dequantized weights of exactly this mix
    plan = build_plan(MixedPrecisionConfig.from_yaml(out))
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    save_file({n: w.dequantize().float().contiguous() for n, w in load_weights(plan).items()},
              str(ref_dir / "model.safetensors"))
    (ref_dir / "config.json").write_text((Q / "bf16" / "config.json").read_text())
    hf = transformers.AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32).eval()
    ids = [5, 17, 99, 42, 7, 8, 200, 31, 64]
    ours = llm.engine.runner.score(ids, [0, 1]).cpu()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)  # fp32 both sides, same dequantized weights
    out_ids = llm.generate([ids], SamplingParams(max_new_tokens=5, temperature=0, ignore_eos=True))[0]
    assert len(out_ids.outputs[0].token_ids) == 5


def test_plan_takes_paths_from_a_config_and_on_mixtral(stats_file, tmp_path, capsys):
    src = tmp_path / "src.yaml"
    src.write_text(yaml.safe_dump({"mixed_precision": {"fp16_path": str(Q / "bf16"), "fp8_path": str(Q / "fp8-dynamic"),
                                                       "weight_mapping": {"model.layers.0.self_attn.q_proj.weight": "fp8"}},
                                   "inference": {"max_seq_length": 256}}))
    out = tmp_path / "p.yaml"
    assert main(["plan", "--stats", str(stats_file), "--mixed-precision-config", str(src), "--budget-gb", "1",
                 "-o", str(out), "--formats", "fp8,bf16"]) == 0
    doc = yaml.safe_load(out.read_text())
    assert doc["inference"] == {"max_seq_length": 256} and set(doc["mixed_precision"]) == {"fp16_path", "weight_mapping"}
    assert set(expert_formats(inspect_report(capsys, out)).values()) == {"bf16"}  # 1 GiB: everything in the best

    m = FIX / "tiny-mixtral"
    t = ExpertActivationTracker(num_experts=4)
    for (layer, expert), n in TOKENS.items():
        t.record_expert_activation(layer, expert, tokens_processed=n)
    t.export_stats(tmp_path / "mx.json")
    plan_hi = total_bytes(inspect_report(capsys, _mixtral_cfg(tmp_path / "mhi.yaml", {})))
    plan_lo = total_bytes(inspect_report(capsys, _mixtral_cfg(tmp_path / "mlo.yaml", {
        "model.layers.*.self_attn.*_proj.weight": "int4", "model.layers.*.block_sparse_moe.experts.*.w*.weight": "int4"})))
    out = tmp_path / "mx.yaml"
    budget = plan_lo + 0.5 * (plan_hi - plan_lo)
    assert main(["plan", "--stats", str(tmp_path / "mx.json"), "--model-path", str(m / "bf16"), "--int4-path",
                 str(m / "gptq-w4a16"), "--budget-gb", repr(budget / 2**30), "-o", str(out)]) == 0
    report = inspect_report(capsys, out)
    assert total_bytes(report) <= budget
    fmts = {}
    for tt in report["tensors"]:
        if ".experts." in tt["name"]:
            p = tt["name"].split(".")
            fmts[(int(p[2]), int(p[5]))] = RANK[tt["precision"]]
    ranks = [fmts[k] for k in sorted(fmts, key=lambda k: -TOKENS[k])]
    assert ranks == sorted(ranks) and len(set(ranks)) == 2
    llm = LLM(mixed_precision_config=str(out), device=DEVICE, dtype="float32", max_total_tokens=512)
    assert len(llm.generate([[3, 4, 5]], SamplingParams(max_new_tokens=3, ignore_eos=True))[0].outputs[0].token_ids) == 3


def _mixtral_cfg(path, mapping):
    m = FIX / "tiny-mixtral"
    path.write_text(yaml.safe_dump({"mixed_precision": {"fp16_path": str(m / "bf16"), "int4_path": str(m / "gptq-w4a16"),
                                                        "weight_mapping": mapping}}))
    return path


@pytest.mark.parametrize("extra, message", [
    (["--budget-gb", "0.00001"], "is below the smallest this model can take with --formats bf16,fp8,int4"),
    (["--budget-gb", "1", "--formats", "bf16,int8"], "int8_path is not set"),
    (["--budget-gb", "1", "--formats", "bf16,fp9"], "unknown precision 'fp9'"),
    (["--budget-gb", "-1"], "--budget-gb must be > 0"),
])
def test_plan_refusals(stats_file, tmp_path, capsys, extra, message):
    assert main(["plan", "--stats", str(stats_file), *SOURCES, "-o", str(tmp_path / "x.yaml"), *extra]) == 2
    assert message in capsys.readouterr().err


def test_plan_refuses_stats_of_another_model(tmp_path, capsys):
    t = ExpertActivationTracker(num_experts=4)
    t.record_expert_activation(7, 1, tokens_processed=3)
    t.export_stats(tmp_path / "s.json")
    assert main(["plan", "--stats", str(tmp_path / "s.json"), *SOURCES, "--budget-gb", "1", "-o",
                 str(tmp_path / "x.yaml")]) == 2
    assert "the stats have MoE layer 7 but" in capsys.readouterr().err
    assert main(["plan", "--stats", str(tmp_path / "s.json"), "--model-path", str(Q / "bf16"), "--budget-gb", "1",
                 "-o", str(tmp_path / "x.yaml")]) == 2
    assert "only one format to choose from" in capsys.readouterr().err
