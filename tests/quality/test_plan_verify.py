"""`mixq plan --measure`'s verification on the tiny Llama: the contenders' KL divergence on
the held-out calibration tokens against HF transformers in float64 on the same weights,
the best one written (a uniform format when misleading estimates make the plan worse, the
plan when it is better), the evaluation text never read, the header saying it all."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer

from mixq.assets import text as texts
from mixq.cli import main
from tests.quality.conftest import LLAMA, hf_logprobs, write_cfg
from tests.quality.test_measure_plan import run_measure

PATHS = {"fp16_path": LLAMA / "bf16", "int8_path": LLAMA / "w8a16-int8", "gptq_int4_path": LLAMA / "gptq-w4a16"}
MEASURED, VERIFY, WINDOW = 128, 128, 64  # CAL reads the first 128 tokens; verification the next 128


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("verify")
    return tmp, run_measure(tmp, "--model-path", str(PATHS["fp16_path"]), "--int8-path", str(PATHS["int8_path"]),
                            "--gptq-int4-path", str(PATHS["gptq_int4_path"]))


def held_out_windows() -> list[list[int]]:
    """Tokens 128..255 of Julius Caesar (after the measured ones), windows of 64."""
    ids = AutoTokenizer.from_pretrained(LLAMA / "bf16").encode(texts.load_calibration_text())
    ids = ids[MEASURED : MEASURED + VERIFY]
    return [ids[s : s + WINDOW] for s in range(0, VERIFY, WINDOW)]


def hf_kld(cfg, tmp) -> float:
    """Mean KLD from the base over the held-out tokens, HF float64 (independent of mixq's engine)."""
    windows = held_out_windows()
    base = torch.cat(hf_logprobs(None, LLAMA / "bf16", windows, tmp))
    q = torch.cat(hf_logprobs(cfg, LLAMA / "bf16", windows, tmp))
    return (base.exp() * (base - q)).sum(-1).mean().item()


def plan(capsys, measure, budget, out, *extra) -> dict:
    capsys.readouterr()
    assert main(["plan", "--measure", str(measure), "--budget-gb", repr(budget / 2**30), "-o", str(out), "--json",
                 "--verify-tokens", str(VERIFY), "--verify-neighbors", "0", "--device", "cpu", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def uniform_bytes(doc, f) -> int:
    return doc["model"]["fixed_bytes"] + sum(u["bytes"][f] for u in doc["units"])


def contenders_by_hf(doc, tmp, plan_cfg) -> dict[str, float]:
    cfgs = {"plan": plan_cfg,
            "uniform int8": write_cfg(tmp / "u-int8.yaml", PATHS, {"re:.*_proj\\.weight": "int8"}),
            "uniform gptq_int4": write_cfg(tmp / "u-gptq.yaml", PATHS, {"re:.*_proj\\.weight": "gptq_int4"})}
    return {n: hf_kld(c, tmp) for n, c in cfgs.items()}


def check_record(r, want: dict[str, float]):
    got = r["verification"]["contenders"]
    assert set(got) == set(want)
    for n, k in want.items():  # float32 engine vs float64 HF: ~1e-3 relative, and the float32 rounding
        # of the logits alone is worth a few 1e-8 nats here (INT8's KLD is 4e-6)
        assert got[n]["kld_mean"] == pytest.approx(k, rel=5e-3, abs=1e-7), n
    assert r["written"] == min(want, key=want.get)
    assert r["verification"]["first_token"] == MEASURED and r["verification"]["tokens"] == VERIFY - 2


def test_misleading_estimates_lose_to_a_uniform_format(measured, tmp_path, capsys):
    """A hand-edited measure file that calls GPTQ-INT4 free and INT8 ruinous: at the uniform
    INT8 size the knapsack fills the budget with BF16 and GPTQ units, which the held-out
    tokens show worse than uniform INT8; that is what gets written."""
    mdir, doc = measured
    bad = json.loads(json.dumps(doc))
    for e in bad["entries"]:
        e["exact"] = 1e-9 if e["precision"] == "gptq_int4" else 1.0
    mfile = tmp_path / "misleading.json"
    mfile.write_text(json.dumps(bad))
    budget = uniform_bytes(doc, "int8")
    raw = plan(capsys, mfile, budget, tmp_path / "raw.yaml", "--disable-verify")
    assert raw["verification"] is None and "gptq_int4" in raw["assignment"].values()
    want = contenders_by_hf(doc, tmp_path, tmp_path / "raw.yaml")
    assert want["uniform int8"] < want["plan"]  # the premise, in float64
    out = tmp_path / "v.yaml"
    r = plan(capsys, mfile, budget, out)
    check_record(r, want)
    assert r["written"] == "uniform int8" and set(r["assignment"].values()) == {"int8"}
    assert r["predicted_bytes"] == r["inspect_bytes"] == budget
    capsys.readouterr()
    assert main(["inspect", "--mixed-precision-config", str(out), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert sum(t["bytes"] for t in rep["tensors"]) == budget
    assert {t["precision"] for t in rep["tensors"] if t["name"].endswith("_proj.weight")} == {"int8"}
    head = [line for line in out.read_text().splitlines() if line.startswith("#")]
    assert any("verified on calibration tokens 128..255 of Julius Caesar" in line and "wrote uniform int8" in line
               for line in head)
    for n, k in r["verification"]["contenders"].items():
        line = next(line for line in head if line.startswith(f"#   {n} "))
        assert f"{k['kld_mean']:.6f}" in line and (line.endswith("<- written") == (n == "uniform int8"))


def test_a_better_plan_is_kept_and_the_eval_text_never_read(measured, tmp_path, capsys, monkeypatch):
    """True estimates halfway from the uniform INT8 size to BF16: the plan (some units BF16)
    beats both uniform formats on the held-out tokens and is written. The verification reads the calibration
    text only: reading The Tempest fails the test, and the text scored is Julius Caesar."""
    import mixq.quality.evaluate as ev

    mdir, doc = measured

    def no_eval_text(*a, **k):
        raise AssertionError("the planner read the evaluation text")

    monkeypatch.setattr(texts, "load_eval_text", no_eval_text)
    seen = []
    real = ev.evaluate

    def spy(targets, text, *a, **k):
        seen.append((text, k.get("text_name"), k.get("skip")))
        return real(targets, text, *a, **k)

    monkeypatch.setattr(ev, "evaluate", spy)
    budget = (uniform_bytes(doc, "int8") + uniform_bytes(doc, "bf16")) // 2
    out = tmp_path / "v.yaml"
    r = plan(capsys, mdir / "m.json", budget, out)
    assert seen == [(texts.load_calibration_text(), texts.CALIBRATION_TEXT_NAME, MEASURED)]
    want = contenders_by_hf(doc, tmp_path, out)
    assert want["plan"] < min(want["uniform int8"], want["uniform gptq_int4"])  # the premise, in float64
    check_record(r, want)
    assert r["written"] == "plan" and "bf16" in r["assignment"].values()
    assert "wrote plan" in out.read_text().splitlines()[4]


def test_only_formats_that_fit_are_contenders_and_short_text_is_one_line(measured, tmp_path, capsys):
    """One byte below the uniform INT8 size only GPTQ-INT4 fits as a single format: the
    contenders are the plan and uniform GPTQ. --verify-tokens below one window is one line,
    nothing written."""
    mdir, doc = measured
    r = plan(capsys, mdir / "m.json", uniform_bytes(doc, "int8") - 1, tmp_path / "p.yaml")
    assert list(r["verification"]["contenders"]) == ["plan", "uniform gptq_int4"]
    assert r["predicted_bytes"] < uniform_bytes(doc, "int8")
    assert main(["plan", "--measure", str(mdir / "m.json"), "--budget-gb", "1", "-o", str(tmp_path / "x.yaml"),
                 "--verify-tokens", "10", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "fewer than one --window of 64" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.yaml").exists()
