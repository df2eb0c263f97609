"""On the CPU the engine computes the model each checkpoint defines: W8A8 and FP8 schemes
quantize their activations (logits against the scheme's reference), and the CPU kernels
leave the greedy outputs of the reference compute unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

import mixq.layers.linear as linear
from mixq.engine.engine import LLM
from mixq.engine.sampling_params import SamplingParams

FIX = Path(__file__).parents[1] / "fixtures"
IDS = torch.randint(3, 256, (40,), generator=torch.Generator().manual_seed(0)).tolist()


def mixq_logits(path: Path) -> torch.Tensor:
    llm = LLM(model_path=str(path), device="cpu", dtype="float32", max_total_tokens=64, page_size=16)
    return llm.engine.runner.score(IDS, [0, 1, 2]).double()  # [T, vocab]


@torch.no_grad()
def hf_logits(model) -> torch.Tensor:
    return model(torch.tensor([IDS])).logits[0].double()


def _act_quant_off(model) -> None:
    for m in model.modules():
        if hasattr(m, "quantization_scheme"):
            m.quantization_enabled = False


@pytest.mark.parametrize("variant", ["fp8-dynamic", "fp8-static", "fp8-block"])
def test_fp8_schemes_match_transformers_with_compressed_tensors(variant):
    """transformers + compressed-tensors run the scheme (FP8 per token, static per tensor,
    per 1 x 128 group; scale amax / 448, round to nearest even). Same rule, fp32 on both
    sides: only summation order differs (1e-6); one e4m3 code flipped at a rounding tie
    would move a logit by ~1e-3, still 10x below the activation quantization's effect."""
    path = FIX / "tiny-llama" / variant
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ref = hf_logits(hf)
    ours = mixq_logits(path)
    assert (ours - ref).abs().max() < 1e-3
    _act_quant_off(hf)
    weight_only = hf_logits(hf)
    assert (weight_only - ref).abs().max() > 1e-2  # the test can tell the two models apart


def _int8_per_token(x: torch.Tensor) -> torch.Tensor:
    """Per-token symmetric INT8, float64: s = amax / 127, round half away from zero (vLLM's
    and the GPU kernels' rule; compressed-tensors' own fake-quant divides by 127.5 and
    rounds half to even, a different rounding of the same scheme)."""
    xd = x.double()
    s = xd.abs().amax(-1, keepdim=True).clamp(min=1e-10) / 127
    y = (xd / s).clamp(-127, 127)
    return (torch.sign(y) * torch.floor(y.abs() + 0.5) * s).to(x.dtype)


def test_w8a8_int8_matches_transformers_with_per_token_int8_inputs():
    path = FIX / "tiny-llama" / "w8a8-int8"
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    _act_quant_off(hf)
    weight_only = hf_logits(hf)
    hooks = [m.register_forward_pre_hook(lambda mod, args: (_int8_per_token(args[0]),))
             for m in hf.modules() if getattr(m, "quantization_scheme", None) is not None]
    assert len(hooks) == 14  # 7 Linears x 2 layers (lm_head is not quantized)
    ref = hf_logits(hf)
    ours = mixq_logits(path)
    assert (ours - ref).abs().max() < 1e-3
    assert (weight_only - ref).abs().max() > 3e-3


# (variant, attention layers whose q/k/v merge): fp8-block's k/v (64 rows) are not whole
# 128-row scale blocks; the MoE's q/k/v (64/32/32 rows) are not whole 64-row int4 blocks
@pytest.mark.parametrize("variant,merges", [("tiny-llama/gptq-legacy-4bit-desc-act", 2), ("tiny-llama/awq-gemm", 2),
                                            ("tiny-llama/w8a8-int8", 2), ("tiny-llama/fp8-block", 0),
                                            ("tiny-qwen3-moe/gptq-w4a16", 0), ("tiny-qwen3-moe/fp8-dynamic", 2)])
def test_greedy_outputs_equal_the_reference_compute(variant, merges, monkeypatch):
    """The same checkpoint, greedy, float32: CPU kernels, with q/k/v and gate/up merged where
    the formats agree (mixq.layers.merged), vs the dequantize-every-forward reference (the
    methods list without the kernels; it has no merge rule, so every projection is separate)."""
    prompts = [[5, 9, 33, 100, 7], list(range(40, 70))]
    sp = SamplingParams(max_new_tokens=10, temperature=0, ignore_eos=True)

    def run():
        llm = LLM(model_path=str(FIX / variant), device="cpu", dtype="float32", max_total_tokens=256)
        mods = list(llm.engine.model.modules())
        kinds = {m.method.name for m in mods if getattr(m, "method", None) is not None}
        merged = sum(getattr(m, "qkv_proj", None) is not None for m in mods)
        return [o.outputs[0].token_ids for o in llm.generate(prompts, sp)], kinds, merged

    fast, kinds, merged = run()
    assert kinds & {"cpu-int4pack", "cpu-int8pack", "cpu-fp8"}
    assert merged == merges  # where the formats and layouts allow, q/k/v are one CPU GEMM
    monkeypatch.setattr(linear, "METHODS", [linear.DenseMethod(), linear.TorchDequantMethod()])
    slow, kinds, merged = run()
    assert kinds == {"dense", "torch-dequant"} and merged == 0
    assert fast == slow
