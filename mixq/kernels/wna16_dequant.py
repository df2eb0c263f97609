"""Large-M W4A16/W8A16: dequantize the packed weight a column chunk at a time into a
bf16/fp16 buffer, then one cuBLAS GEMM per chunk (vLLM's AWQ path does the same from 256
tokens). The weight stays packed in memory; the buffer is transient (at most
`CHUNK_BYTES` for weights over `WHOLE_BYTES`).

Why: at prefill sizes the GEMM is compute-bound, and a mixed-input tensor-core kernel that
converts in registers either goes through shared memory (the Triton tiles: 12.5%
occupancy, 1.6x cuBLAS at M=2048) or runs on mma.sync (a third of Hopper's wgmma rate:
bench/w4a16-notes.md). Writing the dequantized weight costs 2 bytes per weight once per
GEMM; cuBLAS then runs at its own rate, reading the chunk back mostly from L2.

`dequant_chunk(m, n, k)` (a plain function, from H100 timings) says when and how wide.
"""

from __future__ import annotations

import torch

from mixq.kernels.wna16 import interpreting, triton

if triton is not None:
    import triton.language as tl

    from mixq.kernels.wna16 import _dequant, _dequant_offset

WHOLE_BYTES = 128 * 2**20  # dequantized weights up to this size: one buffer, one GEMM
CHUNK_BYTES = 32 * 2**20  # else column chunks of about this size
L2_FIT_BYTES = 40 * 2**20  # a dequantized weight this small is read back from L2 (H100: 50 MB)


def dequant_chunk(m: int, n: int, k: int, itemsize: int = 2) -> int:
    """Columns per dequantized chunk for an [m, k] x [k, n] GEMM, or 0: keep the fused
    kernel. H100 (bench/RESULTS.md, issue 18): dequantize + cuBLAS wins from 512 rows on
    every shape, from 256 on weights up to WHOLE_BYTES dequantized, from 128 where the
    dequantized weight fits in L2."""
    wbytes = k * n * itemsize
    if not (m >= 512 or (m >= 256 and wbytes <= WHOLE_BYTES) or (m >= 128 and wbytes <= L2_FIT_BYTES)):
        return 0
    if wbytes <= WHOLE_BYTES:
        return n
    return max(64, CHUNK_BYTES // (k * itemsize) // 64 * 64)


if triton is not None:

    @triton.jit
    def _wna16_dequant_kernel(qw_ptr, s_ptr, z_ptr, gidx_ptr, out_ptr, N, n0, width, stride_qk, stride_sg, stride_zg,
                              stride_o, BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZP: tl.constexpr,
                              HAS_GIDX: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, DQ: tl.constexpr,
                              off_ptr=None, stride_og=0, HAS_OFF: tl.constexpr = False):
        """out[k, n - n0] = dequantized W[n, k] for the K tile `program_id(0)` and BN columns
        of [n0, n0 + width): W^T row-major, the layout torch.mm takes as its right operand."""
        t = tl.program_id(0)
        cols = tl.program_id(1) * BN + tl.arange(0, BN)
        offs_n = n0 + cols
        n_ok = (cols < width) & (offs_n < N)
        PER: tl.constexpr = 32 // BITS
        MASK: tl.constexpr = (1 << BITS) - 1
        rw = tl.arange(0, BK // PER)
        shifts = (tl.arange(0, PER) * BITS)[None, :, None]
        packed = tl.load(qw_ptr + (t * (BK // PER) + rw)[:, None] * stride_qk + offs_n[None, :], mask=n_ok[None, :],
                         other=0, eviction_policy="evict_first")
        q = tl.reshape((packed[:, None, :] >> shifts) & MASK, (BK, BN))
        offs_k = t * BK + tl.arange(0, BK)
        DT: tl.constexpr = out_ptr.dtype.element_ty
        if HAS_GIDX:
            gk = tl.load(gidx_ptr + offs_k)
            s2 = tl.load(s_ptr + gk[:, None] * stride_sg + offs_n[None, :], mask=n_ok[None, :], other=0.0)
            if HAS_ZP:
                z2 = tl.load(z_ptr + gk[:, None] * stride_zg + offs_n[None, :], mask=n_ok[None, :], other=0).to(tl.float32)
            else:
                z2 = tl.full((BK, BN), 1 << (BITS - 1), tl.float32)
            w = ((q.to(tl.float32) - z2) * s2.to(tl.float32)).to(DT)
        else:
            g = (t * BK) // GROUP
            s = tl.load(s_ptr + g * stride_sg + offs_n, mask=n_ok, other=0.0)
            if HAS_OFF:  # w = q s + o (GGUF q4_1)
                o = tl.load(off_ptr + g * stride_og + offs_n, mask=n_ok, other=0.0).to(tl.float32)
                w = _dequant_offset(q, o, s, DT, DQ)
            else:
                if HAS_ZP:
                    z = tl.load(z_ptr + g * stride_zg + offs_n, mask=n_ok, other=0).to(tl.float32)
                else:
                    z = tl.full((BN,), 1 << (BITS - 1), tl.float32)
                w = _dequant(q, z, s, DT, BITS, DQ)
        tl.store(out_ptr + offs_k[:, None] * stride_o + cols[None, :], w, mask=n_ok[None, :])


@torch.library.custom_op("mixq::wna16_dequant_gemm", mutates_args=())
def wna16_dequant_gemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                       perm: torch.Tensor | None, bias: torch.Tensor | None, bits: int, group_size: int, n: int,
                       gidx: torch.Tensor | None, offsets: torch.Tensor | None, chunk: int) -> torch.Tensor:
    """x [M, K] -> x @ dequant(W)^T [M, N] in x's dtype, through a [K, chunk] dequantized
    buffer and torch.mm per chunk (the wna16 layout of mixq.kernels.wna16)."""
    k = x.shape[1]
    if perm is not None:
        x = x.index_select(1, perm)
    bk = (64 if k % 64 == 0 else 16) if gidx is not None else max(16, min(64, group_size & -group_size))
    if k % bk:
        raise ValueError(f"wna16 dequant: K={k} is not a multiple of {bk}")
    bn = 64 if interpreting() else 128
    upcast = interpreting() or x.dtype == torch.float32
    dq = 0 if upcast else (2 if bits == 4 or x.dtype == torch.float16 else 1)
    dummy = qweight
    extra = {} if offsets is None else dict(off_ptr=offsets, stride_og=offsets.stride(0), HAS_OFF=True)

    def fill(buf: torch.Tensor, c0: int, cn: int) -> None:
        _wna16_dequant_kernel[(k // bk, triton.cdiv(cn, bn))](
            qweight, scales, zeros if zeros is not None else dummy, gidx if gidx is not None else dummy, buf, n, c0,
            cn, qweight.stride(0), scales.stride(0), zeros.stride(0) if zeros is not None else 0, buf.stride(0),
            BITS=bits, GROUP=group_size, HAS_ZP=zeros is not None, HAS_GIDX=gidx is not None, BN=bn, BK=bk, DQ=dq,
            num_warps=4, **extra)

    return chunked_mm(x, n, chunk, bias, fill)


def chunked_mm(x: torch.Tensor, n: int, chunk: int, bias: torch.Tensor | None, fill) -> torch.Tensor:
    """x [M, K] @ W^T [M, N] through a transient [K, chunk] buffer: `fill(buf, c0, cn)` writes
    W^T's columns [c0, c0 + cn) into buf[:, :cn] (a dequantize kernel), then one torch.mm per
    chunk writes its output columns in place. Shared by wna16 and ggml's large-M paths."""
    m, k = x.shape
    out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    if m == 0:
        return out
    buf = torch.empty((k, min(chunk, n)), device=x.device, dtype=x.dtype)
    for c0 in range(0, n, chunk):
        cn = min(chunk, n - c0)
        fill(buf, c0, cn)
        torch.mm(x, buf[:, :cn], out=out if cn == n else out[:, c0:c0 + cn])  # in place, ldc = N
    if bias is not None:
        out += bias
    return out


@wna16_dequant_gemm.register_fake
def _(x, qweight, scales, zeros, perm, bias, bits, group_size, n, gidx, offsets, chunk):
    return x.new_empty((x.shape[0], n))
