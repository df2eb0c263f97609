"""Weight-only integer GEMM (W4A16 / W8A16) in Triton: y = x @ dequant(W)^T.

Kernel layout (made once by `pack_wna16`, never in forward):
  qweight int32 [K / P, N]  P = 32 / bits values per word, packed along K: word row r
                             holds k = r*P + j at bits [j*bits, (j+1)*bits). N is the
                             contiguous dim, so a tile row is one coalesced load.
  scales  [G, N]            the checkpoint's dtype (fp16/bf16/fp32), upcast in-kernel
  zeros   uint8 [G, N]      integer zero points, or None (symmetric: 2**(bits-1))
  perm    int32 [K]         act-order: kernel column j reads activation column perm[j]
Every K tile lies inside one group (BLOCK_K divides the group size), so each iteration
loads one scale row — no per-element gathers. Small M runs split-K with fp32 atomics so
enough programs stream the weight to saturate HBM; large M runs plain tiles.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from mixq.formats.packing import pack_int32

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch reference path is used instead
    triton = None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@dataclass
class WNA16Weight:
    """Compressed weight in the kernel layout (see module docstring)."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    perm: torch.Tensor | None
    bits: int
    group_size: int
    n: int
    k: int

    @property
    def nbytes(self) -> int:
        ts = [self.qweight, self.scales, self.zeros, self.perm]
        return sum(t.numel() * t.element_size() for t in ts if t is not None)


def pack_wna16(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int, group_size: int,
               perm: torch.Tensor | None = None) -> WNA16Weight:
    """Canonical -> kernel layout.

    q       uint8/int [N, K] unsigned values in [0, 2**bits), already in kernel column
            order (act-order: column j is activation column perm[j]; its group is j // G)
    scales  [N, K // G] float; zeros None or int [N, K // G]; perm None or int [K].
    """
    if bits not in (4, 8):
        raise ValueError(f"pack_wna16: bits must be 4 or 8, got {bits}")
    n, k = q.shape
    if group_size <= 0 or k % group_size:
        raise ValueError(f"pack_wna16: K={k} is not a multiple of group_size={group_size}")
    if k % (32 // bits):
        raise ValueError(f"pack_wna16: K={k} is not a multiple of {32 // bits}")
    g = k // group_size
    if tuple(scales.shape) != (n, g):
        raise ValueError(f"pack_wna16: scales shape {tuple(scales.shape)}, expected {(n, g)}")
    if zeros is not None and tuple(zeros.shape) != (n, g):
        raise ValueError(f"pack_wna16: zeros shape {tuple(zeros.shape)}, expected {(n, g)}")
    if int(q.min()) < 0 or int(q.max()) >= 2**bits:
        raise ValueError(f"pack_wna16: values out of range for {bits} bits")
    if perm is not None and tuple(perm.shape) != (k,):
        raise ValueError(f"pack_wna16: perm shape {tuple(perm.shape)}, expected ({k},)")
    qweight = pack_int32(q.t().contiguous().to(torch.int32), bits, dim=0)
    return WNA16Weight(
        qweight=qweight.contiguous(),
        scales=scales.t().contiguous(),
        zeros=None if zeros is None else zeros.t().contiguous().to(torch.uint8),
        perm=None if perm is None else perm.to(torch.int32).contiguous(),
        bits=bits, group_size=group_size, n=n, k=k,
    )


def unpack_wna16(w: WNA16Weight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Kernel layout -> canonical (q [N, K] int32, scales [N, G], zeros [N, G] | None)."""
    from mixq.formats.packing import unpack_int32

    q = unpack_int32(w.qweight, w.bits, dim=0)[: w.k].t()
    return q, w.scales.t(), None if w.zeros is None else w.zeros.t().to(torch.int32)


def wna16_reference(x: torch.Tensor, w: WNA16Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Float64 reference of wna16_gemm."""
    q, s, z = unpack_wna16(w)
    zero = torch.full_like(s, 2 ** (w.bits - 1), dtype=torch.float64) if z is None else z.double()
    groups = torch.arange(w.k, device=q.device) // w.group_size
    wd = (q.double() - zero[:, groups]) * s.double()[:, groups]  # [N, K] in kernel column order
    xd = x.double() if w.perm is None else x.double()[:, w.perm.long()]
    y = xd @ wd.t()
    return y if bias is None else y + bias.double()


if triton is not None:

    @triton.jit
    def _wna16_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, perm_ptr, b_ptr, out_ptr, M, N, K,
                      stride_xm, stride_qk, stride_sg, stride_zg, stride_om,
                      BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZP: tl.constexpr, HAS_PERM: tl.constexpr,
                      HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                      SPLIT_K: tl.constexpr, UPCAST: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        PER: tl.constexpr = 32 // BITS
        MASK: tl.constexpr = (1 << BITS) - 1
        offs_m = pid_m * BM + tl.arange(0, BM)
        offs_n = pid_n * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        m_ok = offs_m < M
        n_ok = offs_n < N
        k_tiles = K // BK
        per_split = tl.cdiv(k_tiles, SPLIT_K)
        t0 = pid_k * per_split
        t1 = tl.minimum(t0 + per_split, k_tiles)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        rw = tl.arange(0, BK // PER)  # packed word rows of one K tile
        shifts = (tl.arange(0, PER) * BITS)[None, :, None]
        for t in range(t0, t1):
            offs_k = t * BK + rk
            if HAS_PERM:
                cols = tl.load(perm_ptr + offs_k)
            else:
                cols = offs_k
            a = tl.load(x_ptr + offs_m[:, None] * stride_xm + cols[None, :], mask=m_ok[:, None], other=0.0)
            # each packed word is loaded once (weights are read exactly once: stream them
            # past the cache), then split into its PER values: row r*PER + j is k = r*PER + j
            packed = tl.load(qw_ptr + (t * (BK // PER) + rw)[:, None] * stride_qk + offs_n[None, :],
                             mask=n_ok[None, :], other=0, eviction_policy="evict_first")
            q = (packed[:, None, :] >> shifts) & MASK  # [BK / PER, PER, BN]
            q = tl.reshape(q, (BK, BN)).to(tl.float32)
            g = (t * BK) // GROUP
            s = tl.load(s_ptr + g * stride_sg + offs_n, mask=n_ok, other=0.0).to(tl.float32)
            if HAS_ZP:
                z = tl.load(z_ptr + g * stride_zg + offs_n, mask=n_ok, other=0).to(tl.float32)
            else:
                z = tl.full((BN,), 1 << (BITS - 1), tl.float32)
            w = (q - z[None, :]) * s[None, :]
            if UPCAST:  # fp32 activations (or the interpreter, whose bf16 dot is wrong)
                acc += tl.dot(a.to(tl.float32), w, input_precision="ieee")
            else:
                acc += tl.dot(a, w.to(a.dtype))
        if HAS_BIAS:
            if pid_k == 0:
                acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
        ok = m_ok[:, None] & n_ok[None, :]
        if SPLIT_K == 1:
            tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=ok)
        else:
            tl.atomic_add(ptrs, acc, mask=ok)


def _config(m: int, n: int, k: int, group: int, device: torch.device) -> tuple[int, int, int, int, int, int]:
    """(BM, BN, BK, SPLIT_K, num_warps, num_stages): small M streams the weight with
    split-K so that ~4 programs per SM are in flight; large M tiles."""
    bk = min(group, 128)
    while group % bk:
        bk //= 2
    if interpreting():
        return 16, 64, bk, 1 if k // bk < 2 else 2, 4, 1
    if m <= 16:
        bm, bn, warps, stages = 16, 128, 4, 4
    elif m <= 64:
        bm, bn, warps, stages = 64, 128, 4, 4
        bk = min(bk, 64)
    else:
        bm, bn, warps, stages = 128, 128, 8, 3
        bk = min(bk, 64)
    programs = -(-m // bm) * -(-n // bn)
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    split = 1
    if m <= 64:
        split = max(1, min(k // bk, (4 * sms) // programs))
    return bm, bn, bk, split, warps, stages


# bench/kernels.py --sweep sets this to time candidate configs; None = the heuristic
CONFIG_OVERRIDE: tuple[int, int, int, int, int, int] | None = None


def wna16_gemm(x: torch.Tensor, w: WNA16Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] fp16/bf16 (fp32 under the interpreter) -> [M, N] in x's dtype."""
    if x.dim() != 2 or x.shape[1] != w.k:
        raise ValueError(f"wna16_gemm: x must be [M, {w.k}], got {list(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"wna16_gemm: x dtype {x.dtype} not supported")
    return torch.ops.mixq.wna16_gemm(x.contiguous(), w.qweight, w.scales, w.zeros, w.perm, bias, w.bits,
                                     w.group_size, w.n)


@torch.library.custom_op("mixq::wna16_gemm", mutates_args=())
def _wna16_op(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
              perm: torch.Tensor | None, bias: torch.Tensor | None, bits: int, group_size: int,
              n: int) -> torch.Tensor:
    m, k = x.shape
    bm, bn, bk, split, warps, stages = CONFIG_OVERRIDE or _config(m, n, k, group_size, x.device)
    out = torch.zeros if split > 1 else torch.empty
    y = out((m, n), device=x.device, dtype=torch.float32 if split > 1 else x.dtype)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn), split)
    dummy = qweight
    _wna16_kernel[grid](
        x, qweight, scales, zeros if zeros is not None else dummy, perm if perm is not None else dummy,
        bias if bias is not None else dummy, y, m, n, k, x.stride(0), qweight.stride(0), scales.stride(0),
        zeros.stride(0) if zeros is not None else 0, y.stride(0),
        BITS=bits, GROUP=group_size, HAS_ZP=zeros is not None, HAS_PERM=perm is not None,
        HAS_BIAS=bias is not None, BM=bm, BN=bn, BK=bk, SPLIT_K=split,
        UPCAST=interpreting() or x.dtype == torch.float32, num_warps=warps, num_stages=stages,
    )
    return y.to(x.dtype) if split > 1 else y


@_wna16_op.register_fake
def _(x, qweight, scales, zeros, perm, bias, bits, group_size, n):
    return x.new_empty((x.shape[0], n))
