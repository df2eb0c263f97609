"""Weight-only integer GEMM (W4A16 / W8A16) in Triton: y = x @ dequant(W)^T.

Kernel layout (made once by `pack_wna16`, never in forward):
  qweight int32 [K / P, N]  P = 32 / bits values per word, packed along K: word row r
                             holds k = r*P + j at bits [j*bits, (j+1)*bits). N is the
                             contiguous dim, so a tile row is one coalesced load.
  scales  [G, N]            the checkpoint's dtype (fp16/bf16/fp32), upcast in-kernel
  zeros   uint8 [G, N]      integer zero points, or None (symmetric: 2**(bits-1))
  offsets [G, N]            or None: a float added after scaling, w = q * s + o, instead of
                             an integer zero (llama.cpp's q4_1/q5_1 blocks store d and a min)
  perm    int32 [K]         act-order: kernel column j reads activation column perm[j]
Every K tile lies inside one group (BLOCK_K divides the group size), so each iteration
loads one scale row — no per-element gathers. One row runs a GEMV kernel (no tensor
cores, split-K); more rows run tensor-core tiles whose dequantization builds 16-bit floats
from the bits (no int->float conversions), with the weight as the MMA's first operand.
Split-K partials go to an fp32 buffer that is summed afterwards (deterministic).
"""

from __future__ import annotations

import functools
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
    gidx: torch.Tensor | None = None  # int32 [K]: group of each kernel column (see pack_wna16)
    offsets: torch.Tensor | None = None  # [G, N] float: w = q * s + o (no zeros then)

    @property
    def nbytes(self) -> int:
        ts = [self.qweight, self.scales, self.zeros, self.perm, self.gidx, self.offsets]
        return sum(t.numel() * t.element_size() for t in ts if t is not None)


def pack_wna16(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int, group_size: int,
               perm: torch.Tensor | None = None, gidx: torch.Tensor | None = None,
               offsets: torch.Tensor | None = None) -> WNA16Weight:
    """Canonical -> kernel layout.

    q       uint8/int [N, K] unsigned values in [0, 2**bits), already in kernel column
            order (act-order: column j is activation column perm[j]; its group is j // G)
    scales  [N, K // G] float; zeros None or int [N, K // G]; perm None or int [K].
    gidx    None, or int [K] nondecreasing: the group (scale column) of each kernel column,
            for act-order weights split along K (a tensor-parallel shard keeps the whole scale
            table [N, G_full] while its columns fill groups unevenly); scales/zeros then have
            any number of groups and the kernel reads a scale per column.
    offsets None, or float [N, K // G]: w = q * s + o (zeros must be None; no gidx).
    """
    if bits not in (4, 8):
        raise ValueError(f"pack_wna16: bits must be 4 or 8, got {bits}")
    n, k = q.shape
    if k % (32 // bits):
        raise ValueError(f"pack_wna16: K={k} is not a multiple of {32 // bits}")
    if gidx is None:
        if group_size <= 0 or k % group_size:
            raise ValueError(f"pack_wna16: K={k} is not a multiple of group_size={group_size}")
        g = k // group_size
    else:
        g = scales.shape[1]
        if tuple(gidx.shape) != (k,):
            raise ValueError(f"pack_wna16: gidx shape {tuple(gidx.shape)}, expected ({k},)")
        gl = gidx.long()
        if k and (int(gl.min()) < 0 or int(gl.max()) >= g or bool((gl[1:] < gl[:-1]).any())):
            raise ValueError(f"pack_wna16: gidx must be nondecreasing group ids in [0, {g})")
    if tuple(scales.shape) != (n, g):
        raise ValueError(f"pack_wna16: scales shape {tuple(scales.shape)}, expected {(n, g)}")
    if zeros is not None and tuple(zeros.shape) != (n, g):
        raise ValueError(f"pack_wna16: zeros shape {tuple(zeros.shape)}, expected {(n, g)}")
    if offsets is not None and (zeros is not None or gidx is not None or tuple(offsets.shape) != (n, g)):
        raise ValueError(f"pack_wna16: offsets must be [N, G] = {(n, g)} with no zeros and no gidx")
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
        gidx=None if gidx is None else gidx.to(torch.int32).contiguous(),
        offsets=None if offsets is None else offsets.t().contiguous(),
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
    if w.offsets is not None:
        zero = torch.zeros_like(zero)
    groups = torch.arange(w.k, device=q.device) // w.group_size if w.gidx is None else w.gidx.long()
    wd = (q.double() - zero[:, groups]) * s.double()[:, groups]  # [N, K] in kernel column order
    if w.offsets is not None:
        wd = wd + w.offsets.t().double()[:, groups]
    xd = x.double() if w.perm is None else x.double()[:, w.perm.long()]
    y = xd @ wd.t()
    return y if bias is None else y + bias.double()


@dataclass(frozen=True)
class WNA16Config:
    """A launch configuration. kind "gemv": no tensor cores, one activation row (BN
    columns per program, split-K programs over K); kind "mm": tensor cores, BM x BN tiles,
    `swap` computes out^T = W^T x^T so the dequantized weight is the MMA's first operand."""

    kind: str
    bm: int
    bn: int
    bk: int
    split_k: int
    num_warps: int
    num_stages: int
    swap: bool = True


if triton is not None:
    from mixq.kernels.tiles import (
        SplitOutput,
        grouped_tile,
        split_k_range,
        store_tile,
    )

    @triton.jit
    def _round16(v, DT: tl.constexpr, F32_MATH: tl.constexpr):
        """fp32 v -> DT, to nearest even. The interpreter (F32_MATH) truncates a bf16 cast:
        there the fp32 bits are first rounded to bf16's 8 significant bits."""
        if F32_MATH and DT == tl.bfloat16:
            b = v.to(tl.uint32, bitcast=True)
            v = ((b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
        return v.to(DT)

    @triton.jit
    def _dequant(q, z, s, DT: tl.constexpr, BITS: tl.constexpr, MODE: tl.constexpr,
                 F32_MATH: tl.constexpr = False):
        """Unsigned ints q [.., BN] (int32), zero z [BN] fp32, scale s [BN] -> q - z times s in DT.

        MODE 0: fp32 math (fp32 activations, and the interpreter). MODE 1: 2**23 + q built
        from the bits (no quarter-rate int->float conversion), fp32 math, one rounding to DT.
        MODE 2: BASE + q as a 16-bit float bit pattern (BASE 128 for bf16, 1024 for fp16,
        exact for every 4-bit value), q - z exact, times s: one rounding, all 16-bit math.
        F32_MATH: MODE 1/2 forced under the interpreter, which holds bf16 as raw uint16 bits
        (16-bit arithmetic on them would be integer math) and truncates casts to bf16: the
        same bit patterns and constants, the exact q - z times the 16-bit scale in fp32, and
        the GPU's round-to-nearest-even done on the bits (_round16)."""
        if MODE == 0:
            return ((q.to(tl.float32) - z[None, :]) * s.to(tl.float32)[None, :]).to(DT)
        elif MODE == 1:
            qf = (q | 0x4B000000).to(tl.float32, bitcast=True)
            return _round16((qf - (z + 8388608.0)[None, :]) * s.to(tl.float32)[None, :], DT, F32_MATH)
        else:
            if DT == tl.bfloat16:
                qh = (q | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True)
                base = (z + 128.0).to(tl.bfloat16)
            else:
                qh = (q | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
                base = (z + 1024.0).to(tl.float16)
            if F32_MATH:
                s16 = _round16(s.to(tl.float32), DT, True).to(tl.float32)
                return _round16((qh.to(tl.float32) - base.to(tl.float32)[None, :]) * s16[None, :], DT, True)
            return (qh - base[None, :]) * s.to(DT)[None, :]

    @triton.jit
    def _dequant_offset(q, o, s, DT: tl.constexpr, MODE: tl.constexpr, F32_MATH: tl.constexpr = False):
        """q * s + o for a floating offset o [BN] (q4_1-style blocks), fp32 math and one
        rounding to DT; MODE > 0 builds the float from the bits (2**23 + q)."""
        if MODE == 0:
            qf = q.to(tl.float32)
        else:
            qf = (q | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
        return _round16(qf * s.to(tl.float32)[None, :] + o[None, :], DT, F32_MATH)

    @triton.jit
    def _wna16_mm_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, perm_ptr, b_ptr, out_ptr, ws_ptr, cnt_ptr, gidx_ptr, M, N, K,
                         split_k, stride_xm, stride_qk, stride_sg, stride_zg, stride_os, stride_om,
                         BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZP: tl.constexpr, HAS_PERM: tl.constexpr,
                         HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                         SWAP: tl.constexpr, DQ: tl.constexpr, UPCAST: tl.constexpr, GROUP_M: tl.constexpr,
                         HAS_GIDX: tl.constexpr = False, FIXUP: tl.constexpr = True, off_ptr=None, stride_og=0,
                         HAS_OFF: tl.constexpr = False):
        """Tensor-core tiles. Split-K partials go to ws (split s at ws + s * stride_os) and the
        last split of a tile sums them into out (tiles.store_tile).
        HAS_GIDX: a scale (and zero) per kernel column through gidx, for act-order weights
        split along K whose tiles may span groups."""
        pid = tl.program_id(0)
        pid_k = tl.program_id(1)
        pid_m, pid_n = grouped_tile(pid, M, N, BM, BN, GROUP_M)
        PER: tl.constexpr = 32 // BITS
        MASK: tl.constexpr = (1 << BITS) - 1
        offs_m = pid_m * BM + tl.arange(0, BM)
        offs_n = pid_n * BN + tl.arange(0, BN)
        m_ok = offs_m < M
        n_ok = offs_n < N
        t0, t1 = split_k_range(pid_k, K // BK, split_k)
        rk = tl.arange(0, BK)
        rw = tl.arange(0, BK // PER)  # packed word rows of one K tile
        shifts = (tl.arange(0, PER) * BITS)[None, :, None]
        # the dequantized tile's dtype: fp32 in the fp32 mode, else the activations' (with
        # UPCAST, a forced 16-bit mode under the interpreter, then upcast for the dot)
        DT: tl.constexpr = tl.float32 if UPCAST and DQ == 0 else x_ptr.dtype.element_ty
        if SWAP:
            acc = tl.zeros((BN, BM), dtype=tl.float32)
        else:
            acc = tl.zeros((BM, BN), dtype=tl.float32)
        for t in range(t0, t1):
            offs_k = t * BK + rk
            if HAS_PERM:
                cols = tl.load(perm_ptr + offs_k)
            else:
                cols = offs_k
            # each packed word is loaded once (weights are read exactly once: stream them
            # past the cache) and split in registers: row r*PER + j of the tile is slot j
            packed = tl.load(qw_ptr + (t * (BK // PER) + rw)[:, None] * stride_qk + offs_n[None, :],
                             mask=n_ok[None, :], other=0, eviction_policy="evict_first")
            q = tl.reshape((packed[:, None, :] >> shifts) & MASK, (BK, BN))
            if HAS_GIDX:  # per-column groups: gather a scale (and zero) row per column
                gk = tl.load(gidx_ptr + offs_k)
                s2 = tl.load(s_ptr + gk[:, None] * stride_sg + offs_n[None, :], mask=n_ok[None, :], other=0.0)
                if HAS_ZP:
                    z2 = tl.load(z_ptr + gk[:, None] * stride_zg + offs_n[None, :], mask=n_ok[None, :],
                                 other=0).to(tl.float32)
                else:
                    z2 = tl.full((BK, BN), 1 << (BITS - 1), tl.float32)
                w = ((q.to(tl.float32) - z2) * s2.to(tl.float32)).to(DT)  # [BK, BN]
            else:
                g = (t * BK) // GROUP
                s = tl.load(s_ptr + g * stride_sg + offs_n, mask=n_ok, other=0.0)
                if HAS_OFF:
                    o = tl.load(off_ptr + g * stride_og + offs_n, mask=n_ok, other=0.0).to(tl.float32)
                    w = _dequant_offset(q, o, s, DT, DQ, UPCAST)  # [BK, BN]
                else:
                    if HAS_ZP:
                        z = tl.load(z_ptr + g * stride_zg + offs_n, mask=n_ok, other=0).to(tl.float32)
                    else:
                        z = tl.full((BN,), 1 << (BITS - 1), tl.float32)
                    w = _dequant(q, z, s, DT, BITS, DQ, UPCAST)  # [BK, BN]
            if SWAP:
                a = tl.load(x_ptr + offs_m[None, :] * stride_xm + cols[:, None], mask=m_ok[None, :], other=0.0)
                if UPCAST:  # fp32 activations (or the interpreter, whose bf16 dot is wrong)
                    acc += tl.dot(tl.trans(w).to(tl.float32), a.to(tl.float32), input_precision="ieee")
                else:
                    acc += tl.dot(tl.trans(w), a)  # [BN, BK] x [BK, BM]
            else:
                a = tl.load(x_ptr + offs_m[:, None] * stride_xm + cols[None, :], mask=m_ok[:, None], other=0.0)
                if UPCAST:
                    acc += tl.dot(a.to(tl.float32), w.to(tl.float32), input_precision="ieee")
                else:
                    acc += tl.dot(a, w)
        if HAS_BIAS:
            if pid_k == 0:
                b = tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
                acc += b[:, None] if SWAP else b[None, :]
        if SWAP:  # store the transposed tile through transposed offsets (no layout shuffle)
            offs = offs_m[None, :] * stride_om + offs_n[:, None]
            store_tile(acc, out_ptr, ws_ptr, cnt_ptr, pid, pid_k, split_k, offs, offs, stride_os,
                       m_ok[None, :] & n_ok[:, None], FIXUP)
        else:
            offs = offs_m[:, None] * stride_om + offs_n[None, :]
            store_tile(acc, out_ptr, ws_ptr, cnt_ptr, pid, pid_k, split_k, offs, offs, stride_os,
                       m_ok[:, None] & n_ok[None, :], FIXUP)

    @triton.jit
    def _wna16_gemv_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, perm_ptr, b_ptr, out_ptr, ws_ptr, cnt_ptr, N, K, split_k,
                           stride_qk, stride_sg, stride_zg, stride_os,
                           BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZP: tl.constexpr, HAS_PERM: tl.constexpr,
                           HAS_BIAS: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, off_ptr=None, stride_og=0,
                           HAS_OFF: tl.constexpr = False):
        """One activation row, no tensor cores: per packed slot j a [BK/PER, BN] FMA into a
        2-D accumulator (no 3-D tensors, no reshape), magic-number dequant, and the zero
        point and scale applied once per tile: sum_k x (q - z) s = s (sum x q - z sum x);
        a floating offset the same way: sum_k x (q s + o) = s sum x q + o sum x."""
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        PER: tl.constexpr = 32 // BITS
        MASK: tl.constexpr = (1 << BITS) - 1
        R: tl.constexpr = BK // PER
        offs_n = pid_n * BN + tl.arange(0, BN)
        n_ok = offs_n < N
        r = tl.arange(0, R)
        t0, t1 = split_k_range(pid_k, K // BK, split_k)
        acc = tl.zeros((BN,), dtype=tl.float32)
        for t in range(t0, t1):
            packed = tl.load(qw_ptr + (t * R + r)[:, None] * stride_qk + offs_n[None, :], mask=n_ok[None, :],
                             other=0, eviction_policy="evict_first")
            g = (t * BK) // GROUP
            s = tl.load(s_ptr + g * stride_sg + offs_n, mask=n_ok, other=0.0).to(tl.float32)
            if HAS_OFF:
                z = tl.load(off_ptr + g * stride_og + offs_n, mask=n_ok, other=0.0).to(tl.float32)
            elif HAS_ZP:
                z = tl.load(z_ptr + g * stride_zg + offs_n, mask=n_ok, other=0).to(tl.float32)
            else:
                z = tl.full((BN,), 1 << (BITS - 1), tl.float32)
            part = tl.zeros((R, BN), dtype=tl.float32)
            xs = tl.zeros((R,), dtype=tl.float32)
            for j in tl.static_range(PER):
                offs_k = t * BK + r * PER + j
                if HAS_PERM:
                    cols = tl.load(perm_ptr + offs_k)
                else:
                    cols = offs_k
                xj = tl.load(x_ptr + cols).to(tl.float32)  # [R]
                qj = (((packed >> (j * BITS)) & MASK) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
                part += xj[:, None] * qj
                xs += xj
            if HAS_OFF:  # z holds the offset o here
                acc += s * tl.sum(part, axis=0) + z * tl.sum(xs, axis=0)
            else:
                acc += s * (tl.sum(part, axis=0) - z * tl.sum(xs, axis=0))
        if HAS_BIAS:
            if pid_k == 0:
                acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        store_tile(acc, out_ptr, ws_ptr, cnt_ptr, pid_n, pid_k, split_k, offs_n, offs_n, stride_os, n_ok, True)


def _bk_for(group: int, cap: int) -> int:
    """The largest power of two <= cap that divides `group` (a K tile inside one group)."""
    bk = 1 << (min(group, cap).bit_length() - 1)
    while group % bk:
        bk //= 2
    return bk


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def _split(blocks: int, k_tiles: int, want: int, min_tiles: int = 1) -> int:
    """Split-K factor that gives about `want` programs for `blocks` output tiles, keeping at
    least `min_tiles` K tiles per split: small N (or few row blocks) would otherwise leave
    most SMs idle while a few stream the whole weight."""
    return max(1, min(-(-want // blocks), k_tiles // min_tiles))


def _config(m: int, n: int, k: int, group: int, device: torch.device) -> WNA16Config:
    """The launch configuration: few large blocks under the interpreter, else gpu_config."""
    if interpreting():  # few large blocks run fastest under the interpreter
        bk = _bk_for(group, 128)
        if m == 1:
            return WNA16Config("gemv", 1, 64, bk, 2 if k // bk >= 2 else 1, 4, 1)
        return WNA16Config("mm", 16 if m <= 16 else 32, 64, bk, 2 if k // bk >= 2 else 1, 4, 1, m <= 16)
    return gpu_config(m, n, k, group, _sm_count(device))


def gpu_config(m: int, n: int, k: int, group: int, sms: int) -> WNA16Config:
    """The launch heuristic for a GPU with `sms` multiprocessors (a plain function: tested
    on its own), from timings on an H100 (bench/w4a16-notes.md, bench/kernels.py --sweep
    wna16, .gpu GEMV sweep on 0.5-29 MiB weights): one row -> GEMV, 64-256 columns
    per program and K split up to 32 ways; up to 16 rows -> 16-row tiles, swapped; up to 64 ->
    64-row tiles (swapped, unsplit, when N is large); beyond -> 256 x 128 tiles, or up to 512
    rows 64 x 128 tiles with split-K where 256 x 128 tiles would be fewer than the SMs.
    Split-K fills the GPU: ~8 programs per SM up to 16 rows, ~2 up to 512 rows."""
    cdiv = lambda a, b: -(-a // b)  # noqa: E731
    if m <= 64:
        bk = _bk_for(group, 128)
        if m == 1:  # H100 sweep (bench/RESULTS.md): wide column blocks, up to 32 K splits
            bn = 256 if n >= 2048 else 128 if n > 512 else 64
            return WNA16Config("gemv", 1, bn, bk, min(k // bk, 32), 4, 1)
        if m <= 16:
            return WNA16Config("mm", 16, 64, bk, _split(cdiv(n, 64), k // bk, 8 * sms), 4, 4, True)
        if n >= 16384:  # enough 128-wide column blocks to fill the SMs: no split
            return WNA16Config("mm", 64, 128, bk, 1, 4, 4, True)
        return WNA16Config("mm", 64, 64, bk, _split(cdiv(n, 64), k // bk, 4 * sms, 4), 4, 4, False)
    bk = _bk_for(group, 64)
    if m <= 512 and cdiv(m, 256) * cdiv(n, 128) < sms:  # big tiles would leave SMs idle
        return WNA16Config("mm", 64, 128, bk, _split(cdiv(m, 64) * cdiv(n, 128), k // bk, 2 * sms, 8), 4, 3, True)
    # no split-K here: the fp32 partials would cost more traffic than the idle SMs
    return WNA16Config("mm", 256, 128, bk, 1, 8, 3, True)


# bench/kernels.py --sweep sets this to time candidate configs; None = the heuristic
CONFIG_OVERRIDE: WNA16Config | None = None


# columns per dequantized chunk to force (tests, sweeps): 0 = always the fused kernels,
# None = wna16_dequant.dequant_chunk decides
CHUNK_OVERRIDE: int | None = None


def wna16_gemm(x: torch.Tensor, w: WNA16Weight, bias: torch.Tensor | None = None, *,
               config: WNA16Config | None = None, gpu_dequant: bool = False) -> torch.Tensor:
    """x [M, K] fp16/bf16 (fp32 under the interpreter) -> [M, N] in x's dtype. Large M
    dequantizes to a buffer and runs cuBLAS (mixq.kernels.wna16_dequant).

    Tests and sweeps only: `config` replaces the heuristic's launch configuration;
    `gpu_dequant` runs the 16-bit dequantization the GPU runs (magic-number bit patterns,
    weights rounded to x's dtype) under the interpreter too, which otherwise dequantizes
    in fp32. Either one launches the fused kernel directly, outside the custom op."""
    if x.dim() != 2 or x.shape[1] != w.k:
        raise ValueError(f"wna16_gemm: x must be [M, {w.k}], got {list(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"wna16_gemm: x dtype {x.dtype} not supported")
    args = (x.contiguous(), w.qweight, w.scales, w.zeros, w.perm, bias, w.bits, w.group_size, w.n, w.gidx,
            w.offsets)
    if config is not None or gpu_dequant:
        return _launch(*args, config=config, gpu_dequant=gpu_dequant)
    chunk = CHUNK_OVERRIDE
    if chunk is None:
        chunk = 0 if CONFIG_OVERRIDE is not None else wna16_dequant.dequant_chunk(x.shape[0], w.n, w.k, x.element_size())
    if chunk:
        return torch.ops.mixq.wna16_dequant_gemm(*args, chunk)
    return torch.ops.mixq.wna16_gemm(*args)


@torch.library.custom_op("mixq::wna16_gemm", mutates_args=())
def _wna16_op(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
              perm: torch.Tensor | None, bias: torch.Tensor | None, bits: int, group_size: int,
              n: int, gidx: torch.Tensor | None = None, offsets: torch.Tensor | None = None) -> torch.Tensor:
    return _launch(x, qweight, scales, zeros, perm, bias, bits, group_size, n, gidx, offsets)


def _launch(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
            perm: torch.Tensor | None, bias: torch.Tensor | None, bits: int, group_size: int, n: int,
            gidx: torch.Tensor | None = None, offsets: torch.Tensor | None = None, config: WNA16Config | None = None,
            gpu_dequant: bool = False) -> torch.Tensor:
    m, k = x.shape
    if offsets is not None and (zeros is not None or gidx is not None):
        raise ValueError("wna16: a floating offset takes no zeros and no gidx")
    if gidx is None:
        c = config or CONFIG_OVERRIDE or _config(m, n, k, group_size, x.device)
        if k % c.bk or group_size % c.bk:
            raise ValueError(f"wna16: BK={c.bk} must divide K={k} and the group size {group_size}")
    else:  # per-column groups: tensor-core tiles at any M (the GEMV assumes a group per tile)
        c = config or CONFIG_OVERRIDE or _config(max(m, 2), n, k, k, x.device)
        if c.kind != "mm" or k % c.bk:
            raise ValueError(f"wna16: per-column groups need an 'mm' config whose BK divides K={k}")
    split = max(1, min(c.split_k, k // c.bk))
    dummy = qweight
    # split-K: fp32 partials [split, M, N], summed in split order by each tile's last split
    # (small tiles) or by a torch sum afterwards
    so = SplitOutput(m, n, split, c.bm, c.bn, x.dtype, x.device)
    cnt = so.counters if so.counters is not None else dummy
    common = dict(BITS=bits, GROUP=group_size, HAS_ZP=zeros is not None, HAS_PERM=perm is not None,
                  HAS_BIAS=bias is not None, BN=c.bn, BK=c.bk, num_warps=c.num_warps, num_stages=c.num_stages)
    if offsets is not None:
        common.update(off_ptr=offsets, stride_og=offsets.stride(0), HAS_OFF=True)
    args = (x, qweight, scales, zeros if zeros is not None else dummy, perm if perm is not None else dummy,
            bias if bias is not None else dummy, so.out, so.ws, cnt)
    if gidx is not None:
        args += (gidx,)
    if c.kind == "gemv":
        if m != 1:
            raise ValueError(f"wna16: the gemv config takes one row, got M={m}")
        _wna16_gemv_kernel[(triton.cdiv(n, c.bn), split)](
            *args, n, k, split, qweight.stride(0), scales.stride(0), zeros.stride(0) if zeros is not None else 0,
            so.split_stride, **common)
    else:
        upcast = interpreting() or x.dtype == torch.float32
        # 16-bit magic dequant is exact for 4-bit values in bf16 and for 4/8-bit in fp16
        gpu = x.dtype != torch.float32 and (gpu_dequant or not upcast)
        dq = (2 if bits == 4 or x.dtype == torch.float16 else 1) if gpu else 0
        _wna16_mm_kernel[(triton.cdiv(m, c.bm) * triton.cdiv(n, c.bn), split)](
            *args, *(() if gidx is not None else (dummy,)), m, n, k, split, x.stride(0), qweight.stride(0),
            scales.stride(0), zeros.stride(0) if zeros is not None else 0, so.split_stride, n,
            BM=c.bm, SWAP=c.swap, DQ=dq, UPCAST=upcast, GROUP_M=8, HAS_GIDX=gidx is not None, FIXUP=so.fixup, **common)
    return so.result()


@_wna16_op.register_fake
def _(x, qweight, scales, zeros, perm, bias, bits, group_size, n, gidx=None, offsets=None):
    return x.new_empty((x.shape[0], n))


from mixq.kernels import wna16_dequant  # noqa: E402  (it imports this module's kernels)
