"""Producers that hand an FP8 W8A8 GEMM its quantized input directly (issue 18, point 3).

A W8A8 FP8 linear at large M (mixq.kernels.w8_methods) quantizes its bf16 input per token
(`quant_fp8`) before `torch._scaled_mm`: a second pass over an activation that the layer
before it (an RMSNorm, or SiLU-and-mul) has just written. These kernels are those producers
with the per-token quantization fused in: one launch, the bf16 intermediate never stored:

  add_rms_norm_fp8(x, residual, weight, eps) -> (q fp8 [T, n], s fp32 [T, 1], x + residual)
  silu_and_mul_fp8(gate, up)                 -> (q fp8 [T, n], s fp32 [T, 1])

Each equals `quant_fp8(add_rms_norm(...)[0])` / `quant_fp8(silu_and_mul(...))` bit for bit:
the producer's output is rounded to its dtype exactly as the unfused kernel stores it, then
amax, the IEEE-divided scale and the saturating round of `mixq.kernels.quant`. One program
per row holds the whole row in registers (rows up to 32K elements).

`FP8Act` carries (q, s, the dtype the unfused producer would have produced) to a method
that takes it (`wants_fp8_act`)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from mixq.kernels.quant import FP8_MAX, quant_reference
from mixq.kernels.wna16 import interpreting, triton

if triton is not None:
    import triton.language as tl

    from mixq.kernels.quant import _round_sat

MAX_ROW = 32768


class FP8Act(NamedTuple):
    """A per-token FP8 activation: q float8_e4m3fn [T, K], s fp32 [T, 1], and the dtype of
    the unquantized activation it stands for (the GEMM's output dtype)."""

    q: torch.Tensor
    s: torch.Tensor
    dtype: torch.dtype

    @property
    def shape(self) -> torch.Size:
        return self.q.shape


def _warps(block: int) -> int:
    return max(4, min(16, block // 1024))


if triton is not None:

    @triton.jit
    def _quant_row_store(y, q_ptr, s_ptr, row, stride_q, cols, ok, EMULATE_FP8: tl.constexpr):
        amax = tl.max(tl.where(ok, tl.abs(y), 0.0), axis=0)
        scale = tl.math.div_rn(tl.maximum(amax, 1e-10), 448.0)  # as quant.py: IEEE division
        tl.store(s_ptr + row, scale)
        q = _round_sat(y, scale, 448.0, False, EMULATE_FP8).to(q_ptr.dtype.element_ty)
        tl.store(q_ptr + row * stride_q + cols, q, mask=ok)

    @triton.jit
    def _add_rms_norm_fp8_kernel(x_ptr, r_ptr, w_ptr, q_ptr, s_ptr, rout_ptr, n, eps, stride_x, stride_r, stride_q,
                                 stride_ro, HAS_RES: tl.constexpr, OUT_DT: tl.constexpr, BLOCK: tl.constexpr,
                                 EMULATE_FP8: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        ok = cols < n
        x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0)
        if HAS_RES:
            r = tl.load(r_ptr + row * stride_r + cols, mask=ok, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
            tl.store(rout_ptr + row * stride_ro + cols, x, mask=ok)
        xf = x.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / n + eps)
        w = tl.load(w_ptr + cols, mask=ok, other=0.0)
        # the unfused kernel's stored value: weight * normed, rounded to the output dtype
        y = ((xf * rstd).to(x.dtype).to(tl.float32) * w.to(tl.float32)).to(OUT_DT).to(tl.float32)
        _quant_row_store(y, q_ptr, s_ptr, row, stride_q, cols, ok, EMULATE_FP8)

    @triton.jit
    def _silu_and_mul_fp8_kernel(g_ptr, u_ptr, q_ptr, s_ptr, n, stride_g, stride_u, stride_q, BLOCK: tl.constexpr,
                                 EMULATE_FP8: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        ok = cols < n
        g = tl.load(g_ptr + row * stride_g + cols, mask=ok, other=0.0)
        u = tl.load(u_ptr + row * stride_u + cols, mask=ok, other=0.0)
        gf = g.to(tl.float32)
        act = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)  # as silu_and_mul: silu rounds to the dtype
        y = (act.to(tl.float32) * u.to(tl.float32)).to(g.dtype).to(tl.float32)
        _quant_row_store(y, q_ptr, s_ptr, row, stride_q, cols, ok, EMULATE_FP8)


def _out_dt(dtype: torch.dtype):
    return {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}[dtype]


@torch.library.custom_op("mixq::add_rms_norm_fp8", mutates_args=())
def add_rms_norm_fp8(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, residual [T, n] (rows contiguous), weight [n] -> (q fp8 [T, n], s fp32 [T, 1],
    x + residual [T, n]); q * s ~ RMSNorm(x + residual) * weight in the promoted dtype."""
    t, n = x.shape
    if n > MAX_ROW:
        raise ValueError(f"add_rms_norm_fp8: rows of {n} > {MAX_ROW}")
    q = torch.empty((t, n), dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty((t, 1), dtype=torch.float32, device=x.device)
    rout = torch.empty_like(x)
    if t == 0:
        return q, s, rout
    block = triton.next_power_of_2(n)
    has_res = residual is not None
    r = residual if has_res else x
    _add_rms_norm_fp8_kernel[(t,)](x, r, weight, q, s, rout, n, eps, x.stride(0), r.stride(0), q.stride(0),
                                   rout.stride(0), HAS_RES=has_res,
                                   OUT_DT=_out_dt(torch.promote_types(weight.dtype, x.dtype)), BLOCK=block,
                                   EMULATE_FP8=interpreting(), num_warps=_warps(block))
    if not has_res:
        rout.copy_(x)
    return q, s, rout


@add_rms_norm_fp8.register_fake
def _(x, residual, weight, eps):
    return (x.new_empty(x.shape, dtype=torch.float8_e4m3fn), x.new_empty((x.shape[0], 1), dtype=torch.float32),
            torch.empty_like(x))


@torch.library.custom_op("mixq::silu_and_mul_fp8", mutates_args=())
def silu_and_mul_fp8(gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """gate, up [T, n] (rows may be strided, last dim contiguous) -> (q fp8 [T, n], s fp32
    [T, 1]) with q * s ~ silu(gate) * up in their dtype."""
    t, n = gate.shape
    if n > MAX_ROW:
        raise ValueError(f"silu_and_mul_fp8: rows of {n} > {MAX_ROW}")
    q = torch.empty((t, n), dtype=torch.float8_e4m3fn, device=gate.device)
    s = torch.empty((t, 1), dtype=torch.float32, device=gate.device)
    if t:
        block = triton.next_power_of_2(n)
        _silu_and_mul_fp8_kernel[(t,)](gate, up, q, s, n, gate.stride(0), up.stride(0), q.stride(0), BLOCK=block,
                                       EMULATE_FP8=interpreting(), num_warps=_warps(block))
    return q, s


@silu_and_mul_fp8.register_fake
def _(gate, up):
    return gate.new_empty(gate.shape, dtype=torch.float8_e4m3fn), gate.new_empty((gate.shape[0], 1), dtype=torch.float32)


def fp8_act_reference(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The unfused twin: per-token dynamic FP8 of a producer's output `y` [T, n]."""
    return quant_reference(y, 0, None, False)


__all__ = ["FP8Act", "FP8_MAX", "add_rms_norm_fp8", "silu_and_mul_fp8", "fp8_act_reference"]
