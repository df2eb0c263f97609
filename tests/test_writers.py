"""Our RTN writers produce checkpoints that our readers and the format's own library read
identically, and that stay within half a quantization step of the dense weights."""

from __future__ import annotations

import pytest
import torch
from compressed_tensors.compressors.base import BaseCompressor
from compressed_tensors.quantization import QuantizationScheme

from mixq.formats import CheckpointCatalog
from mixq.formats.writers import quantize_checkpoint
from tests.ckpt_utils import dense_tensors, linear_shapes, llama_config, write_checkpoint

CFG = llama_config(hidden=128, inter=192, layers=2)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("w")
    write_checkpoint(root / "bf16", dense_tensors(CFG, seed=4), CFG)
    return root


def rtn_reference(w: torch.Tensor, bits: int, group: int, sym: bool) -> torch.Tensor:
    """Float64 RTN written independently of the writer: per (row, group) scale, zero."""
    n, k = w.shape
    g = w.double().reshape(n, k // group, group)
    qmax = 2**bits - 1
    if sym:
        scale = (g.abs().amax(-1) / (qmax / 2)).half().double()  # scales are stored in fp16
        zero = torch.full_like(scale, 2 ** (bits - 1))
    else:
        lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
        scale = ((hi - lo) / qmax).half().double()
        zero = torch.round(-lo / ((hi - lo) / qmax))
    q = torch.clamp(torch.round(g / scale[..., None]) + zero[..., None], 0, qmax)
    return ((q - zero[..., None]) * scale[..., None]).reshape(n, k)


@pytest.mark.parametrize("fmt", ["gptq", "awq"])
def test_int4_writers_equal_an_independent_rtn(base, fmt):
    out = quantize_checkpoint(base / "bf16", base / fmt, fmt, group_size=64)
    cat, dense = CheckpointCatalog(out), CheckpointCatalog(base / "bf16")
    for name in linear_shapes(CFG):
        w = dense.read(name).tensors["weight"]
        ref = rtn_reference(w, 4, 64, sym=fmt == "gptq")
        got = cat.read(name).dequantize().double()
        # the same integer grid: equal up to float rounding, except values sitting exactly
        # on a rounding tie, which may land one step away (at most 0.1% of them)
        assert (got - ref).abs().le(1e-6).float().mean() > 0.999, name
        # within half a step (range / 15 per group, bounded by the tensor's range / 7.5)
        assert ((got - w.double()).abs() <= 0.5 * (2 * w.double().abs().amax() / 15) * 1.01).all(), name


@pytest.mark.parametrize("fmt", ["fp8", "int8"])
def test_compressed_tensors_writers_match_the_library(base, fmt):
    out = quantize_checkpoint(base / "bf16", base / fmt, fmt)
    cat = CheckpointCatalog(out)
    qc = cat.ckpt.quantization_config
    group = qc["config_groups"]["group_0"]
    compressor = BaseCompressor.get_value_from_registry(qc["format"])
    dense = CheckpointCatalog(base / "bf16")
    for name in linear_shapes(CFG):
        e = cat.entries[name]
        assert e.spec.layout == fmt and e.spec.activation == "dynamic-token"
        mod = name.removesuffix(".weight")
        local = {"weight": cat.ckpt.read(f"{mod}.weight"), "weight_scale": cat.ckpt.read(f"{mod}.weight_scale")}
        theirs = compressor.decompress(local, QuantizationScheme.model_validate(group))["weight"].float()
        ours = cat.read(name).dequantize()
        torch.testing.assert_close(ours.to(theirs.dtype), theirs, rtol=2**-8, atol=1e-12)
        w = dense.read(name).tensors["weight"].float()
        amax = w.abs().amax(1, keepdim=True)
        # fp8 e4m3: 3 mantissa bits (relative 2**-4 of the value, plus subnormals near 0);
        # int8: half a step of amax / 127
        tol = (w.abs() * 2**-4 + amax / 448 * 2**-3) if fmt == "fp8" else amax / 127 * 0.5 * 1.01
        assert ((ours - w).abs() <= tol + 1e-6).all(), name
