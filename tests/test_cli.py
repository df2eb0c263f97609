"""`mixq generate` and `mixq eval-ppl`: what they print, against the engine and HF."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mixq.cli import main as cli_main

ROOT = Path(__file__).parents[1]
TINY = ROOT / "tests" / "fixtures" / "tiny-llama" / "bf16"
MIX = ROOT / "examples" / "tiny-llama-mix.yaml"


def _family(name: str) -> str:
    """The format family examples/tiny-llama-mix.yaml gives a tensor, read off the YAML by
    hand: attention FP8 except layer 0's q/k/v (AWQ INT4) and o_proj (INT8), every MLP
    projection INT4 (GPTQ in layer 0, compressed-tensors AWQ in layer 1), the rest from the
    BF16 base, held in the engine's float32."""
    if ".self_attn." in name and name.endswith("_proj.weight"):
        if name.startswith("model.layers.0."):
            return "int8" if "o_proj" in name else "int4"
        return "fp8"
    return "int4" if ".mlp." in name else "fp32"


def _expected_memory_line(weights) -> tuple[str, dict[str, int]]:
    """The memory line from tensor sizes: the bytes of each tensor the engine holds, the
    family from the YAML (_family), the BF16 baseline 2 bytes per element of the base checkpoint's headers
    (the safetensors library), MB = 2**20 bytes."""
    from safetensors import safe_open

    with safe_open(str(TINY / "model.safetensors"), "pt") as f:
        bf16 = sum(2 * math.prod(f.get_slice(k).get_shape()) for k in f.keys())
        names = set(f.keys())
    assert set(weights) == names  # every tensor of the base, once
    by = {}
    for name, w in weights.items():
        # the checkpoint's tensors, plus the per-input-channel compensation an AWQ weight
        # carries when its smoothing was folded into a norm of another source
        ts = [*w.tensors.values(), *([w.input_scale] if w.input_scale is not None else [])]
        by[_family(name)] = by.get(_family(name), 0) + sum(t.numel() * t.element_size() for t in ts)
    held = sum(by.values())
    fmts = ", ".join(f"{k} {v / 2**20:.1f} MB" for k, v in sorted(by.items()))
    return (f"weights {held / 2**20:.1f} MB ({fmts}); saved {(bf16 - held) / 2**20:.1f} MB vs BF16, "
            f"compression {bf16 / held:.2f}x"), by


def test_generate_prints_completion_speed_memory_and_a_progress_bar(capfd):
    from mixq.engine.engine import LLM
    from mixq.engine.sampling_params import SamplingParams

    prompts = ["the cat sat on the", "a blue house"]
    argv = ["generate", "--mixed-precision-config", str(MIX), "--max-new-tokens", "7", "--device", "cpu",
            "--dtype", "float32"]
    for p in prompts:
        argv += ["--prompt", p]
    assert cli_main(argv) == 0
    out, err = capfd.readouterr()
    llm = LLM(mixed_precision_config=str(MIX), device="cpu", dtype="float32", max_total_tokens=256)
    want = llm.generate(prompts, SamplingParams(max_new_tokens=7, temperature=0))
    lines = out.splitlines()
    for p, o in zip(prompts, want):
        assert f"{p}{o.outputs[0].text}" in lines
    n_tok = sum(len(o.outputs[0].token_ids) for o in want)
    speed = re.search(r"^(\d+) tokens in ([\d.]+) s \(([\d.]+) tokens/s\) on cpu$", out, re.M)
    assert speed and int(speed.group(1)) == n_tok
    # seconds are printed to 0.01 s and tokens/s to 0.1: the speed must lie within what
    # those roundings allow
    dt, tps = float(speed.group(2)), float(speed.group(3))
    assert n_tok / (dt + 0.005) - 0.05 <= tps <= n_tok / max(dt - 0.005, 1e-9) + 0.05
    # then the first-token time and the decode rate after it (every prompt's first token is one
    # of the n_tok, and 7 tokens each leave 6 decoded ones each)
    first = re.search(r"^first token after ([\d.]+) s \((\d+) prompt tokens\), then (\d+) tokens at ([\d.]+) "
                      r"tokens/s$", out, re.M)
    assert first, out
    assert int(first.group(2)) == sum(len(o.prompt_token_ids) for o in want)
    assert int(first.group(3)) == n_tok - len(prompts) == 12 and float(first.group(1)) <= dt + 0.01
    # decoding 12 tokens in at most the whole run's time: at least that rate
    assert float(first.group(4)) >= 12 / (dt + 0.005) - 0.05
    line, by = _expected_memory_line(llm.engine.weights)
    assert line in lines, (line, [x for x in lines if x.startswith("weights")])
    assert by.keys() == {"fp32", "fp8", "int4", "int8"}
    assert "loading weights" in err and "21/21" in err  # tqdm's bar over the base's 21 tensors, on stderr


def _config(path):
    from mixq.config.schema import MixedPrecisionConfig

    return MixedPrecisionConfig.from_yaml(path)


@torch.no_grad()
def _hf_perplexity(path, ids: list[int], window: int) -> float:
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()
    nll, count = 0.0, 0
    for s in range(0, len(ids), window):
        chunk = ids[s : s + window]
        if len(chunk) < 2:
            break
        logp = torch.log_softmax(hf(torch.tensor([chunk])).logits[0, :-1], -1)
        nll -= logp.gather(1, torch.tensor(chunk[1:])[:, None]).sum().item()
        count += len(chunk) - 1
    return math.exp(nll / count)


def test_eval_ppl_matches_hf_on_the_same_text(capsys):
    from transformers import AutoTokenizer

    from mixq.assets.text import load_eval_text

    assert cli_main(["eval-ppl", "--model-path", str(TINY), "--max-tokens", "300", "--window", "64",
                     "--device", "cpu", "--dtype", "float32", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)["model"]
    ids = AutoTokenizer.from_pretrained(TINY).encode(load_eval_text())[:300]
    assert r["tokens"] == 300 - math.ceil(300 / 64) and r["window"] == 64
    # float32 engine vs float64 HF over 295 tokens: the mean NLL agrees to ~1e-6
    assert r["perplexity"] == pytest.approx(_hf_perplexity(TINY, ids, 64), rel=1e-5)


def test_eval_ppl_with_no_flags_runs_every_default_config(monkeypatch, tmp_path, capsys):
    """With no model flags eval-ppl reports each entry of default_eval_configs(); here that
    list is pointed at the tiny model (the real one is checked below, headers only)."""
    import mixq.assets.default_model as dm

    bf16 = tmp_path / "bf16.yaml"
    bf16.write_text(yaml.safe_dump({"mixed_precision": {"fp16_path": str(TINY)}}))
    monkeypatch.setattr(dm, "default_eval_configs", lambda: {"bf16": str(bf16), "example-mix": str(MIX)})
    assert cli_main(["eval-ppl", "--max-tokens", "130", "--window", "64", "--device", "cpu", "--dtype",
                     "float32"]) == 0
    out = capsys.readouterr().out.splitlines()[2:4]  # the table: header, rule, one row per config
    assert [line.split()[0] for line in out] == ["bf16", "example-mix"]
    ppl = [float(line.split()[4]) for line in out]  # name, size, unit, bits/w, PPL
    assert all(math.isfinite(p) and p > 1 for p in ppl) and ppl[0] != ppl[1]  # a random tiny model
    # the bf16 entry is HF's perplexity on the same 130 tokens in windows of 64 (printed to
    # 0.001; float32 engine vs float64 HF agree to ~1e-6 relative)
    from transformers import AutoTokenizer

    from mixq.assets.text import load_eval_text

    ids = AutoTokenizer.from_pretrained(TINY).encode(load_eval_text())[:130]
    assert ppl[0] == pytest.approx(_hf_perplexity(TINY, ids, 64), abs=6e-4)


def test_default_eval_configs_put_every_linear_in_its_format(default_model_root):
    from mixq.assets.default_model import default_eval_configs
    from mixq.formats import build_plan
    from tests.ckpt_utils import is_linear

    cfgs = default_eval_configs()
    assert list(cfgs) == ["bf16", "fp8", "int8", "gptq-int4", "awq-int4", "gguf", "default-mix"]
    want = {"bf16": {"dense"}, "fp8": {"fp8"}, "int8": {"int8"}, "gptq-int4": {"gptq"}, "awq-int4": {"awq"},
            "gguf": {"gguf"}, "default-mix": {"dense", "fp8", "int8", "gptq", "awq", "gguf"}}
    for name, path in cfgs.items():
        plan = build_plan(_config(path))
        layouts = {t.spec.layout for n, t in plan.tensors.items() if is_linear(n)}
        if name == "default-mix":  # planned (mixq plan --measure): a mix of the prepared formats
            assert layouts <= want[name] and len(layouts) >= 2, layouts
        else:
            assert layouts == want[name], name


def test_readme_main_command_on_the_default_model(default_model_root):
    """README: `mixq generate --chat --prompt "What is the capital of France?"` (no model
    flags: the embedded default mix) prints an answer naming Paris, the speed and the
    memory line, with a progress bar while loading."""
    readme = (ROOT / "README.md").read_text()
    cmd = re.search(r'&& (mixq generate [^\n`]*)', readme).group(1)
    assert cmd == 'mixq generate --chat --prompt "What is the capital of France?"'
    env = {**os.environ, "MIXQ_CACHE": str(default_model_root.parent), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "mixq", "generate", "--chat", "--prompt",
                        "What is the capital of France?"], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Paris" in r.stdout
    assert re.search(r"^\d+ tokens in [\d.]+ s \([\d.]+ tokens/s\) on cpu$", r.stdout, re.M)
    mem = re.search(r"^weights [\d.]+ MB \((.*)\); saved [\d.]+ MB vs BF16, compression ([\d.]+)x$", r.stdout, re.M)
    from mixq.formats import build_plan

    # the formats the default mix's plan holds, read from headers
    plan = build_plan(_config(default_model_root / "default-mix.yaml"))
    want = {t.spec.family for t in plan.tensors.values()}
    assert mem and {f.split()[0] for f in mem.group(1).split(", ")} == want and len(want) >= 2
    assert float(mem.group(2)) > 1.5  # the default mix is mostly 8-bit or less
    assert "loading weights" in r.stderr
