"""LinearMethods for FP8 and INT8 weights (stored unpacked, [N, K] 8-bit + scales).

`prepare` keeps the 8-bit weight exactly as stored and only normalises its scales to fp32
(per channel [N], a per-tensor scale expanded; or the [ceil(N/bn), ceil(K/bk)] grid of a
block / group layout), plus the static input scale where the checkpoint has one.

`apply` picks a path by M (tokens in the call):
- M <= weight_only_max_m, or a weight-only checkpoint: mixq.kernels.w8a16 (weight upcast in
  registers, activations untouched). At decode sizes the GEMM only streams the weight, so
  an activation-quant launch costs time and unquantized activations are more accurate.
- larger M: quantize the activations (mixq.kernels.quant: per token, dynamic or the
  checkpoint's static scale; per 1 x bk group for block-scaled FP8), then an 8-bit
  tensor-core GEMM: torch._scaled_mm (cuBLAS rowwise FP8) where it applies, else
  mixq.kernels.w8a8 (block scales, INT8, fp16 outputs, odd dims).
"""

from __future__ import annotations

import os

import torch

from mixq.errors import CheckpointError, UnsupportedFormatError
from mixq.formats.spec import QuantizedWeight, WeightSpec
from mixq.kernels import wna16
from mixq.kernels.quant import quant_fp8, quant_int8
from mixq.kernels.quant_fused import FP8Act
from mixq.kernels.w8a8 import scaled_mm_ok, scaled_mm_rowwise, w8a8_gemm
from mixq.kernels.w8a16 import w8a16_gemm

# Tokens up to which the weight-only kernel runs even for W8A8 checkpoints; bench/kernels.py
# times both paths at M = 1..256 so this can be set from measurements.
WEIGHT_ONLY_MAX_M = 64
DEFAULT_ACT_GROUP = 128  # dynamic-group activations over per-channel weights


def _pow2_at_least_32(v: int | None) -> bool:
    return v is not None and v >= 32 and not v & (v - 1)


def _grid(spec: WeightSpec) -> tuple[int, int] | None:
    """(rows of N, cols of K) sharing one weight scale; None for per-channel/tensor."""
    if spec.scale_layout == "block":
        return tuple(spec.block_size)
    if spec.scale_layout == "group":
        return 1, spec.group_size
    return None


def _device_ok(device: torch.device, capability: tuple[int, int], what: str) -> tuple[bool, str]:
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        if cap < capability:
            return False, f"{what} needs compute capability {capability[0]}.{capability[1]}+ (got {cap[0]}.{cap[1]})"
        return True, ""
    if os.environ.get("MIXQ_TRITON_INTERPRET_METHODS") == "1":
        return True, ""
    return False, f"needs a CUDA device (got {device.type})"


def _scales(weight: QuantizedWeight) -> torch.Tensor:
    """The stored weight scale as fp32 [N] (tensor/channel) or the contiguous scale grid."""
    (n, k), spec = weight.shape, weight.spec
    s = weight.tensors["weight_scale"].float()
    grid = _grid(spec)
    if grid is None:
        if s.numel() not in (1, n):
            raise CheckpointError(f"{weight.name}: weight_scale has {s.numel()} values for {n} output channels")
        return s.reshape(-1).expand(n).contiguous()
    want = (-(-n // grid[0]), -(-k // grid[1]))
    if s.numel() != want[0] * want[1]:
        raise CheckpointError(f"{weight.name}: weight_scale shape {list(s.shape)} does not fit [{n}, {k}] "
                              f"with {grid[0]}x{grid[1]} scale blocks (expected {list(want)})")
    return s.reshape(want).contiguous()


def _static_scale(weight: QuantizedWeight) -> torch.Tensor | None:
    if weight.spec.activation != "static-tensor":
        return None
    s = weight.tensors.get("input_scale")
    if s is None:
        raise CheckpointError(f"{weight.name}: static activation quantization but no input_scale stored")
    if s.numel() != 1:
        raise UnsupportedFormatError(f"{weight.name}: input_scale has {s.numel()} values; only per-tensor "
                                     "static activation scales are supported")
    return s.float().reshape(1).contiguous()


class _W8Method:
    """Shared apply: weight-only at small M, quantized activations + 8-bit GEMM above."""

    name = "w8"
    weight_only_max_m = WEIGHT_ONLY_MAX_M

    def apply(self, weight: QuantizedWeight, x: torch.Tensor | FP8Act, bias: torch.Tensor | None) -> torch.Tensor:
        t, (n, k), spec = weight.tensors, weight.shape, weight.spec
        if isinstance(x, FP8Act):  # quantized by its producer (wants_fp8_act said yes)
            return scaled_mm_rowwise(x.q, x.s, t["weight"], t["weight_scale"], bias)
        shape = x.shape
        x2 = x.reshape(-1, k)
        m = x2.shape[0]
        w, s, z, static = t["weight"], t["weight_scale"], t.get("weight_zero_point"), t.get("input_scale")
        grid = _grid(spec)
        if spec.activation == "none" or m <= self.weight_only_max_m:
            y = w8a16_gemm(x2, w, s, z, bias, grid)
        elif w.dtype == torch.int8:
            q, sa = quant_int8(x2, static)
            y = w8a8_gemm(q, sa, w, s, z, bias, 0, grid, x.dtype)
        else:
            # static scales are per tensor: honour them; else per-token, or per 1 x bk group
            # for block/group weights (and for a checkpoint that asks for group activations)
            group = 0
            if static is None and (grid is not None or spec.activation == "dynamic-group"):
                group = grid[1] if grid is not None else DEFAULT_ACT_GROUP
            q, sa = quant_fp8(x2, group, static)
            if group == 0 and grid is None and scaled_mm_ok(m, n, k, x.dtype, x.device):
                y = scaled_mm_rowwise(q, sa, w, s, bias)
            else:
                y = w8a8_gemm(q, sa, w, s, None, bias, group, grid, x.dtype)
        return y.reshape(*shape[:-1], n)


class FP8Method(_W8Method):
    """FP8 E4M3 weights with per-tensor, per-channel, group or block scales."""

    name = "triton-fp8"

    def can_implement(self, spec: WeightSpec, device: torch.device) -> tuple[bool, str]:
        if wna16.triton is None:
            return False, "triton is not installed"
        if spec.layout != "fp8":
            return False, f"layout {spec.layout} is not fp8"
        if spec.dtype != torch.float8_e4m3fn:
            return False, f"fp8 storage {spec.dtype} is not float8_e4m3fn"
        if spec.scale_layout not in ("tensor", "channel", "group", "block"):
            return False, f"fp8 scale layout {spec.scale_layout} is not supported"
        grid = _grid(spec)
        if grid is not None and not _pow2_at_least_32(grid[1]):
            return False, f"scale blocks along K of {grid[1]} are not supported (a power of two >= 32)"
        return _device_ok(device, (8, 9), "FP8")

    def prepare(self, weight: QuantizedWeight, dtype: torch.dtype) -> QuantizedWeight:
        tensors = {"weight": weight.tensors["weight"].contiguous(), "weight_scale": _scales(weight)}
        static = _static_scale(weight)
        if static is not None:
            tensors["input_scale"] = static
        return QuantizedWeight(weight.name, weight.spec, weight.shape, tensors)

    def wants_fp8_act(self, weight: QuantizedWeight, m: int, dtype: torch.dtype) -> bool:
        """Whether `apply` at m rows quantizes its input per token (dynamic) and runs
        `_scaled_mm`: then the producer may hand it an FP8Act instead (quant_fused)."""
        (n, k), spec = weight.shape, weight.spec
        return (spec.activation == "dynamic-token" and _grid(spec) is None and m > self.weight_only_max_m
                and "input_scale" not in weight.tensors
                and scaled_mm_ok(m, n, k, dtype, weight.tensors["weight"].device))


class Int8Method(_W8Method):
    """INT8 weights (compressed-tensors int-quantized): W8A8 with per-token INT8
    activations (dynamic or static per tensor), or W8A16 weight-only."""

    name = "triton-int8"

    def can_implement(self, spec: WeightSpec, device: torch.device) -> tuple[bool, str]:
        if wna16.triton is None:
            return False, "triton is not installed"
        if spec.layout != "int8" or spec.bits != 8:
            return False, f"layout {spec.layout} ({spec.bits}-bit) is not int8"
        if spec.scale_layout not in ("tensor", "channel", "group"):
            return False, f"int8 scale layout {spec.scale_layout} is not supported"
        if spec.scale_layout == "group" and not _pow2_at_least_32(spec.group_size):
            return False, f"int8 group size {spec.group_size} is not supported (a power of two >= 32)"
        if spec.scale_layout == "group" and not spec.symmetric:
            return False, "asymmetric int8 with group scales is not supported (zero points per channel only)"
        if spec.activation not in ("none", "dynamic-token", "static-tensor"):
            return False, f"int8 activation scheme {spec.activation} is not supported (per token or per tensor)"
        return _device_ok(device, (8, 0), "INT8 tensor-core GEMM")

    def prepare(self, weight: QuantizedWeight, dtype: torch.dtype) -> QuantizedWeight:
        n = weight.shape[0]
        t = weight.tensors
        tensors = {"weight": t["weight"].contiguous(), "weight_scale": _scales(weight)}
        zp = t.get("weight_zero_point")
        if zp is not None and bool(zp.ne(0).any()):  # all-zero zero points: symmetric in fact
            if zp.numel() not in (1, n):
                raise CheckpointError(f"{weight.name}: weight_zero_point has {zp.numel()} values for {n} channels")
            tensors["weight_zero_point"] = zp.to(torch.int32).reshape(-1).expand(n).contiguous()
        izp = t.get("input_zero_point")
        if izp is not None and bool(izp.ne(0).any()):
            raise UnsupportedFormatError(f"{weight.name}: asymmetric static activation quantization "
                                         "(input_zero_point) is not supported; use symmetric W8A8")
        static = _static_scale(weight)
        if static is not None:
            tensors["input_scale"] = static
        return QuantizedWeight(weight.name, weight.spec, weight.shape, tensors)
