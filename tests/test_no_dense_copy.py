"""Loading keeps every quantized weight compressed: no dequantization runs from plan to a
loaded model, the model holds exactly the checkpoint's packed tensors (on the CPU
reference path), forward keeps no dense copy, and the memory stats are those bytes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mixq.config.schema import MixedPrecisionConfig
from mixq.engine.model_runner import ModelRunner, SeqChunk
from mixq.formats import build_plan, iter_weights
from mixq.formats.awq import AWQReader
from mixq.formats.compressed_tensors import CtPackedDequant
from mixq.formats.dense import DenseReader
from mixq.formats.fp8 import FP8Dequant
from mixq.formats.gptq import GPTQReader
from mixq.formats.int8 import Int8Dequant
from mixq.formats.spec import QuantizedWeight
from mixq.models import build_model, load_model_weights
from mixq.models.registry import held_weights
from tests.devices import DEVICE

ROOT = Path(__file__).parents[1]
FIX = ROOT / "tests" / "fixtures"
MOE = FIX / "tiny-qwen3-moe"
CONFIGS = {
    "llama-example-mix": lambda: MixedPrecisionConfig.from_yaml(ROOT / "examples" / "tiny-llama-mix.yaml"),
    "qwen3-moe-experts": lambda: MixedPrecisionConfig.from_dict({"mixed_precision": {
        "fp16_path": str(MOE / "bf16"), "fp8_path": str(MOE / "fp8-dynamic"), "int8_path": str(MOE / "w8a16-int8"),
        "gptq_int4_path": str(MOE / "gptq-legacy-4bit"), "awq_int4_path": str(MOE / "awq-gemm"),
        "weight_mapping": {"model.layers.*.mlp.experts.*.weight": "gptq_int4",
                           "model.layers.*.mlp.experts.0.*.weight": "fp8",
                           "model.layers.0.mlp.experts.1.down_proj.weight": "int8",
                           "model.layers.*.self_attn.[qk]_proj.weight": "fp8"}}}),
}
DEQUANTIZERS = (DenseReader, FP8Dequant, Int8Dequant, CtPackedDequant, GPTQReader, AWQReader)


def _is_dense_copy(t: torch.Tensor, shape) -> bool:
    """A floating tensor of 2+ bytes per element covering the whole [N, K] weight."""
    return t.is_floating_point() and t.element_size() >= 2 and t.numel() >= shape[0] * shape[1]


def _load(cfg, dtype):
    plan = build_plan(cfg)
    model = build_model(plan.model_config, DEVICE)
    load_model_weights(model, iter_weights(plan, device=DEVICE), dtype)
    return plan, model


@pytest.mark.parametrize("name", list(CONFIGS))
def test_loading_never_dequantizes_and_holds_the_packed_bytes(name, monkeypatch):
    cfg = CONFIGS[name]()

    def boom(*a, **k):
        raise AssertionError("a weight was dequantized while loading")

    with monkeypatch.context() as m:
        for cls in DEQUANTIZERS:
            m.setattr(cls, "dequantize", boom)
        m.setattr(QuantizedWeight, "dequantize", boom)
        plan, model = _load(cfg, torch.float32)
        held = held_weights(model)

    quantized = [n for n, t in plan.tensors.items() if t.spec.is_quantized]
    assert len(quantized) >= 14 and {plan.tensors[n].spec.layout for n in quantized} >= {"fp8", "gptq"}
    methods = {m.weight.name: m.method.name for m in model.modules()
               if isinstance(getattr(m, "weight", None), QuantizedWeight) and getattr(m, "method", None)}
    for n in quantized:
        t, w = plan.tensors[n], held[n]
        assert w.spec == t.spec, n
        assert not any(_is_dense_copy(x, t.entry.shape) for x in w.tensors.values()), n
        if DEVICE != "cpu":
            continue
        packed = w.nbytes - (0 if w.input_scale is None else w.input_scale.nbytes)
        if methods[n] == "torch-dequant":  # the reference keeps the checkpoint layout as stored
            stored = plan.catalog(t).read(n)
            assert w.tensors.keys() == stored.tensors.keys(), n
            assert all(torch.equal(w.tensors[r], stored.tensors[r]) for r in w.tensors), n
            assert packed == t.nbytes, n
        else:  # a CPU kernel's layout: the same bits a weight, larger (fp32 here) scale tables
            assert packed <= 1.4 * t.nbytes, (n, methods[n], packed, t.nbytes)
    if DEVICE == "cpu":
        assert set(methods.values()) >= {"cpu-int4pack", "cpu-fp8"}

    # Forward dequantizes transiently (CPU reference) but keeps nothing dense afterwards.
    before = {n: {r: (x.data_ptr(), x.nbytes) for r, x in held[n].tensors.items()} for n in quantized}
    runner = ModelRunner(model, num_blocks=8, block_size=8, dtype=torch.float32, device=DEVICE)
    logits = runner.forward([SeqChunk([1, 5, 9, 2, 7], 0, [0])])
    assert torch.isfinite(logits).all()
    after = held_weights(model)
    assert {n: {r: (x.data_ptr(), x.nbytes) for r, x in after[n].tensors.items()} for n in quantized} == before
    big = [f"{mn}.{a}" for mn, mod in model.named_modules() for a, v in vars(mod).items()
           if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() == 2 and a != "weight"
           and any(v.shape == tuple(plan.tensors[q].entry.shape) for q in quantized)]
    assert big == [], f"dense copies kept on modules: {big[:3]}"


def test_memory_stats_are_the_bytes_the_model_holds(monkeypatch):
    """The engine's stats against an independent count from the checkpoint headers: packed
    bytes for quantized weights (+ their float32 smoothing vector), numel x 4 for what the
    CPU engine holds dense in float32; BF16 baseline = 2 bytes per logical element. (The
    CPU kernels repack: with them the stats are the bytes of their layouts.)"""
    from mixq.engine.engine import LLM
    from mixq.tracking.memory import MB, get_mixed_precision_memory_stats

    if DEVICE != "cpu":
        pytest.skip("the exact count is for the CPU reference layout; GPU methods repack")
    import mixq.layers.linear as linear

    kernels = LLM(mixed_precision_config=str(ROOT / "examples" / "tiny-llama-mix.yaml"), device="cpu",
                  dtype="float32", max_total_tokens=256)
    # with the CPU kernels the stats are the bytes their repacked layouts hold
    repacked = get_mixed_precision_memory_stats()
    assert repacked["memory_mb"] * MB == pytest.approx(sum(w.nbytes for w in kernels.engine.weights.values()))
    del kernels
    # the reference layout is the checkpoint's: its bytes can be counted from the headers
    monkeypatch.setattr(linear, "METHODS", [linear.DenseMethod(), linear.TorchDequantMethod()])
    llm = LLM(mixed_precision_config=str(ROOT / "examples" / "tiny-llama-mix.yaml"), device="cpu", dtype="float32",
              max_total_tokens=256)
    stats = get_mixed_precision_memory_stats()
    plan = llm.engine.plan
    want: dict[str, int] = {}
    bf16 = 0
    for n, t in plan.tensors.items():
        if t.spec.is_quantized:
            extra = 4 * t.entry.shape[1] if n in plan.input_scales else 0
            want[t.spec.family] = want.get(t.spec.family, 0) + t.nbytes + extra
        else:
            want["fp32"] = want.get("fp32", 0) + 4 * t.numel
        bf16 += 2 * t.numel
    held = sum(want.values())
    assert {k: round(v["memory_mb"] * MB) for k, v in stats["by_format"].items()} == want
    assert stats["memory_saved_mb"] == pytest.approx((bf16 - held) / MB)
    assert stats["compression_ratio"] == pytest.approx(bf16 / held)
    assert stats["num_tensors"] == len(plan.tensors)
