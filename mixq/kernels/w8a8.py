"""8-bit x 8-bit tensor-core GEMM in Triton: FP8 E4M3 (per-channel or block-scaled) and
INT8 (per-channel, optional weight zero point), activations quantized by mixq.kernels.quant.

    y[m, n] = sum_k (a[m, k] * sa[m, k/AG]) * ((b[n, k] - zb[n]) * sb[n/SBN, k/SBK]) (+ bias)

Operands, kept as stored (no repack):
  a   fp8 | int8 [M, K]  K contiguous             sa fp32 [M, 1] (per token) or [M, ceil(K/AG)]
  b   fp8 | int8 [N, K]  K contiguous (K-major: what Hopper's 8-bit wgmma wants for B)
  sb  fp32 [N] (per channel) or [ceil(N/SBN), ceil(K/SBK)] (128x128 blocks, or (1, G) groups)
  zb  int32 [N] or None (INT8 asymmetric weights; uses the row sums of a)
Scales that vary along K are applied per K tile (BK divides AG and SBK) to that tile's
fp32 partial product; per-token/per-channel scales once in the epilogue. FP8 partial
products start from zero every K tile and are added in fp32 (the tensor core's own fp8
accumulator is narrower than fp32: DeepSeek-V3's promotion, here once per BK <= 128).
INT8 accumulates exactly in int32 (|sum| <= K * 127 * 255 < 2**31 for K < 66000).

For per-token x per-channel FP8 the method prefers torch._scaled_mm (cuBLAS, rowwise) where
it applies (see `scaled_mm_ok`); this kernel covers the rest: block scales, fp16 outputs,
dims that are not multiples of 16, INT8.
"""

from __future__ import annotations

import torch

from mixq.kernels.w8a16 import _sms
from mixq.kernels.wna16 import interpreting, triton

if triton is not None:
    import triton.language as tl

    from mixq.kernels.tiles import grouped_tile, split_k_range


def _expand(s: torch.Tensor, rows: int, cols: int, block: tuple[int, int] | None) -> torch.Tensor:
    s = s.double()
    if block is None:
        return s.reshape(-1, 1).expand(rows, cols) if s.numel() == rows else s.reshape(1, -1).expand(rows, cols)
    return s.repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]


def w8a8_reference(a: torch.Tensor, sa: torch.Tensor, b: torch.Tensor, sb: torch.Tensor,
                   zb: torch.Tensor | None = None, bias: torch.Tensor | None = None, act_group: int = 0,
                   block: tuple[int, int] | None = None) -> torch.Tensor:
    """Float64 reference of `w8a8_gemm` on the same quantized operands."""
    (m, k), n = a.shape, b.shape[0]
    ad = a.double() * (_expand(sa, m, k, (1, act_group)) if act_group else sa.double().reshape(m, 1))
    bd = b.double() - (0 if zb is None else zb.double().reshape(n, 1))
    bd = bd * (_expand(sb, n, k, block) if block else sb.double().reshape(n, 1))
    y = ad @ bd.t()
    return y if bias is None else y + bias.double()


if triton is not None:

    # M changes every call: do not compile a variant per M % 16
    @triton.jit(do_not_specialize=["M"])
    def _w8a8_kernel(a_ptr, sa_ptr, b_ptr, sb_ptr, z_ptr, bias_ptr, out_ptr, M, N, K,
                     stride_am, stride_sam, stride_bn, stride_sbn, stride_os, stride_om,
                     AG: tl.constexpr, SBN: tl.constexpr, SBK: tl.constexpr, IS_INT: tl.constexpr,
                     INT_EXACT: tl.constexpr, HAS_ZP: tl.constexpr, HAS_BIAS: tl.constexpr, BM: tl.constexpr,
                     BN: tl.constexpr, BK: tl.constexpr, SPLIT_K, GROUP_M: tl.constexpr):
        # INT_EXACT: int8 with no scale varying along K, so the int32 sum runs over all of K
        pid = tl.program_id(0)
        pid_k = tl.program_id(1)
        pid_m, pid_n = grouped_tile(pid, M, N, BM, BN, GROUP_M)
        offs_m = pid_m * BM + tl.arange(0, BM)
        offs_n = pid_n * BN + tl.arange(0, BN)
        m_ok = offs_m < M
        n_ok = offs_n < N
        rk = tl.arange(0, BK)
        t0, t1 = split_k_range(pid_k, tl.cdiv(K, BK), SPLIT_K)
        accf = tl.zeros((BM, BN), dtype=tl.float32)
        if IS_INT:
            acc = tl.zeros((BM, BN), dtype=tl.int32)
        if HAS_ZP:
            z = tl.load(z_ptr + offs_n, mask=n_ok, other=0)
            asum = tl.zeros((BM,), dtype=tl.int32)
        for t in range(t0, t1):
            offs_k = t * BK + rk
            k_ok = offs_k < K
            a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_k[None, :],
                        mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            # weights are read once per row tile; evict them first, keep activations
            b = tl.load(b_ptr + offs_n[None, :] * stride_bn + offs_k[:, None],
                        mask=k_ok[:, None] & n_ok[None, :], other=0.0, eviction_policy="evict_first")
            if INT_EXACT:
                acc = tl.dot(a, b, acc, out_dtype=tl.int32)  # exact: scales once at the end
                if HAS_ZP:
                    asum += tl.sum(a.to(tl.int32), axis=1)
            else:
                if IS_INT:
                    part_i = tl.dot(a, b, out_dtype=tl.int32)
                    if HAS_ZP:
                        part_i -= z[None, :] * tl.sum(a.to(tl.int32), axis=1)[:, None]
                    part = part_i.to(tl.float32)
                else:
                    part = tl.dot(a, b)
                if AG > 0:
                    part *= tl.load(sa_ptr + offs_m * stride_sam + (t * BK) // AG, mask=m_ok, other=0.0)[:, None]
                if SBK > 0:
                    part *= tl.load(sb_ptr + (offs_n // SBN) * stride_sbn + (t * BK) // SBK, mask=n_ok,
                                    other=0.0)[None, :]
                accf += part
        if INT_EXACT:
            if HAS_ZP:
                acc -= z[None, :] * asum[:, None]
            accf = acc.to(tl.float32)
        if AG == 0:
            accf *= tl.load(sa_ptr + offs_m * stride_sam, mask=m_ok, other=0.0)[:, None]
        if SBK == 0:
            accf *= tl.load(sb_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
        if HAS_BIAS:
            if pid_k == 0:
                accf += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        # output [SPLIT, M, N]: this split's slice (partials are summed afterwards)
        ptrs = out_ptr + pid_k * stride_os + offs_m[:, None] * stride_om + offs_n[None, :]
        tl.store(ptrs, accf.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def _config(m: int, n: int, k: int, kblock: int, device: torch.device) -> tuple[int, int, int, int, int, int]:
    """(BM, BN, BK, SPLIT_K, num_warps, num_stages)."""
    if interpreting():
        bm, bn, bk, warps, stages = 16, 32, 64, 4, 1
    elif m <= 64:  # 64 rows: one Hopper warpgroup MMA (small M runs weight-only anyway)
        bm, bn, bk, warps, stages = 64, 64, 128, 4, 4
    elif m <= 128:
        bm, bn, bk, warps, stages = 64, 128, 128, 4, 4
    else:
        bm, bn, bk, warps, stages = 128, 128, 128, 8, 3
    if kblock:
        bk = min(bk, kblock)
    k_tiles = -(-k // bk)
    programs = -(-m // bm) * -(-n // bn)
    split = 1
    if interpreting():  # two splits where K allows: the CPU tests cover the partial sums
        split = 1 if k_tiles < 2 else 2
    elif programs < _sms(device):  # too few tiles to fill the GPU
        split = max(1, min(k_tiles // 4, -(-2 * _sms(device) // programs)))
        split = -(-k_tiles // -(-k_tiles // split))
    return bm, bn, bk, split, warps, stages


# bench/kernels.py --sweep sets this to time candidate configs; None = the heuristic
CONFIG_OVERRIDE: tuple[int, int, int, int, int, int] | None = None


@torch.library.custom_op("mixq::w8a8_gemm", mutates_args=())
def _w8a8_op(a: torch.Tensor, sa: torch.Tensor, b: torch.Tensor, sb: torch.Tensor, zb: torch.Tensor | None,
             bias: torch.Tensor | None, act_group: int, sbn: int, sbk: int, out_dtype: torch.dtype) -> torch.Tensor:
    m, k = a.shape
    n = b.shape[0]
    kblock = min(v for v in (act_group, sbk, 1 << 30) if v)
    bm, bn, bk, split, warps, stages = CONFIG_OVERRIDE or _config(m, n, k, kblock if kblock < 1 << 30 else 0,
                                                                 a.device)
    if (act_group and act_group % bk) or (sbk and sbk % bk):
        raise ValueError(f"w8a8_gemm: BK={bk} must divide the activation group {act_group} and scale block {sbk}")
    # split-K: fp32 partials [SPLIT, M, N] summed afterwards (deterministic, no atomics)
    y = torch.empty((split, m, n), device=a.device, dtype=torch.float32 if split > 1 else out_dtype)
    if m == 0:
        return y.sum(0).to(out_dtype)
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn), split)
    _w8a8_kernel[grid](
        a, sa, b, sb, zb if zb is not None else sb, bias if bias is not None else sb, y, m, n, k,
        a.stride(0), sa.stride(0), b.stride(0), sb.stride(0) if sbk else 0, y.stride(0), y.stride(1),
        AG=act_group, SBN=max(sbn, 1), SBK=sbk, IS_INT=a.dtype == torch.int8,
        INT_EXACT=a.dtype == torch.int8 and not act_group and not sbk, HAS_ZP=zb is not None,
        HAS_BIAS=bias is not None, BM=bm, BN=bn, BK=bk, SPLIT_K=split, GROUP_M=8, num_warps=warps,
        num_stages=stages,
    )
    return y[0] if split == 1 else y.sum(0).to(out_dtype)


@_w8a8_op.register_fake
def _(a, sa, b, sb, zb, bias, act_group, sbn, sbk, out_dtype):
    return a.new_empty((a.shape[0], b.shape[0]), dtype=out_dtype)


def w8a8_gemm(a: torch.Tensor, sa: torch.Tensor, b: torch.Tensor, sb: torch.Tensor, zb: torch.Tensor | None = None,
              bias: torch.Tensor | None = None, act_group: int = 0, block: tuple[int, int] | None = None,
              out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Quantized a [M, K] (scales sa) times quantized b [N, K] (scales sb) -> [M, N] out_dtype.

    a, b    both float8_e4m3fn or both int8, K contiguous
    sa      fp32 [M, 1] per token, or [M, ceil(K/act_group)] when act_group > 0 (fp8)
    sb      fp32 [N] per channel, or [ceil(N/SBN), ceil(K/SBK)] contiguous for block=(SBN, SBK)
    zb      int32 [N] weight zero points (int8 only) or None; bias [N] float or None
    act_group, SBK: powers of two >= 32 (a K tile must lie inside one scale block)."""
    (m, k), n = a.shape, b.shape[0]
    if a.dtype != b.dtype or a.dtype not in (torch.float8_e4m3fn, torch.int8):
        raise ValueError(f"w8a8_gemm: a and b must both be float8_e4m3fn or int8, got {a.dtype} and {b.dtype}")
    if b.shape[1] != k or a.stride(1) != 1 or b.stride(1) != 1:
        raise ValueError(f"w8a8_gemm: a [M, K] and b [N, K] K-contiguous, got {list(a.shape)} and {list(b.shape)}")
    groups = -(-k // act_group) if act_group else 1
    if sa.dtype != torch.float32 or tuple(sa.shape) != (m, groups):
        raise ValueError(f"w8a8_gemm: sa must be fp32 [{m}, {groups}], got {sa.dtype} {list(sa.shape)}")
    sbn, sbk = block or (0, 0)
    want = (-(-n // sbn), -(-k // sbk)) if block else (n,)
    if sb.dtype != torch.float32 or tuple(sb.shape) != want or not sb.is_contiguous():
        raise ValueError(f"w8a8_gemm: sb must be contiguous fp32 {list(want)}, got {sb.dtype} {list(sb.shape)}")
    for name, v in (("act_group", act_group), ("SBK", sbk)):
        if v and (v < 32 or v & (v - 1)):
            raise ValueError(f"w8a8_gemm: {name}={v} must be a power of two >= 32")
    if zb is not None and (a.dtype != torch.int8 or zb.dtype != torch.int32 or tuple(zb.shape) != (n,)):
        raise ValueError("w8a8_gemm: zb must be int32 [N], int8 weights only")
    if act_group and a.dtype == torch.int8:
        raise ValueError("w8a8_gemm: per-group activation scales are FP8 only")
    return torch.ops.mixq.w8a8_gemm(a, sa, b, sb, zb, bias, act_group, sbn, sbk, out_dtype)


def scaled_mm_ok(m: int, n: int, k: int, out_dtype: torch.dtype, device: torch.device) -> bool:
    """Whether torch._scaled_mm's rowwise FP8 GEMM takes this problem (torch 2.11 rules):
    sm_89+, K and N multiples of 16, bf16 output (fp16 only on newer cuBLAS paths)."""
    if device.type != "cuda" or interpreting() or not hasattr(torch, "_scaled_mm"):
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9) and k % 16 == 0 and n % 16 == 0 \
        and out_dtype == torch.bfloat16 and m > 0


def scaled_mm_rowwise(a: torch.Tensor, sa: torch.Tensor, b: torch.Tensor, sb: torch.Tensor,
                      bias: torch.Tensor | None) -> torch.Tensor:
    """cuBLAS FP8 GEMM with per-token sa fp32 [M, 1] and per-channel sb fp32 [N] -> bf16 [M, N]."""
    if bias is not None and bias.dtype != torch.bfloat16:
        bias = bias.to(torch.bfloat16)
    return torch._scaled_mm(a, b.t(), scale_a=sa, scale_b=sb.view(1, -1), bias=bias, out_dtype=torch.bfloat16)
