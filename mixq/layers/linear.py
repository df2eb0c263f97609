"""MixedPrecisionLinear: a Linear whose weight stays in its stored format.

The layer holds a `QuantizedWeight` and a *method* chosen for the weight's spec on the
device it lives on. Methods are tried in order; each answers `can_implement(spec, device)
-> (ok, reason)`, and when none can, the error lists every refusal. The kernels issue
registers GPU methods ahead of the torch reference methods in `METHODS`.

The reference method computes on CPU (or any device) by dequantizing the weight
transiently inside forward; it never keeps a dense copy.
"""

from __future__ import annotations

import logging
import os
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from mixq.formats.registry import reader_for_layout
from mixq.formats.spec import QuantizedWeight, WeightSpec, dense_spec
from mixq.kernels import dense
from mixq.kernels.cpu_methods import CPUFP8Method, CPUInt4Method, CPUInt8Method, CPUQ80Method
from mixq.kernels.cpu_quant import quantize_input
from mixq.kernels.methods import GGMLMethod, MMAW4A16Method, WNA16Method
from mixq.kernels.w8_methods import FP8Method, Int8Method

log = logging.getLogger("mixq.layers")


class LinearMethod(Protocol):
    """How a Linear computes with a weight of some spec on some device."""

    name: str

    def can_implement(self, spec: WeightSpec, device: torch.device) -> tuple[bool, str]: ...

    def prepare(self, weight: QuantizedWeight, dtype: torch.dtype) -> QuantizedWeight:
        """Once after loading: repack into the method's layout (still compressed)."""
        ...

    def apply(self, weight: QuantizedWeight, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor: ...


class DenseMethod:
    """Dense weights: held in the model dtype, computed by F.linear (cuBLAS on GPU; one CPU
    row of bf16/fp16 by torch.mv, see mixq.kernels.dense)."""

    name = "dense"

    def can_implement(self, spec: WeightSpec, device: torch.device) -> tuple[bool, str]:
        return (spec.layout == "dense", "" if spec.layout == "dense" else "not a dense weight")

    def prepare(self, weight: QuantizedWeight, dtype: torch.dtype) -> QuantizedWeight:
        w = weight.tensors["weight"]
        if w.dtype != dtype:
            weight = QuantizedWeight(weight.name, dense_spec(dtype), weight.shape, {"weight": w.to(dtype)})
        return weight

    def apply(self, weight, x, bias):
        return dense.linear(x, weight.tensors["weight"], bias)


class TorchDequantMethod:
    """Reference compute for every quantized layout: dequantize inside forward, then
    F.linear. Correct everywhere, fast nowhere; the CPU path and the test oracle."""

    name = "torch-dequant"

    def can_implement(self, spec: WeightSpec, device: torch.device) -> tuple[bool, str]:
        if not spec.is_quantized:
            return False, "weight is dense"
        if device.type == "cuda" and os.environ.get("MIXQ_ALLOW_REFERENCE_COMPUTE") != "1":
            # on a GPU every format runs in a kernel made for it: a spec no kernel takes is an
            # error naming it, not a slow dequantize-every-forward path nobody asked for
            return False, ("the torch reference (dequantize every forward) runs on CPUs; on cuda set "
                           "MIXQ_ALLOW_REFERENCE_COMPUTE=1 to accept it for this spec")
        return True, ""

    def prepare(self, weight: QuantizedWeight, dtype: torch.dtype) -> QuantizedWeight:
        return weight

    def apply(self, weight, x, bias):
        w = reader_for_layout(weight.spec.layout).dequantize(weight).to(x.dtype)
        if weight.spec.activation != "none":  # W8A8 / FP8 schemes quantize their inputs (per token, ...)
            static = weight.tensors.get("input_scale")
            x2 = quantize_input(x.reshape(-1, x.shape[-1]), weight.spec, None if static is None else static.float())
            x = x2.to(x.dtype).reshape(x.shape)
        return F.linear(x, w, bias)


# Tried in order: the kernels made for a format first (GPU, then CPU), the torch reference last.
METHODS: list[LinearMethod] = [MMAW4A16Method(), WNA16Method(), GGMLMethod(), FP8Method(), Int8Method(), CPUInt4Method(),
                               CPUInt8Method(), CPUFP8Method(), CPUQ80Method(), DenseMethod(), TorchDequantMethod()]


def select_method(spec: WeightSpec, device: torch.device, name: str = "", weight: QuantizedWeight | None = None,
                  dtype: torch.dtype | None = None) -> LinearMethod:
    """The first method that can implement `spec` on `device` (and, for methods with a
    `can_implement_weight(weight, dtype)` check, this weight's shape and layout); else a
    ValueError that lists each method's reason."""
    reasons = []
    for m in METHODS:
        ok, why = m.can_implement(spec, device)
        if ok and weight is not None and hasattr(m, "can_implement_weight"):
            ok, why = m.can_implement_weight(weight, dtype)
        if ok:
            log.debug("%s: %s on %s -> %s", name or "linear", spec.describe(), device, m.name)
            return m
        reasons.append(f"{m.name}: {why}")
    raise ValueError(f"{name or 'linear'}: no kernel implements {spec.describe()} on {device}: " + "; ".join(reasons))


def takes_fp8_act(method, weight, input_scale, m: int, dtype: torch.dtype) -> bool:
    """A method that quantizes its input to FP8 per token at m rows (and no smoothing scale
    to apply first) takes a producer's FP8Act."""
    want = getattr(method, "wants_fp8_act", None)
    return want is not None and weight is not None and input_scale is None and want(weight, m, dtype)


class MixedPrecisionLinear(nn.Module):
    """y = x W^T + b with W in its stored format. Created empty; `load(qw)` fills it."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight: QuantizedWeight | None = None
        self.method: LinearMethod | None = None
        self.input_scale: torch.Tensor | None = None
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self.merged_into: str | None = None  # set when a MergedLinear computes this projection

    def load(self, qw: QuantizedWeight, dtype: torch.dtype) -> None:
        """Take a loaded weight; pick its method for the weight's device; repack once."""
        if tuple(qw.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"{qw.name}: shape {list(qw.shape)} does not fit a Linear of "
                f"[{self.out_features}, {self.in_features}]"
            )
        device = next(iter(qw.tensors.values())).device
        self.method = select_method(qw.spec, device, qw.name, qw, dtype)
        self.input_scale = None if qw.input_scale is None else qw.input_scale.to(dtype)
        self.weight = self.method.prepare(qw, dtype)

    def takes_fp8_act(self, m: int, dtype: torch.dtype) -> bool:
        """Whether forward at m rows would quantize its input to FP8 per token: its producer
        may then pass an FP8Act (mixq.kernels.quant_fused) instead."""
        return takes_fp8_act(self.method, self.weight, self.input_scale, m, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged_into is not None:
            raise RuntimeError(f"{self.weight.name} is computed by the merged {self.merged_into}; call that instead")
        if self.input_scale is not None:  # smoothing compensation (mixq.formats.smoothing)
            x = x * self.input_scale
        return self.method.apply(self.weight, x, self.bias)

    def extra_repr(self) -> str:
        spec = self.weight.spec.describe() if self.weight is not None else "unloaded"
        method = self.method.name if self.method is not None else "-"
        return f"in={self.in_features}, out={self.out_features}, {spec}, method={method}"
