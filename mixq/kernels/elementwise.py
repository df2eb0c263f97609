"""The small per-token ops of a decoder layer, one Triton launch each.

In eager torch an RMSNorm with its residual add is ~9 kernels, neox rotary on q and k ~20,
SiLU-and-mul 2 and the KV-cache write 2-4: about 40 launches per layer around 7 GEMMs,
which dominate a decode step's GPU time at small batch even inside a CUDA graph. Each op
here is one launch and computes what the torch code in mixq.layers computes, rounding at
the same points (the dtype of every intermediate torch materialises), so outputs agree
but for fp32 differences (sum order, a fused multiply-add) that can move a bf16/fp16
rounding by one unit:

  add_rms_norm   x (+ residual) -> (weight * (s * rsqrt(mean(s^2) + eps)).to(dtype), s)
  rotary_neox    q [T, H, D], k [T, Hkv, D] rotated by cos/sin [P, D/2] at positions [T]
  silu_and_mul   silu(gate).to(dtype) * up
  store_kv       k/v [T, Hkv, D] into the paged caches at slot_mapping [T]

Each is a torch custom op with a fake implementation (CUDA graphs, torch.compile). The
layers call them on CUDA (`use_kernels`); the CPU runs the torch code, and the tests run
these under TRITON_INTERPRET=1 against float64 references.
"""

from __future__ import annotations

import os

import torch

from mixq.kernels.kv_quant import fp8_max, is_fp8

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the layers' torch code runs instead
    triton = None


def use_kernels(x: torch.Tensor) -> bool:
    """Whether the layers should call these kernels for tensors like x: on CUDA, or on the
    CPU under the interpreter when MIXQ_TRITON_INTERPRET_METHODS=1 (tests)."""
    if triton is None:
        return False
    if x.device.type == "cuda":
        return True
    return os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("MIXQ_TRITON_INTERPRET_METHODS") == "1"


def _warps(block: int) -> int:
    return max(1, min(8, block // 256))


if triton is not None:

    @triton.jit
    def _add_rms_norm_kernel(x_ptr, r_ptr, w_ptr, out_ptr, rout_ptr, n, eps, stride_x, stride_r, stride_o,
                             stride_ro, HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        ok = cols < n
        x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0)
        if HAS_RES:
            r = tl.load(r_ptr + row * stride_r + cols, mask=ok, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)  # torch adds in x's dtype
            tl.store(rout_ptr + row * stride_ro + cols, x, mask=ok)
        xf = x.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / n + eps)
        w = tl.load(w_ptr + cols, mask=ok, other=0.0)
        y = (xf * rstd).to(x.dtype).to(tl.float32) * w.to(tl.float32)
        tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _rotate_heads(src, dst, t, stride_t, stride_h, c, s, i, i_ok, NH: tl.constexpr, HP: tl.constexpr,
                      HALF: tl.constexpr):
        h = tl.arange(0, HP)
        ok = (h < NH)[:, None] & i_ok[None, :]
        base = src + t * stride_t + h[:, None] * stride_h + i[None, :]
        x1 = tl.load(base, mask=ok, other=0.0)
        x2 = tl.load(base + HALF, mask=ok, other=0.0)
        a, b = x1.to(tl.float32), x2.to(tl.float32)
        o = dst + t * (NH * 2 * HALF) + h[:, None] * (2 * HALF) + i[None, :]  # contiguous output
        tl.store(o, (a * c - b * s).to(x1.dtype), mask=ok)
        tl.store(o + HALF, (b * c + a * s).to(x1.dtype), mask=ok)

    @triton.jit
    def _rotary_kernel(pos_ptr, q_ptr, k_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr, stride_qt, stride_qh, stride_kt,
                       stride_kh, stride_cos, H: tl.constexpr, HKV: tl.constexpr, HQP: tl.constexpr,
                       HKP: tl.constexpr, HALF: tl.constexpr, HALFP: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        pos = tl.load(pos_ptr + t).to(tl.int64)
        i = tl.arange(0, HALFP)
        i_ok = i < HALF
        c = tl.load(cos_ptr + pos * stride_cos + i, mask=i_ok, other=0.0)[None, :]
        s = tl.load(sin_ptr + pos * stride_cos + i, mask=i_ok, other=0.0)[None, :]
        _rotate_heads(q_ptr, qo_ptr, t, stride_qt, stride_qh, c, s, i, i_ok, H, HQP, HALF)
        _rotate_heads(k_ptr, ko_ptr, t, stride_kt, stride_kh, c, s, i, i_ok, HKV, HKP, HALF)

    @triton.jit
    def _silu_and_mul_kernel(g_ptr, u_ptr, out_ptr, n, stride_g, stride_u, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = cols < n
        g = tl.load(g_ptr + row * stride_g + cols, mask=ok, other=0.0)
        u = tl.load(u_ptr + row * stride_u + cols, mask=ok, other=0.0)
        gf = g.to(tl.float32)
        act = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)  # torch's silu rounds to the input dtype
        tl.store(out_ptr + row * n + cols, (act.to(tl.float32) * u.to(tl.float32)).to(g.dtype), mask=ok)

    @triton.jit
    def _store_kv_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, stride_kt, stride_vt, width, k_inv_scale,
                         v_inv_scale, BLOCK: tl.constexpr, FP8_MAX: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        slot = tl.load(slot_ptr + t).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        ok = cols < width
        k = tl.load(k_ptr + t * stride_kt + cols, mask=ok, other=0.0)
        v = tl.load(v_ptr + t * stride_vt + cols, mask=ok, other=0.0)
        if FP8_MAX > 0:  # fp8 cache: x / scale, saturated (mixq.kernels.kv_quant)
            k = tl.clamp(k.to(tl.float32) * k_inv_scale, -FP8_MAX, FP8_MAX)
            v = tl.clamp(v.to(tl.float32) * v_inv_scale, -FP8_MAX, FP8_MAX)
        tl.store(kc_ptr + slot * width + cols, k.to(kc_ptr.dtype.element_ty), mask=ok)
        tl.store(vc_ptr + slot * width + cols, v.to(vc_ptr.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------- add + RMSNorm


@torch.library.custom_op("mixq::add_rms_norm", mutates_args=())
def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual [T, n] (same dtype, rows contiguous), weight [n] -> (normed [T, n] in the
    promoted dtype of weight and x, as torch's product gives; x + residual [T, n]). With
    residual None the second output is a copy of x."""
    t, n = x.shape
    out = torch.empty(t, n, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    rout = torch.empty_like(x)
    if t == 0:
        return out, rout
    block = triton.next_power_of_2(n)
    has_res = residual is not None
    r = residual if has_res else x
    _add_rms_norm_kernel[(t,)](x, r, weight, out, rout, n, eps, x.stride(0), r.stride(0), out.stride(0),
                               rout.stride(0), HAS_RES=has_res, BLOCK=block, num_warps=_warps(block))
    if not has_res:
        rout.copy_(x)
    return out, rout


@add_rms_norm.register_fake
def _(x, residual, weight, eps):
    return x.new_empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype)), torch.empty_like(x)


# ----------------------------------------------------------------------------- rotary


@torch.library.custom_op("mixq::rotary_neox", mutates_args=())
def rotary_neox(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half (neox) rotary: q [T, H, D], k [T, Hkv, D] (last dim contiguous), cos/sin
    [P, D/2] float32, positions [T] -> new contiguous q, k."""
    t, h, d = q.shape
    hkv = k.shape[1]
    qo, ko = torch.empty(q.shape, dtype=q.dtype, device=q.device), torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if t == 0:
        return qo, ko
    half = d // 2
    _rotary_kernel[(t,)](positions, q, k, cos, sin, qo, ko, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                         cos.stride(0), H=h, HKV=hkv, HQP=triton.next_power_of_2(h), HKP=triton.next_power_of_2(hkv),
                         HALF=half,
                         HALFP=triton.next_power_of_2(half), num_warps=4)
    return qo, ko


@rotary_neox.register_fake
def _(positions, q, k, cos, sin):
    return torch.empty_like(q), torch.empty_like(k)


# ----------------------------------------------------------------------------- SiLU-and-mul


@torch.library.custom_op("mixq::silu_and_mul", mutates_args=())
def silu_and_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up [T, n] (same dtype, rows may be strided) -> silu(gate) * up [T, n]."""
    t, n = gate.shape
    out = torch.empty(t, n, dtype=gate.dtype, device=gate.device)
    if t == 0:
        return out
    block = min(4096, triton.next_power_of_2(n))
    _silu_and_mul_kernel[(t, triton.cdiv(n, block))](gate, up, out, n, gate.stride(0), up.stride(0), BLOCK=block,
                                                     num_warps=_warps(block))
    return out


@silu_and_mul.register_fake
def _(gate, up):
    return torch.empty_like(gate)


# ----------------------------------------------------------------------------- KV-cache write


@torch.library.custom_op("mixq::store_kv", mutates_args=("k_cache", "v_cache"))
def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """k, v [T, Hkv, D] (each token's heads contiguous) into k/v_cache [blocks, page, Hkv, D]
    (contiguous) at the flat slots slot_mapping [T] (block * page + offset), cast to the
    cache dtype; an fp8 cache gets x / scale saturated to its range (k_scale, v_scale
    per tensor; unused otherwise)."""
    t = k.shape[0]
    if t == 0:
        return
    width = k.shape[1] * k.shape[2]
    block = triton.next_power_of_2(width)
    fp8 = is_fp8(k_cache.dtype)
    _store_kv_kernel[(t,)](k, v, k_cache, v_cache, slot_mapping, k.stride(0), v.stride(0), width, 1.0 / k_scale,
                           1.0 / v_scale, BLOCK=block, FP8_MAX=fp8_max(k_cache.dtype) if fp8 else 0.0,
                           num_warps=_warps(block))


@store_kv.register_fake
def _(k, v, k_cache, v_cache, slot_mapping, k_scale=1.0, v_scale=1.0):
    return None
