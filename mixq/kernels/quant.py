"""Activation quantization in Triton: BF16/FP16 rows -> FP8 E4M3 or INT8 codes + fp32 scales.

Shared by the dense 8-bit linears (mixq.kernels.w8a8) and anything else that feeds an
8-bit tensor-core GEMM (the fused MoE may import it). Three schemes:

  per token, dynamic   s[m] = max(amax(x[m, :]), EPS) / QMAX          scales fp32 [M, 1]
  per token, static    s[m] = static_scale (a checkpoint's input_scale)  scales fp32 [M, 1]
  per token-group      s[m, g] = max(amax(x[m, g*G:(g+1)*G]), EPS) / QMAX   fp32 [M, ceil(K/G)]
  (FP8 only; G a power of two, the last group may be partial)

codes q = saturate(round(x / s)): FP8 rounds to nearest even (the hardware conversion);
INT8 rounds half away from zero (there is no round-half-even in Triton's portable ops).
The static scale is always written into the scales too, so a GEMM sees one layout. The
division is IEEE round-to-nearest (tl.math.div_rn), as torch's, so the codes agree with
`quant_reference` exactly. The interpreter's fp32 -> fp8 store rounds wrongly when the
rounding carries into the exponent, so under the interpreter the kernel first rounds to
the e4m3 grid itself (`_fp8_rne`), after which the cast is exact.
"""

from __future__ import annotations

import torch

from mixq.kernels.wna16 import interpreting, triton

if triton is not None:
    import triton.language as tl

FP8_MAX = 448.0  # largest finite float8_e4m3fn
INT8_MAX = 127.0  # symmetric range: -128 is never produced
EPS = 1e-10  # amax floor: an all-zero row gets a tiny scale instead of a division by zero


def quant_reference(x: torch.Tensor, group: int = 0, static_scale: torch.Tensor | None = None,
                    to_int8: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch twin of `quant_fp8` / `quant_int8` (same fp32 arithmetic, same rounding)."""
    m, k = x.shape
    xf = x.float()
    qmax = INT8_MAX if to_int8 else FP8_MAX
    if static_scale is not None:
        s = static_scale.float().reshape(1, 1).expand(m, 1)
        y = xf / s
    elif group:
        g = -(-k // group)
        pad = torch.nn.functional.pad(xf, (0, g * group - k)).reshape(m, g, group)
        s = pad.abs().amax(dim=2).clamp(min=EPS) / qmax
        y = (pad / s[:, :, None]).reshape(m, g * group)[:, :k]
    else:
        s = xf.abs().amax(dim=1, keepdim=True).clamp(min=EPS) / qmax
        y = xf / s
    y = y.clamp(-qmax, qmax)
    if to_int8:
        q = (torch.sign(y) * torch.floor(y.abs() + 0.5)).to(torch.int8)
    else:
        q = y.to(torch.float8_e4m3fn)
    return q, s.contiguous()


if triton is not None:

    @triton.jit
    def _fp8_rne(y):
        """Round fp32 y (|y| <= 448) to the nearest-even e4m3 value, kept in fp32. Only
        for the interpreter, whose fp32 -> fp8 cast drops the carry into the exponent
        (124.3 -> 64, not 128); the GPU's cvt.rn.satfinite does this in hardware."""
        bits = y.to(tl.int32, bitcast=True)
        lsb = (bits >> 20) & 1  # 3 mantissa bits kept: drop 20, ties to even
        normal = ((bits + 0x7FFFF + lsb) & -1048576).to(tl.float32, bitcast=True)
        sub = (y + 24576.0) - 24576.0  # below 2**-6 the grid is 2**-9: 1.5 * 2**14 has that ulp
        return tl.where(tl.abs(y) < 0.015625, sub, normal)

    @triton.jit
    def _round_sat(x, scale, QMAX: tl.constexpr, IS_INT: tl.constexpr, EMULATE_FP8: tl.constexpr):
        """x / scale, saturated and (int8) rounded; the caller's cast to the code type does
        fp8's round-to-nearest-even."""
        y = tl.math.div_rn(x, scale)
        y = tl.minimum(tl.maximum(y, -QMAX), QMAX)
        if IS_INT:
            y = tl.where(y >= 0, tl.floor(y + 0.5), tl.ceil(y - 0.5))
        elif EMULATE_FP8:
            y = _fp8_rne(y)
        return y

    @triton.jit
    def _quant_token_kernel(x_ptr, q_ptr, s_ptr, static_ptr, K, stride_xm, stride_qm,
                            BLOCK: tl.constexpr, QMAX: tl.constexpr, IS_INT: tl.constexpr,
                            STATIC: tl.constexpr, EMULATE_FP8: tl.constexpr):
        # one program per row; two passes over the row (amax, then quantize): the second
        # pass reads the row back from L1/L2
        m = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + m * stride_xm
        q_row = q_ptr + m * stride_qm
        cols = tl.arange(0, BLOCK)
        if STATIC:
            scale = tl.load(static_ptr).to(tl.float32)
        else:
            amax = tl.zeros((BLOCK,), dtype=tl.float32)
            for c in range(0, K, BLOCK):
                x = tl.load(x_row + c + cols, mask=c + cols < K, other=0.0).to(tl.float32)
                amax = tl.maximum(amax, tl.abs(x))
            # IEEE division (Triton's `/` is div.full.f32, ~2 ulp): scales equal torch's bit for bit
            scale = tl.math.div_rn(tl.maximum(tl.max(amax, axis=0), 1e-10), QMAX)
        tl.store(s_ptr + m, scale)
        for c in range(0, K, BLOCK):
            ok = c + cols < K
            x = tl.load(x_row + c + cols, mask=ok, other=0.0).to(tl.float32)
            q = _round_sat(x, scale, QMAX, IS_INT, EMULATE_FP8).to(q_ptr.dtype.element_ty)
            tl.store(q_row + c + cols, q, mask=ok)

    @triton.jit
    def _quant_group_kernel(x_ptr, q_ptr, s_ptr, K, G, stride_xm, stride_qm, stride_sm,
                            GROUP: tl.constexpr, GPP: tl.constexpr, QMAX: tl.constexpr,
                            EMULATE_FP8: tl.constexpr):
        # one program per (row, GPP consecutive groups): a [GPP, GROUP] tile, amax per row
        m = tl.program_id(0).to(tl.int64)
        g = tl.program_id(1) * GPP + tl.arange(0, GPP)
        offs = g[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
        ok = (offs < K) & (g[:, None] < G)
        x = tl.load(x_ptr + m * stride_xm + offs, mask=ok, other=0.0).to(tl.float32)
        scale = tl.math.div_rn(tl.maximum(tl.max(tl.abs(x), axis=1), 1e-10), QMAX)  # [GPP]
        tl.store(s_ptr + m * stride_sm + g, scale, mask=g < G)
        q = _round_sat(x, scale[:, None], QMAX, False, EMULATE_FP8).to(q_ptr.dtype.element_ty)
        tl.store(q_ptr + m * stride_qm + offs, q, mask=ok)


@torch.library.custom_op("mixq::quant_act", mutates_args=())
def _quant_act_op(x: torch.Tensor, group: int, static_scale: torch.Tensor | None,
                  to_int8: bool) -> tuple[torch.Tensor, torch.Tensor]:
    m, k = x.shape
    q = torch.empty((m, k), device=x.device, dtype=torch.int8 if to_int8 else torch.float8_e4m3fn)
    qmax = INT8_MAX if to_int8 else FP8_MAX
    if group:
        g = triton.cdiv(k, group)
        s = torch.empty((m, g), device=x.device, dtype=torch.float32)
        gpp = max(1, min(triton.next_power_of_2(g), 2048 // group))  # ~2K elements per program
        if m:
            _quant_group_kernel[(m, triton.cdiv(g, gpp))](x, q, s, k, g, x.stride(0), q.stride(0), s.stride(0),
                                                          GROUP=group, GPP=gpp, QMAX=qmax,
                                                          EMULATE_FP8=interpreting(), num_warps=4)
        return q, s
    s = torch.empty((m, 1), device=x.device, dtype=torch.float32)
    block = min(triton.next_power_of_2(k), 1024 if interpreting() else 4096)
    if m:
        _quant_token_kernel[(m,)](x, q, s, static_scale if static_scale is not None else s, k, x.stride(0),
                                  q.stride(0), BLOCK=block, QMAX=qmax, IS_INT=to_int8,
                                  STATIC=static_scale is not None, EMULATE_FP8=interpreting(), num_warps=8 if block >= 2048 else 4)
    return q, s


@_quant_act_op.register_fake
def _(x, group, static_scale, to_int8):
    m, k = x.shape
    q = x.new_empty((m, k), dtype=torch.int8 if to_int8 else torch.float8_e4m3fn)
    return q, x.new_empty((m, -(-k // group) if group else 1), dtype=torch.float32)


def _check(x: torch.Tensor, who: str) -> torch.Tensor:
    if x.dim() != 2:
        raise ValueError(f"{who}: x must be 2-D [M, K], got shape {list(x.shape)}")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"{who}: x dtype {x.dtype} not supported (bf16, fp16, fp32)")
    return x.contiguous()


def quant_fp8(x: torch.Tensor, group: int = 0,
              static_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] bf16/fp16/fp32 -> (q float8_e4m3fn [M, K], s fp32 [M, 1] or [M, ceil(K/group)]).

    group 0: per token (static_scale fp32 [1] if given, else dynamic); group > 0 (a power of
    two >= 16): per token-group, dynamic. x ~= q * s broadcast over the row / group."""
    x = _check(x, "quant_fp8")
    if group and (group < 16 or group & (group - 1)):
        raise ValueError(f"quant_fp8: group {group} must be a power of two >= 16")
    if group and static_scale is not None:
        raise ValueError("quant_fp8: a static scale is per tensor; it cannot be combined with groups")
    return torch.ops.mixq.quant_act(x, group, static_scale, False)


def quant_int8(x: torch.Tensor, static_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] bf16/fp16/fp32 -> (q int8 [M, K] in [-127, 127], s fp32 [M, 1]); per token,
    static when static_scale (fp32 [1]) is given, else dynamic."""
    return torch.ops.mixq.quant_act(_check(x, "quant_int8"), 0, static_scale, True)
