"""FP8 / INT8 LinearMethods through MixedPrecisionLinear on checkpoints made by the real tools
(llm-compressor FP8 dynamic/static/block, DeepSeek-style block FP8, W8A8 and W8A16 INT8),
against the torch reference method and against a reference that quantizes activations the
way the method does."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mixq.errors import CheckpointError, UnsupportedFormatError
from mixq.formats import CheckpointCatalog
from mixq.formats.spec import QuantizedWeight, WeightSpec
from mixq.kernels import wna16
from mixq.kernels.quant import quant_reference
from mixq.kernels.w8_methods import FP8Method, Int8Method
from mixq.kernels.w8a8 import w8a8_reference
from mixq.layers.linear import MixedPrecisionLinear, select_method

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
FIX = Path(__file__).parents[1] / "fixtures" / "tiny-llama"
NAMES = ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight")
pytestmark = pytest.mark.skipif(wna16.triton is None, reason="triton not installed")


def rel_err(y, ref):
    return float((y.double() - ref.double()).norm() / ref.double().norm())


def load(qw: QuantizedWeight, monkeypatch) -> MixedPrecisionLinear:
    monkeypatch.setenv("MIXQ_TRITON_INTERPRET_METHODS", "1")
    lin = MixedPrecisionLinear(qw.shape[1], qw.shape[0])
    lin.load(qw.to(DEV), torch.bfloat16)
    return lin


def weight_only_reference(qw: QuantizedWeight, x: torch.Tensor) -> torch.Tensor:
    """Float64 x @ dequantize(w)^T, activations as given (the methods' weight-only path;
    TorchDequantMethod quantizes them as the checkpoint's scheme says)."""
    return x.double() @ qw.dequantize(torch.float64).to(DEV).t()


def same_quant_reference(qw: QuantizedWeight, x: torch.Tensor) -> torch.Tensor:
    """Float64 product with the activation quantized as the W8A8 path does it."""
    spec, t = qw.spec, qw.tensors
    int8 = spec.layout == "int8"
    static = t["input_scale"].float().reshape(1).to(x.device) if spec.activation == "static-tensor" else None
    group = spec.block_size[1] if spec.scale_layout == "block" and static is None else 0
    a, sa = quant_reference(x, group=group, static_scale=static, to_int8=int8)
    w = qw.dequantize(torch.float64).to(DEV)
    return w8a8_reference(a, sa, w, torch.ones(w.shape[0], device=DEV, dtype=torch.float64), act_group=group)


@pytest.mark.parametrize("variant,method", [("fp8-dynamic", "triton-fp8"), ("fp8-static", "triton-fp8"),
                                            ("fp8-block", "triton-fp8"), ("fp8-block-deepseek", "triton-fp8"),
                                            ("w8a8-int8", "triton-int8"), ("w8a16-int8", "triton-int8")])
def test_method_on_real_checkpoints(variant, method, monkeypatch):
    cat = CheckpointCatalog(FIX / variant)
    gen = torch.Generator().manual_seed(len(variant))
    for name in NAMES:
        qw = cat.read(name)
        lin = load(qw, monkeypatch)
        assert lin.method.name == method
        # still 8 bits a weight: only the scales may grow (a per-tensor scale becomes [N] fp32)
        assert lin.weight.nbytes <= qw.nbytes + 4 * qw.shape[0]
        # calibrated static scales cover |x| <= 448 * input_scale: stay mostly inside
        amp = float(qw.tensors["input_scale"].float()) * 448 / 4 if "input_scale" in qw.tensors else 1.0
        for m in (1, 5, 17) if not CUDA else (1, 5, 17, 100, 257):
            monkeypatch.setattr(type(lin.method), "weight_only_max_m", 64 if CUDA else 4)
            x = (torch.randn(m, qw.shape[1], generator=gen) * amp).bfloat16().to(DEV)
            y = lin(x)
            ref = weight_only_reference(qw, x)
            assert y.dtype == torch.bfloat16 and y.shape == (m, qw.shape[0])
            if m <= lin.method.weight_only_max_m or qw.spec.activation == "none":
                # weight-only: exact 8-bit weights, bf16 activations, bf16 output rounding
                assert rel_err(y, ref) < 5e-3, (name, m)
            else:
                # activation quantization: fp8 e4m3 (3 mantissa bits) ~3% rms, int8 per token ~1%
                assert rel_err(y, ref) < (0.05 if qw.spec.layout == "fp8" else 0.02), (name, m)
                assert rel_err(y, same_quant_reference(qw, x)) < 5e-3, (name, m)


def test_static_input_scale_is_honoured(monkeypatch):
    qw = CheckpointCatalog(FIX / "fp8-static").read(NAMES[0])
    lin = load(qw, monkeypatch)
    monkeypatch.setattr(type(lin.method), "weight_only_max_m", 0)
    gen = torch.Generator().manual_seed(4)
    lim = float(qw.tensors["input_scale"].float()) * 448
    x = (torch.randn(9, qw.shape[1], generator=gen) * lim / 2).bfloat16().to(DEV)  # ~5% beyond the static range
    y = lin(x)
    static = same_quant_reference(qw, x)
    a, sa = quant_reference(x)  # what a dynamic per-token quantization would give
    w = qw.dequantize(torch.float64).to(DEV)
    dynamic = w8a8_reference(a, sa, w, torch.ones(w.shape[0], device=DEV, dtype=torch.float64))
    assert rel_err(y, static) < 5e-3
    assert rel_err(dynamic, static) > 0.03  # the two differ well beyond the tolerance above


def int8_weight(n, k, gen, zero_point=True, activation="dynamic-token"):
    spec = WeightSpec(layout="int8", bits=8, dtype=torch.int8, scale_layout="channel",
                      symmetric=not zero_point, activation=activation)
    q = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
    t = {"weight": q, "weight_scale": (torch.rand(n, 1, generator=gen) * 1e-3).bfloat16()}
    if zero_point:
        t["weight_zero_point"] = torch.randint(-40, 40, (n, 1), generator=gen, dtype=torch.int8)
    return QuantizedWeight("layers.0.mlp.up_proj.weight", spec, (n, k), t)


@pytest.mark.parametrize("activation", ["dynamic-token", "none"])
def test_asymmetric_int8_weights(activation, monkeypatch):
    gen = torch.Generator().manual_seed(6)
    qw = int8_weight(72, 136, gen, activation=activation)
    lin = load(qw, monkeypatch)
    assert "weight_zero_point" in lin.weight.tensors
    monkeypatch.setattr(type(lin.method), "weight_only_max_m", 2)
    for m in (1, 3, 19):
        x = torch.randn(m, 136, generator=gen).bfloat16().to(DEV)
        ref = weight_only_reference(qw, x)
        # weight-only: output rounding only; per-token int8 activations: ~1%
        assert rel_err(lin(x), ref) < (5e-3 if m <= 2 or activation == "none" else 0.02), m


def test_method_traces_without_graph_breaks(monkeypatch):
    """torch.compile(fullgraph) sees the kernels as ops with fake impls (no graph break)."""
    qw = CheckpointCatalog(FIX / "fp8-block").read(NAMES[1])
    lin = load(qw, monkeypatch)
    monkeypatch.setattr(type(lin.method), "weight_only_max_m", 2)
    compiled = torch.compile(lin, backend="eager", fullgraph=True, dynamic=False)
    gen = torch.Generator().manual_seed(8)
    for m in (1, 3):
        x = torch.randn(m, qw.shape[1], generator=gen).bfloat16().to(DEV)
        # the same kernels either way; split-K fp32 atomics may order sums differently (GPU)
        assert rel_err(compiled(x), lin(x)) < 4e-3


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
def test_cuda_graph_capture_matches_eager():
    qw = CheckpointCatalog(FIX / "fp8-dynamic").read(NAMES[1])
    lin = MixedPrecisionLinear(qw.shape[1], qw.shape[0])
    lin.load(qw.to(DEV), torch.bfloat16)
    for m in (1, 257):
        x = torch.randn(m, qw.shape[1], device=DEV).bfloat16()
        eager = lin(x)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            lin(x)  # warm-up (compiles) outside the capture
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = lin(x)
        g.replay()
        torch.cuda.synchronize()
        assert rel_err(out, eager) < 4e-3  # split-K atomics may order the fp32 sums differently


def test_refusals_name_the_reason(monkeypatch):
    fp8, i8 = FP8Method(), Int8Method()
    spec = WeightSpec(layout="fp8", bits=8, dtype=torch.float8_e4m3fn, scale_layout="channel")
    ok, why = i8.can_implement(spec, DEV)
    assert not ok and "is not int8" in why
    ok, why = fp8.can_implement(WeightSpec(layout="int8", bits=8, dtype=torch.int8, scale_layout="channel"), DEV)
    assert not ok and "is not fp8" in why
    if not CUDA:
        monkeypatch.delenv("MIXQ_TRITON_INTERPRET_METHODS", raising=False)
        ok, why = fp8.can_implement(spec, DEV)
        assert not ok and "needs a CUDA device" in why
        # and the layer then takes the CPU's own FP8 kernel, saying so through its method
        assert select_method(spec, DEV).name == "cpu-fp8"
    monkeypatch.setenv("MIXQ_TRITON_INTERPRET_METHODS", "1")
    assert select_method(spec, DEV).name == "triton-fp8"
    odd_block = WeightSpec(layout="fp8", bits=8, dtype=torch.float8_e4m3fn, scale_layout="block", block_size=(128, 96))
    ok, why = fp8.can_implement(odd_block, DEV)
    assert not ok and "blocks along K of 96" in why
    grouped_act = WeightSpec(layout="int8", bits=8, dtype=torch.int8, scale_layout="channel", activation="dynamic-group")
    ok, why = i8.can_implement(grouped_act, DEV)
    assert not ok and "activation scheme dynamic-group" in why
    asym_group = WeightSpec(layout="int8", bits=8, dtype=torch.int8, scale_layout="group", group_size=128,
                            symmetric=False)
    ok, why = i8.can_implement(asym_group, DEV)
    assert not ok and "asymmetric int8 with group scales" in why


def test_prepare_refuses_inconsistent_checkpoints(monkeypatch):
    gen = torch.Generator().manual_seed(7)
    qw = CheckpointCatalog(FIX / "fp8-static").read(NAMES[0])
    no_scale = QuantizedWeight(qw.name, qw.spec, qw.shape, {k: v for k, v in qw.tensors.items() if k != "input_scale"})
    with pytest.raises(CheckpointError, match="q_proj.weight: static activation quantization but no input_scale"):
        FP8Method().prepare(no_scale, torch.bfloat16)
    blk = CheckpointCatalog(FIX / "fp8-block").read(NAMES[1])
    bad = QuantizedWeight(blk.name, blk.spec, blk.shape, {**blk.tensors, "weight_scale": torch.ones(1, 3)})
    with pytest.raises(CheckpointError, match=r"down_proj.weight: weight_scale shape \[1, 3\] does not fit"):
        FP8Method().prepare(bad, torch.bfloat16)
    static = int8_weight(16, 64, gen, zero_point=False, activation="static-tensor")
    static.tensors.update(input_scale=torch.ones(1), input_zero_point=torch.tensor([3], dtype=torch.int8))
    with pytest.raises(UnsupportedFormatError, match="up_proj.weight: asymmetric static activation"):
        Int8Method().prepare(static, torch.bfloat16)
