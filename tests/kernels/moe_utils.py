"""Expert weights in every format the fused MoE computes, made from dense weights by the
RTN writers (checkpoint layouts and specs exactly as the readers produce them)."""

from __future__ import annotations

import contextlib
import os
from dataclasses import replace

import torch

from mixq.formats import writers
from mixq.formats.spec import QuantizedWeight, WeightSpec, dense_spec
from mixq.layers.moe import SparseMoE

I32 = torch.int32


def _qw(name: str, spec: WeightSpec, w: torch.Tensor, tensors: dict) -> QuantizedWeight:
    mod = name.removesuffix(".weight")
    roles = {k.removeprefix(mod + "."): v for k, v in tensors.items() if not k.endswith("weight_shape")}
    return QuantizedWeight(name, spec, tuple(w.shape), roles)


def _fp8_spec(layout: str, block=None):
    return WeightSpec("fp8", 8, torch.float8_e4m3fn, layout, block_size=block, activation="dynamic-token")


def _gptq_spec(bits, group, sym, act):
    return WeightSpec("gptq", bits, I32, "group", group_size=group, symmetric=sym, act_order=act, zero_offset=1)


def make_weight(fmt: str, name: str, w: torch.Tensor) -> QuantizedWeight:
    """`w` [N, K] float -> a QuantizedWeight of format `fmt` (see FORMATS)."""
    mod = name.removesuffix(".weight")
    if fmt in ("bf16", "fp16"):
        dt = torch.bfloat16 if fmt == "bf16" else torch.float16
        return QuantizedWeight(name, dense_spec(dt), tuple(w.shape), {"weight": w.to(dt)})
    if fmt.startswith("fp8-"):
        scheme = fmt.removeprefix("fp8-")
        block = (16, 32) if scheme == "block" else None  # small blocks: several per tiny weight
        t = writers.fp8_tensors(mod, w, scheme, block=block or (128, 128))
        return _qw(name, _fp8_spec(scheme, block), w, t)
    if fmt == "int8":
        return _qw(name, WeightSpec("int8", 8, torch.int8, "channel", activation="dynamic-token"), w,
                   writers.int8_tensors(mod, w))
    if fmt.startswith("gptq"):
        bits = 8 if "8" in fmt.removeprefix("gptq") else 4
        sym, act = "asym" not in fmt, "act" in fmt
        perm = torch.randperm(w.shape[1], generator=torch.Generator().manual_seed(w.shape[0])) if act else None
        t = writers.gptq_tensors(mod, w, bits=bits, group=32, sym=sym, perm=perm)
        qw = _qw(name, _gptq_spec(bits, 32, sym, act), w, t)
        if not act:
            del qw.tensors["g_idx"]  # the reader drops a trivial g_idx
        return qw
    if fmt == "awq":
        spec = WeightSpec("awq", 4, I32, "group", group_size=32, symmetric=False)
        return _qw(name, spec, w, writers.awq_tensors(mod, w, group=32))
    if fmt in ("ct4", "ct4-asym"):
        sym = fmt == "ct4"
        spec = WeightSpec("ct-packed", 4, I32, "group", group_size=32, symmetric=sym)
        return _qw(name, spec, w, writers.ct_packed_tensors(mod, w, 4, 32, sym))
    raise ValueError(fmt)


FORMATS = ("bf16", "fp16", "fp8-channel", "fp8-tensor", "fp8-block", "int8", "gptq4", "gptq4-asym",
           "gptq4-act", "gptq8-asym", "awq", "ct4", "ct4-asym")


def make_moe(hidden: int, inter: int, experts: int, top_k: int, formats, seed=0, dtype=torch.float32,
             device="cpu", fused=None, skip=(), local: range | None = None, weight_only: bool = False):
    """A SparseMoE whose expert e has projections in formats[e % len] = (gate, up, down) (or
    one name for all three), loaded and post-processed (fused=False: the per-expert path;
    on the CPU that is the torch reference, whatever the environment says). Returns (moe,
    dense fp64 weights). `local`: as an expert-parallel rank, only these experts are loaded
    and the layer's `local_experts` lists them (numbered from 0), as mixq.distributed does.
    weight_only: the 8-bit experts' specs drop their activation quantization (what the fused
    kernels compute; the CPU methods would quantize the activations as the scheme says)."""
    if local is not None:
        skip = set(skip) | (set(range(experts)) - set(local))
    g = torch.Generator().manual_seed(seed)
    moe = SparseMoE(hidden, inter, experts, top_k, renormalize=True).to(device)
    moe.gate.load(QuantizedWeight("gate.weight", dense_spec(torch.float32), (experts, hidden),
                                  {"weight": torch.randn(experts, hidden, generator=g).to(device)}), dtype)
    dense = {}
    for e in range(experts):
        f = formats[e % len(formats)]
        f3 = (f, f, f) if isinstance(f, str) else f
        for proj, fmt, (o, i) in zip(("gate_proj", "up_proj", "down_proj"), f3,
                                     ((inter, hidden), (inter, hidden), (hidden, inter))):
            w = torch.randn(o, i, generator=g) / i**0.5
            qw = make_weight(fmt, f"experts.{e}.{proj}.weight", w)
            if weight_only:
                qw = QuantizedWeight(qw.name, replace(qw.spec, activation="none"), qw.shape, qw.tensors)
            dense[(e, proj)] = qw.dequantize(torch.float64)  # the reference reads the CPU copy
            qw = qw.to(device)
            if e not in skip:
                getattr(moe.experts[e], proj).load(qw, dtype)
    if local is not None:
        object.__setattr__(moe, "local_experts", torch.nn.ModuleList(moe.experts[e] for e in local))
    if fused is False and torch.device(device).type == "cpu":
        with _env("MIXQ_TRITON_INTERPRET_METHODS", None):
            moe.process_weights_after_loading(False)
    else:
        moe.process_weights_after_loading(fused)
    return moe, dense


@contextlib.contextmanager
def _env(name: str, value: str | None):
    old = os.environ.get(name)
    os.environ.pop(name, None) if value is None else os.environ.__setitem__(name, value)
    try:
        yield
    finally:
        os.environ.pop(name, None) if old is None else os.environ.__setitem__(name, old)


def moe_float64(x: torch.Tensor, ids: torch.Tensor, wts: torch.Tensor, dense: dict, skip=()) -> torch.Tensor:
    """Float64 reference of the routed experts on dequantized weights."""
    x = x.double().cpu()
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if e in skip:
                continue
            h = torch.nn.functional.silu(dense[(e, "gate_proj")] @ x[t]) * (dense[(e, "up_proj")] @ x[t])
            out[t] += float(wts[t, j]) * (dense[(e, "down_proj")] @ h)
    return out
