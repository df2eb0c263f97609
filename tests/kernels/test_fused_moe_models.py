"""Real MoE checkpoints (llm-compressor / GPTQModel fixtures) through the whole model: the
fused MoE path gives the logits of the per-expert reference path, for each checkpoint and
for a mix whose experts are each in their own format (AWQ smoothing compensation included)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from mixq.config.schema import MixedPrecisionConfig
from mixq.engine.model_runner import ModelRunner, SeqChunk
from mixq.formats import build_plan, load_weights
from mixq.formats.spec import QuantizedWeight
from mixq.kernels import wna16
from mixq.layers.moe import SparseMoE
from mixq.models import build_model, load_model_weights
from tests.devices import DEVICE

FIX = Path(__file__).parents[1] / "fixtures"
pytestmark = pytest.mark.skipif(wna16.triton is None, reason="triton not installed")
B = "model.layers.*.mlp.experts"
Q = FIX / "tiny-qwen3-moe"
MIX = {"fp16_path": str(Q / "bf16"), "fp8_path": str(Q / "fp8-dynamic"), "int8_path": str(Q / "w8a16-int8"),
       "gptq_int4_path": str(Q / "gptq-legacy-4bit"), "awq_int4_path": str(Q / "awq-gemm"),
       "weight_mapping": {f"{B}.0.*": "fp8", f"{B}.1.*": "gptq_int4", f"{B}.2.*": "awq_int4",
                          f"{B}.3.gate_proj.weight": "gptq_int4", f"{B}.3.up_proj.weight": "fp8",
                          f"{B}.3.down_proj.weight": "int8"}}


def logits(plan, fused: bool, monkeypatch) -> tuple[torch.Tensor, list]:
    if fused:
        monkeypatch.setenv("MIXQ_TRITON_INTERPRET_METHODS", "1")
    else:
        monkeypatch.delenv("MIXQ_TRITON_INTERPRET_METHODS", raising=False)
    model = build_model(plan.model_config, DEVICE)
    moes = [m for m in model.modules() if isinstance(m, SparseMoE)]
    for m in moes:
        m.use_fused = fused
    weights = load_weights(plan, device=DEVICE).values()
    if not fused:  # the fused path computes 8-bit weights weight-only (the GPU methods up to M = 64,
        # the fused MoE always); the CPU methods would quantize FP8-dynamic inputs as the scheme says
        weights = [QuantizedWeight(w.name, replace(w.spec, activation="none"), w.shape, w.tensors, w.input_scale)
                   for w in weights]
    load_model_weights(model, weights, torch.float32)
    assert moes and all((m.fused_plan is not None) == fused for m in moes)
    runner = ModelRunner(model, num_blocks=16, block_size=8, dtype=torch.float32, device=DEVICE)
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (9, 3)]
    chunks = [SeqChunk(p, 0, [2 * i, 2 * i + 1]) for i, p in enumerate(prompts)]
    first = runner.forward(chunks).cpu()
    nxt = first.argmax(-1).tolist()
    second = runner.forward([SeqChunk([t], len(p), c.block_table) for t, p, c in zip(nxt, prompts, chunks)]).cpu()
    return torch.cat([first, second]), moes


@pytest.mark.parametrize("variant", ["tiny-qwen3-moe/bf16", "tiny-qwen3-moe/fp8-dynamic",
                                     "tiny-qwen3-moe/gptq-legacy-4bit", "tiny-qwen3-moe/gptq-w4a16",
                                     "tiny-qwen3-moe/awq-gemm", "tiny-qwen3-moe/w8a16-int8",
                                     "tiny-mixtral/bf16", "tiny-mixtral/gptq-w4a16", "mix"])
def test_fused_model_matches_reference_path(variant, monkeypatch):
    if variant == "mix":
        plan = build_plan(MixedPrecisionConfig.from_dict({"mixed_precision": MIX}))
        assert plan.input_scales  # AWQ expert 2's gate/up carry smoothing compensation
    else:
        plan = build_plan(model_path=str(FIX / variant))
    ref, _ = logits(plan, False, monkeypatch)
    out, moes = logits(plan, True, monkeypatch)
    if variant == "mix":  # 4 w13 launches (one split gate/up) and 4 w2 formats per layer
        p = moes[0].fused_plan
        assert (len(p.w13), len(p.w2)) == (5, 4), [(la.mode, la.f0, la.f1) for la in p.w13]
    # fp32 model: both paths compute with exactly dequantized weights and fp32 sums;
    # they differ only in summation order (~1e-6 on logits of size ~1)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
