"""`mixq measure` and `mixq plan --measure` on the tiny fixtures: each estimator against an
independent float64 computation (HF transformers, GPTQModel's dequantization), a planted
bad unit singled out by both and kept in the base, the planner against brute force over
the measure file, its bytes against `mixq inspect`, and the bad-input lines."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from mixq.assets.text import load_calibration_text
from mixq.cli import main
from mixq.formats.writers import quantize_checkpoint
from tests.quality.conftest import FIX, LLAMA, write_cfg

CAL = ["--max-tokens", "128", "--window", "64", "--device", "cpu"]


def run_measure(tmp_path, *argv, name="m.json") -> dict:
    out = tmp_path / name
    assert main(["measure", *argv, *CAL, "-o", str(out)]) == 0
    return json.loads(out.read_text())


def entry(doc, units, precision) -> dict:
    return next(e for e in doc["entries"] if e["units"] == units and e["precision"] == precision)


def inspect_bytes(capsys, cfg) -> tuple[int, dict]:
    capsys.readouterr()
    assert main(["inspect", "--mixed-precision-config", str(cfg), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    return sum(t["bytes"] for t in rep["tensors"]), {t["name"]: t["precision"] for t in rep["tensors"]}


@torch.no_grad()
def hf_unit_swap(model_dir: Path, name: str, weight: torch.Tensor, windows):
    """HF float64: (inputs of `name` per window, base log-probs, log-probs with `name` swapped)."""
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    mod = hf.get_submodule(name.removesuffix(".weight"))
    xs = []
    h = mod.register_forward_hook(lambda m, a, o: xs.append(a[0][0].clone()))
    base = [torch.log_softmax(hf(torch.tensor([w])).logits[0, :-1], -1) for w in windows]
    h.remove()
    mod.weight.copy_(weight.double())
    swapped = [torch.log_softmax(hf(torch.tensor([w])).logits[0, :-1], -1) for w in windows]
    return xs, torch.cat(base), torch.cat(swapped)


def calibration_windows():
    ids = AutoTokenizer.from_pretrained(LLAMA / "bf16").encode(load_calibration_text())[:128]
    return [ids[0:64], ids[64:128]]


def test_estimators_against_float64_and_gptqmodel(tmp_path, capsys):
    gptq = LLAMA / "gptq-legacy-4bit-asym"
    doc = run_measure(tmp_path, "--model-path", str(LLAMA / "bf16"), "--gptq-int4-path", str(gptq))
    name = "model.layers.1.mlp.down_proj.weight"
    with safe_open(gptq / "reference.safetensors", "pt") as f:  # GPTQModel's own dequantization
        wc = f.get_tensor(name).double()
    w = load_file(LLAMA / "bf16" / "model.safetensors")[name].double()
    xs, base, swapped = hf_unit_swap(LLAMA / "bf16", name, wc, calibration_windows())
    num = sum((x @ (wc - w).T).square().sum() for x in xs)
    den = sum((x @ w.T).square().sum() for x in xs)
    e = entry(doc, ["L1.down"], "gptq_int4")
    # float32 engine vs float64 here: the relative error to ~1e-5, the KLD (~1e-5) to ~1e-3 relative
    assert e["rel_error"] == pytest.approx((num / den).item(), rel=1e-3)
    assert e["proxy"] == e["rel_error"]  # a dense unit: frequency 1
    kld = (base.exp() * (base - swapped)).sum(-1).mean().item()
    assert e["exact"] == pytest.approx(kld, rel=5e-3, abs=1e-8) and kld > 0
    assert doc["calibration"]["tokens"] == 126 and "Julius Caesar" in doc["calibration"]["text"]
    cfg = write_cfg(tmp_path / "one.yaml", {"fp16_path": LLAMA / "bf16", "gptq_int4_path": gptq}, {name: "gptq_int4"})
    capsys.readouterr()
    assert main(["inspect", "--mixed-precision-config", str(cfg), "--json"]) == 0
    held = {t["name"]: t["bytes"] for t in json.loads(capsys.readouterr().out)["tensors"]}
    assert e["bytes"] == held[name]  # bytes as mixq inspect counts them
    assert doc["rank_correlation"]["entries"] == len(doc["entries"]) == 8


def _damaged_gptq(src: Path, dst: Path, damaged: str) -> Path:
    """An RTN GPTQ-INT4 checkpoint of src with one tensor's scales negated: that unit's
    weight becomes -W, a relative output error of ~4 (|-W - W|^2 / |W|^2)."""
    quantize_checkpoint(src, dst, "gptq", bits=4, group_size=64, sym=True, progress=False)
    path = dst / "model.safetensors"
    t = load_file(path)
    t[f"{damaged}.scales"] = -t[f"{damaged}.scales"]
    save_file(t, str(path), metadata={"format": "pt"})
    return dst


def test_planted_unit_is_found_and_kept_in_the_base(tmp_path, capsys):
    bad = _damaged_gptq(LLAMA / "bf16", tmp_path / "gptq", "model.layers.1.mlp.down_proj")
    doc = run_measure(tmp_path, "--model-path", str(LLAMA / "bf16"), "--gptq-int4-path", str(bad))
    planted = entry(doc, ["L1.down"], "gptq_int4")
    others = [e for e in doc["entries"] if e is not planted]
    assert 3.8 < planted["rel_error"] < 4.3  # |(-W) - W|^2 / |W|^2 = 4, plus INT4 noise
    assert max(e["rel_error"] for e in others) < 0.1
    assert planted["exact"] > 3 * max(e["exact"] for e in others)  # attention counts more in this random model
    # a budget that fits everything but one MLP down in INT4: the planted one stays BF16
    int4 = sum(e["bytes"] for e in doc["entries"])
    bf16 = sum(u["bytes"]["bf16"] for u in doc["units"])
    down_bf16 = next(u["bytes"]["bf16"] for u in doc["units"] if u["id"] == "L1.down")
    budget = doc["model"]["fixed_bytes"] + int4 - planted["bytes"] + down_bf16 + 100
    assert bf16 > int4
    out = tmp_path / "p.yaml"
    assert main(["plan", "--measure", str(tmp_path / "m.json"), "--budget-gb", repr(budget / 2**30), "-o",
                 str(out)]) == 0
    total, prec = inspect_bytes(capsys, out)
    assert total <= budget
    assert prec["model.layers.1.mlp.down_proj.weight"] == "bf16"
    assert sum(p == "gptq_int4" for n, p in prec.items() if n.endswith("proj.weight")) == 13  # all the others


@pytest.fixture(scope="module")
def llama_measure(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("measure")
    return tmp, run_measure(tmp, "--model-path", str(LLAMA / "bf16"), "--fp8-path", str(LLAMA / "fp8-dynamic"),
                            "--gptq-int4-path", str(LLAMA / "gptq-w4a16"))


def test_plan_is_the_brute_force_optimum_and_what_inspect_reports(llama_measure, tmp_path, capsys):
    mdir, doc = llama_measure
    cfg_bf16 = write_cfg(tmp_path / "bf16.yaml", {"fp16_path": LLAMA / "bf16"}, {})
    bf16_total, _ = inspect_bytes(capsys, cfg_bf16)
    fixed = bf16_total - sum(u["bytes"]["bf16"] for u in doc["units"])
    units = [u["id"] for u in doc["units"]]
    choices = {u: [("bf16", u_["bytes"]["bf16"], 0.0)] for u, u_ in zip(units, doc["units"])}
    for e in doc["entries"]:
        (u,) = e["units"]
        choices[u].append((e["precision"], e["bytes"], e["exact"]))
    combos = []
    for combo in itertools.product(*(choices[u] for u in units)):
        combos.append((fixed + sum(c[1] for c in combo), sum(c[2] for c in combo)))
    lo, hi = min(b for b, _ in combos), max(b for b, _ in combos)
    losses = []
    for frac in (0.0, 0.1, 0.3, 0.5, 0.8, 1.0):
        budget = int(lo + frac * (hi - lo))
        best = min(loss for b, loss in combos if b <= budget)
        out = tmp_path / f"p{frac}.yaml"
        capsys.readouterr()
        assert main(["plan", "--measure", str(mdir / "m.json"), "--budget-gb", repr(budget / 2**30), "-o", str(out),
                     "--json"]) == 0
        r = json.loads(capsys.readouterr().out)
        total, prec = inspect_bytes(capsys, out)
        assert total == r["predicted_bytes"] == r["inspect_bytes"] <= int(budget / 2**30 * 2**30) <= budget
        assert r["predicted_loss"] == pytest.approx(best, rel=1e-9, abs=1e-15)
        want = fixed + sum(next(c[1] for c in choices[u] if c[0] == r["assignment"][u]) for u in units)
        assert total == want
        header = out.read_text().splitlines()[:4]
        assert header[0].startswith("# written by `mixq plan --measure") and "exact knapsack" in header[0]
        assert f"predicted weights: {total} bytes" in header[2]
        for u in doc["units"]:  # q/k/v (and gate/up) share one precision: one fused GEMM
            assert len({prec[n] for n in u["tensors"]}) == 1
        losses.append(r["predicted_loss"])
    assert losses == sorted(losses, reverse=True) and losses[-1] == 0.0


def test_bits_per_weight_budget_and_proxy_estimator(llama_measure, tmp_path, capsys):
    mdir, doc = llama_measure
    out = tmp_path / "b.yaml"
    assert main(["plan", "--measure", str(mdir / "m.json"), "--bits-per-weight", "9", "--estimator", "proxy",
                 "-o", str(out), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["estimator"] == "proxy" and r["bits_per_weight"] <= 9
    assert r["predicted_bytes"] <= 9 * doc["model"]["parameters"] / 8


def test_formats_restrict_a_plan_to_some_measured_candidates(llama_measure, tmp_path, capsys):
    """--formats fp8 on a measure of FP8 and GPTQ: the plan is the best of BF16/FP8 alone
    (brute force over those choices), GPTQ's estimates unused."""
    mdir, doc = llama_measure
    units = [u["id"] for u in doc["units"]]
    choices = {u["id"]: [("bf16", u["bytes"]["bf16"], 0.0)] for u in doc["units"]}
    for e in doc["entries"]:
        if e["precision"] == "fp8":
            choices[e["units"][0]].append(("fp8", e["bytes"], e["exact"]))
    fixed = doc["model"]["fixed_bytes"]
    combos = [(fixed + sum(c[1] for c in combo), sum(c[2] for c in combo), combo)
              for combo in itertools.product(*(choices[u] for u in units))]
    budget = (min(b for b, _, _ in combos) + max(b for b, _, _ in combos)) // 2
    best = min(loss for b, loss, _ in combos if b <= budget)
    out = tmp_path / "fp8only.yaml"
    capsys.readouterr()
    assert main(["plan", "--measure", str(mdir / "m.json"), "--formats", "fp8", "--budget-gb", repr(budget / 2**30),
                 "-o", str(out), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert set(r["assignment"].values()) <= {"bf16", "fp8"} and "fp8" in r["assignment"].values()
    assert r["predicted_loss"] == pytest.approx(best, rel=1e-9, abs=1e-15)


@pytest.mark.parametrize("argv, message", [
    (["--model-path", str(FIX / "tiny-qwen3-moe" / "bf16")], "was measured on another model"),
    (["--gptq-int4-path", str(LLAMA / "gptq-legacy-4bit-asym")], "was measured on other checkpoints: gptq_int4"),
    (["--budget-gb", "0.0001"], "is below the smallest mix these checkpoints allow"),
    (["--budget-gb", "1", "--estimator", "exact", "--formats", "fp8,int8"], "int8_path is not set"),
])
def test_plan_bad_input_one_line_nothing_written(llama_measure, tmp_path, capsys, argv, message):
    mdir, _ = llama_measure
    out = tmp_path / "x.yaml"
    if "--budget-gb" not in argv:
        argv = [*argv, "--budget-gb", "1"]
    assert main(["plan", "--measure", str(mdir / "m.json"), "-o", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and not out.exists()


def test_measure_bad_input_one_line_nothing_written(tmp_path, capsys):
    out = tmp_path / "m.json"
    base = ["measure", "--model-path", str(LLAMA / "bf16"), "-o", str(out), *CAL]
    assert main([*base, "--int4-path", str(FIX / "tiny-mixtral" / "gptq-w4a16")]) == 2
    assert "has no tensor 'model.layers.0.mlp.down_proj.weight'" in capsys.readouterr().err
    short = tmp_path / "short.txt"
    short.write_text("Friends, Romans, countrymen.")
    assert main([*base, "--gptq-int4-path", str(LLAMA / "gptq-w4a16"), "--text", str(short)]) == 2
    assert "fewer than one --window of 64" in capsys.readouterr().err
    assert main([*base]) == 2
    assert "no candidate format" in capsys.readouterr().err
    assert not out.exists()
    (tmp_path / "junk.json").write_text('{"a": 1}')
    assert main(["plan", "--measure", str(tmp_path / "junk.json"), "--budget-gb", "1", "-o", str(tmp_path / "y")]) == 2
    assert "not a measure file written by `mixq measure`" in capsys.readouterr().err


def test_measure_resumes_from_its_partial_file(llama_measure, tmp_path):
    """An interrupted run's finished swaps (OUTPUT.partial, same checkpoints and settings)
    are not measured again: a planted value comes back as is."""
    from mixq.quality.measure import _settings_key
    from mixq.quality.units import UnitSpace

    mdir, doc = llama_measure
    paths = {k: doc["sources"][f]["path"] for f, k in (("bf16", "fp16_path"), ("fp8", "fp8_path"),
                                                          ("gptq_int4", "gptq_int4_path"))}
    key = _settings_key(UnitSpace(paths), load_calibration_text(), 64, 128, "float32", "cpu")
    done = {"+".join(e["units"]) + ":" + e["precision"]: e["exact"] for e in doc["entries"]}
    done["L0.o:fp8"] = 123.0
    out = tmp_path / "m.json"
    (tmp_path / "m.json.partial").write_text(json.dumps({"key": key, "exact": done}))
    assert main(["measure", "--model-path", paths["fp16_path"], "--fp8-path", paths["fp8_path"],
                 "--gptq-int4-path", paths["gptq_int4_path"], *CAL, "-o", str(out)]) == 0
    again = json.loads(out.read_text())
    assert entry(again, ["L0.o"], "fp8")["exact"] == 123.0
    assert not (tmp_path / "m.json.partial").exists()
