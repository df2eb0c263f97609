"""`mixq eval`: the scoreboard's numbers against a hand computation (KLD, percentiles,
same top token) and, end to end on the tiny Llama, against HF transformers in float64 on
the same dequantized weights; bytes against `mixq inspect`; the bad-input lines."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from mixq.assets.text import load_eval_text
from mixq.cli import main
from mixq.quality.metrics import TextScore, spearman, token_kld
from tests.quality.conftest import LLAMA, hf_logprobs, write_cfg


def test_kld_against_a_hand_computation():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(5, 7)) * 3
    other = base + rng.normal(size=(5, 7))
    want = []
    for b, o in zip(base, other):  # softmax and KL written out in plain Python floats
        zb = sum(math.exp(v) for v in b)
        zo = sum(math.exp(v) for v in o)
        want.append(sum(math.exp(bv) / zb * ((bv - math.log(zb)) - (ov - math.log(zo))) for bv, ov in zip(b, o)))
    got = token_kld(torch.log_softmax(torch.tensor(base, dtype=torch.float32), -1),
                    torch.log_softmax(torch.tensor(other, dtype=torch.float32), -1))
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-7)
    assert token_kld(torch.log_softmax(torch.tensor(base), -1), torch.log_softmax(torch.tensor(base), -1)).max() == 0


def test_text_score_summary_by_hand():
    rng = np.random.default_rng(1)
    s = TextScore()
    all_kld, nll, same = [], [], []
    for _ in range(3):
        base = rng.normal(size=(400, 11))
        logits = base + 0.5 * rng.normal(size=(400, 11))
        tgt = rng.integers(0, 11, size=400)
        lb = base - np.log(np.exp(base).sum(-1, keepdims=True))
        lq = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        all_kld += list((np.exp(lb) * (lb - lq)).sum(-1))
        nll += list(-lq[np.arange(400), tgt])
        same += list(lb.argmax(-1) == lq.argmax(-1))
        s.add(torch.tensor(logits, dtype=torch.float64), torch.tensor(tgt), torch.tensor(lb))
    r = s.summary()  # the logits are taken in float32: ~1e-7 relative
    assert r["tokens"] == 1200
    assert r["perplexity"] == pytest.approx(math.exp(np.mean(nll)), rel=1e-6)
    assert r["kld_mean"] == pytest.approx(np.mean(all_kld), rel=1e-5)
    assert r["kld_p999"] == pytest.approx(np.percentile(all_kld, 99.9), rel=1e-5)
    assert r["same_top_pct"] == pytest.approx(100 * np.mean(same))


def test_spearman_matches_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(2)
    x = rng.normal(size=50)
    y = x + rng.normal(size=50)
    x[[3, 9, 20]] = x[1]  # ties
    assert spearman(list(x), list(y)) == pytest.approx(scipy_stats.spearmanr(x, y).statistic, abs=1e-12)


def test_eval_against_hf_float64(tmp_path, capsys, llama_paths):
    mix = write_cfg(tmp_path / "mix.yaml", llama_paths, {
        "model.layers.*.self_attn.*_proj.weight": "gptq_int4", "model.layers.1.mlp.*_proj.weight": "int8"})
    assert main(["eval", f"mix={mix}", "--max-tokens", "200", "--window", "64", "--json", "--device", "cpu"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert list(rows) == ["base", "mix"]  # the reference row is added first

    ids = AutoTokenizer.from_pretrained(LLAMA / "bf16").encode(load_eval_text())[:200]
    windows = [ids[s : s + 64] for s in range(0, 200, 64)]
    base = torch.cat(hf_logprobs(None, LLAMA / "bf16", windows, tmp_path))
    ours = torch.cat(hf_logprobs(mix, LLAMA / "bf16", windows, tmp_path))
    tgt = torch.tensor([t for w in windows for t in w[1:]])
    kld = (base.exp() * (base - ours)).sum(-1).numpy()
    r, b = rows["mix"], rows["base"]
    assert r["tokens"] == b["tokens"] == len(tgt) == 200 - 4
    ppl = math.exp(-ours.gather(1, tgt[:, None]).mean().item())
    base_ppl = math.exp(-base.gather(1, tgt[:, None]).mean().item())
    # float32 engine vs float64 HF: mean NLL to ~1e-6, KLD (~1e-3 here) to ~1e-6 absolute
    assert b["perplexity"] == pytest.approx(base_ppl, rel=1e-5) and b["kld_mean"] == 0
    assert r["perplexity"] == pytest.approx(ppl, rel=1e-5)
    assert r["delta_ppl_pct"] == pytest.approx(100 * (ppl / base_ppl - 1), abs=1e-3)
    assert r["kld_mean"] == pytest.approx(kld.mean(), rel=1e-3, abs=2e-6) and r["kld_mean"] > 1e-4
    assert r["kld_p999"] == pytest.approx(np.percentile(kld, 99.9), rel=1e-3, abs=2e-6)
    same = (base.argmax(-1) == ours.argmax(-1)).double().mean().item() * 100
    assert abs(r["same_top_pct"] - same) <= 100 / len(tgt) + 1e-9  # one near-tie may flip
    # bytes as mixq inspect totals them; bits per weight over every parameter
    assert main(["inspect", "--mixed-precision-config", str(mix), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    nbytes = sum(t["bytes"] for t in report["tensors"])
    from safetensors import safe_open

    with safe_open(LLAMA / "bf16" / "model.safetensors", "pt") as f:
        params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    assert r["weight_bytes"] == nbytes and r["bits_per_weight"] == pytest.approx(8 * nbytes / params)
    assert b["bits_per_weight"] == pytest.approx(16.0)


def test_eval_table_plot_and_default_set(monkeypatch, tmp_path, capsys, llama_paths):
    import mixq.assets.default_model as dm

    bf16 = write_cfg(tmp_path / "bf16.yaml", llama_paths, {})
    q = write_cfg(tmp_path / "q.yaml", llama_paths, {"model.layers.*_proj.weight": "gptq_int4"})
    monkeypatch.setattr(dm, "default_eval_configs", lambda: {"bf16": str(bf16), "int4": str(q)})
    png = tmp_path / "f.png"
    assert main(["eval-ppl", "--max-tokens", "130", "--window", "64", "--device", "cpu", "--plot", str(png)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["config", "weights", "bits/w"]
    assert [line.split()[0] for line in out[2:4]] == ["bf16", "int4"]  # bf16 is the base: no extra row
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv, message", [
    (["--max-tokens", "40", "--window", "64"], "has 40 tokens (at most --max-tokens 40), fewer than one --window of 64"),
    (["--text", "/nonexistent.txt"], "--text /nonexistent.txt: no such file"),
    (["--window", "1"], "--window must be >= 2"),
])
def test_eval_bad_input_is_one_line(capsys, argv, message):
    assert main(["eval", "--model-path", str(LLAMA / "bf16"), "--device", "cpu", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_eval_refuses_configs_on_two_bases_and_bad_text(tmp_path, capsys, llama_paths):
    a = write_cfg(tmp_path / "a.yaml", llama_paths, {})
    other = FIX_MOE = LLAMA.parent / "tiny-qwen3-moe"
    b = write_cfg(tmp_path / "b.yaml", {"fp16_path": other / "bf16"}, {})
    assert FIX_MOE.is_dir()
    assert main(["eval", str(a), str(b), "--max-tokens", "100", "--window", "64"]) == 2
    assert "a KL divergence compares against one base: give --base" in capsys.readouterr().err
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe not utf-8 \xc3")
    assert main(["eval", str(a), "--text", str(bad)]) == 2
    assert f"--text {bad}: not UTF-8 text" in capsys.readouterr().err


def test_eval_kv_cache_dtype_scores_the_cache_against_a_bf16_kv_base(capsys):
    from mixq.engine.engine import LLM

    assert main(["eval", "--model-path", str(LLAMA / "bf16"), "--kv-cache-dtype", "fp8_e4m3", "--max-tokens", "130",
                 "--window", "64", "--json", "--device", "cpu"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert list(rows) == ["base", "model"]  # the same checkpoint twice: bf16 KV (reference), fp8 KV
    b, r = rows["base"], rows["model"]
    assert (b["kv_cache_dtype"], r["kv_cache_dtype"]) == ("bfloat16", "fp8_e4m3") and b["kld_mean"] == 0

    # the reference: the engine's logits with each cache, KLD by hand in float64
    ids = AutoTokenizer.from_pretrained(LLAMA / "bf16").encode(load_eval_text())[:130]
    windows = [ids[s : s + 64] for s in range(0, 130, 64)]
    logp = {}
    for kv in ("bfloat16", "fp8_e4m3"):
        eng = LLM(model_path=str(LLAMA / "bf16"), device="cpu", dtype="float32", kv_cache_dtype=kv,
                  max_total_tokens=128).engine  # eval scores in float32 on the CPU
        logp[kv] = torch.cat([eng.runner.score(w, [0, 1, 2, 3])[:-1].double().log_softmax(-1) for w in windows])
        eng.close()
    p, q = logp["bfloat16"], logp["fp8_e4m3"]
    kld = (p.exp() * (p - q)).sum(-1)
    assert r["tokens"] == len(kld) == 130 - 3
    # fp8 K/V (3 mantissa bits) moves the tiny model's distribution by ~1e-5 nats: far above
    # float32 summation noise (~1e-9), so a cache that was not applied gives 0 and fails
    assert kld.mean().item() > 1e-7
    assert r["kld_mean"] == pytest.approx(kld.mean().item(), rel=1e-3, abs=1e-9)
