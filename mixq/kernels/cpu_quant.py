"""Activation quantization on the CPU: W8A8 and FP8 checkpoints quantize their inputs as
their scheme says (per token, dynamic or with the checkpoint's static scale; per 1 x G group
for block-scaled FP8), with the same arithmetic as the GPU kernels (mixq.kernels.quant):

  s = max(amax(x row or group), 1e-10) / QMAX      (static: the checkpoint's input_scale)
  INT8: q = sign(y) * floor(|y| + 0.5),  y = clamp(x / s, -127, 127)
  FP8:  q = y rounded to nearest-even on the e4m3 grid, y = clamp(x / s, -448, 448)

`fake_quant` returns q * s in float32: the value the 8-bit GEMM multiplies, so a float GEMM
on it computes the quantized model (products of codes are exact in fp32; only the
accumulation order differs from an integer or FP8 tensor-core GEMM). torch's fp32 -> fp8
cast is a scalar loop on the CPU (~14 ns per element), so the e4m3 rounding is done with
integer ops on the fp32 bits, which is exact for |y| <= 448 (tests compare with the cast).
"""

from __future__ import annotations

import torch

from mixq.formats.spec import WeightSpec
from mixq.kernels import cpu_fp8
from mixq.kernels.quant import EPS, FP8_MAX, INT8_MAX

DEFAULT_ACT_GROUP = 128  # dynamic-group activations over per-channel weights (as mixq.kernels.w8_methods)

_FP8_MIN_NORMAL = 2.0**-6  # below it e4m3 is subnormal: a fixed grid of 2**-9
_SUBNORMAL_SHIFT = 24576.0  # 1.5 * 2**14: fp32's ulp there is 2**-9, so x + c - c rounds to that grid


def round_to_e4m3(y: torch.Tensor) -> torch.Tensor:
    """float32 y with |y| <= 448 -> the nearest float8_e4m3fn value (ties to even), as float32."""
    bits = y.view(torch.int32)
    lsb = (bits >> 20) & 1  # e4m3 keeps 3 of fp32's 23 mantissa bits: drop 20, ties to even
    normal = ((bits + 0x7FFFF + lsb) & -(1 << 20)).view(torch.float32)
    sub = (y + _SUBNORMAL_SHIFT) - _SUBNORMAL_SHIFT
    return torch.where(y.abs() < _FP8_MIN_NORMAL, sub, normal)


def act_scales(x: torch.Tensor, qmax: float, group: int = 0, static_scale: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 scales of x [M, K]: [M, 1] per token (static: the given per-tensor scale), or
    [M, ceil(K/group)] per token-group."""
    m, k = x.shape
    if static_scale is not None:
        return static_scale.float().reshape(1, 1).expand(m, 1)
    if group:
        g = -(-k // group)
        pad = torch.nn.functional.pad(x.float(), (0, g * group - k)).reshape(m, g, group)
        return pad.abs().amax(dim=2).clamp(min=EPS) / qmax
    return x.float().abs().amax(dim=1, keepdim=True).clamp(min=EPS) / qmax


def fake_quant(x: torch.Tensor, to_int8: bool, group: int = 0,
               static_scale: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] (any float dtype) -> q * s float32 [M, K]: the activations an 8-bit GEMM sees.

    to_int8: INT8 codes in [-127, 127], else FP8 E4M3; group 0: per token (static_scale,
    fp32 [1], if the checkpoint has one), group > 0: per 1 x group block, dynamic."""
    if group and static_scale is not None:
        raise ValueError("fake_quant: a static scale is per tensor; it cannot be combined with groups")
    if not group:
        q, s = token_codes(x, to_int8, static_scale)
        return q * s[:, None]
    m, k = x.shape
    qmax = INT8_MAX if to_int8 else FP8_MAX
    s = act_scales(x, qmax, group)
    g = s.shape[1]
    xf = torch.nn.functional.pad(x.float(), (0, g * group - k)).reshape(m, g, group)
    y = (xf / s[:, :, None]).clamp(-qmax, qmax)
    q = torch.sign(y) * torch.floor(y.abs() + 0.5) if to_int8 else round_to_e4m3(y)
    return (q * s[:, :, None]).reshape(m, -1)[:, :k]


def token_codes(x: torch.Tensor, to_int8: bool, static_scale: torch.Tensor | None = None,
                codes_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token quantization of x [M, K]: (codes [M, K] in codes_dtype, exactly the INT8 /
    E4M3 values (both are exact in bf16 and fp32); scales float32 [M]), x ~= codes * scales.
    Runs in the CPU C kernels when they are built (one pass, the same arithmetic; tests
    compare the two bit for bit), else in torch ops."""
    if x.dim() != 2:
        raise ValueError(f"quantization: x must be 2-D [M, K], got shape {list(x.shape)}")
    if x.device.type == "cpu" and codes_dtype in (torch.float32, torch.bfloat16) and cpu_fp8.available()[0]:
        return cpu_fp8.quant_rows(x, to_int8, static_scale, codes_dtype)
    return token_codes_torch(x, to_int8, static_scale, codes_dtype)


def token_codes_torch(x: torch.Tensor, to_int8: bool, static_scale: torch.Tensor | None = None,
                      codes_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """token_codes in torch ops (any device)."""
    qmax = INT8_MAX if to_int8 else FP8_MAX
    s = act_scales(x, qmax, 0, static_scale)  # [M, 1]
    y = (x.float() / s).clamp(-qmax, qmax)
    q = torch.sign(y) * torch.floor(y.abs() + 0.5) if to_int8 else round_to_e4m3(y)
    return q.to(codes_dtype), s.reshape(-1).contiguous()


def quantize_input(x: torch.Tensor, spec: WeightSpec, static_scale: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] -> the fp32 activations the checkpoint's scheme feeds its 8-bit GEMM (x
    itself when the scheme is weight-only): INT8 per token for int layouts; FP8 per token,
    or per 1 x bk group for block/group-scaled FP8 weights (bk their K block; 128 when the
    scheme asks for groups over per-channel weights), as the GPU methods choose."""
    if spec.activation == "none":
        return x
    if spec.layout != "fp8":
        return fake_quant(x, to_int8=True, static_scale=static_scale)
    group = 0
    if static_scale is None:
        if spec.scale_layout == "block":
            group = spec.block_size[1]
        elif spec.scale_layout == "group":
            group = spec.group_size
        elif spec.activation == "dynamic-group":
            group = DEFAULT_ACT_GROUP
    return fake_quant(x, to_int8=False, group=group, static_scale=static_scale)
