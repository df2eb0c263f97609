"""GEMM over llama.cpp's 5- and 6-bit and K-quant blocks in Triton: y = x @ dequant(W)^T.

For q5_0, q5_1, q4_k, q5_k and q6_k (q4_0, q4_1 and q8_0 map onto wna16). Kernel layout,
made once by `pack_ggml` from the file's blocks, holds the same information in
column-major tiles (no value is rounded or widened):

  ql  int32 [K / 8, N]         low 4 bits of each value, packed along K (slot j: bits 4j)
  qh  int32 [K·HB / 32, N]     the HB high bits (1: q5_*, 2: q6_k), packed along K; or None
  d   fp16  [K / SB, N]        block scale (SB = 32), or super-block scale (SB = 256)
  m   fp16  [K / SB, N]        q5_1: the block min (added); q4_k/q5_k: dmin; else None
  sc  int8  [K / SG, N]        K-quants: sub-block scale (SG = 32; 16 for q6_k, signed)
  mn  uint8 [K / SG, N]        q4_k/q5_k: sub-block min
  value q = ql | qh << 4;  w = (q - ZERO) * S + O per sub-block, with
    q5_0: S = d, ZERO 16;  q5_1: S = d, O = m;  q4_k/q5_k: S = d·sc, O = -(dmin·mn);
    q6_k: S = d·sc, ZERO 32   (S and O in fp32, as llama.cpp and gguf compute them)

A K tile is one sub-block (BK = SG), so each iteration loads one row of sub-scales and one of
block scales. One activation row runs a GEMV (no tensor cores, split-K; the scale and offset
are applied once per tile: sum x (q - Z) S + O sum x); more rows run tensor-core tiles whose
dequantized weight is rounded once to the activation dtype. Prefill-sized M (the rule of
`wna16_dequant.dequant_chunk`) dequantizes column chunks into a transient buffer and runs
cuBLAS per chunk, as wna16 does: the tiles reach 4-6x cuBLAS BF16 there (H100, RESULTS).
"""

from __future__ import annotations

import torch

from mixq.formats.gguf_quants import Parts
from mixq.formats.packing import pack_int32, unpack_int32
from mixq.kernels.wna16 import interpreting

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch reference path is used instead
    triton = None

# per type: (high bits HB, super-block SB, sub-block SG, ZERO)
GGML_KERNEL_TYPES = {"q5_0": (1, 32, 32, 16), "q5_1": (1, 32, 32, 0), "q4_k": (0, 256, 32, 0),
                     "q5_k": (1, 256, 32, 0), "q6_k": (2, 256, 16, 32)}


def pack_ggml(p: Parts, qtype: str) -> dict[str, torch.Tensor]:
    """Decoded blocks (mixq.formats.gguf_quants.decode) -> the kernel layout above, by role."""
    hb, sb, sg, zero = GGML_KERNEL_TYPES[qtype]
    if p.zero != zero or p.sub != sg:
        raise ValueError(f"pack_ggml: {qtype} parts have zero {p.zero}, sub-block {p.sub}")
    q = p.q.t().contiguous().to(torch.int32)  # [K, N]
    out = {"ql": pack_int32(q & 0xF, 4, dim=0), "d": p.d.t().contiguous()}
    if hb == 1:
        out["qh"] = _pack_bits(q >> 4, 1)
    elif hb == 2:
        out["qh"] = pack_int32(q >> 4, 2, dim=0)
    if p.m is not None:
        out["m"] = p.m.t().contiguous()
    if p.sc is not None:
        out["sc"] = p.sc.t().contiguous().to(torch.int8)
    if p.mn is not None:
        out["mn"] = p.mn.t().contiguous().to(torch.uint8)
    return out


def _pack_bits(v: torch.Tensor, bits: int) -> torch.Tensor:
    """[K, N] single bits -> int32 [K/32, N], value k at bit k % 32 of word k // 32."""
    k, n = v.shape
    shifts = torch.arange(32, dtype=torch.int64, device=v.device)
    words = (v.reshape(k // 32, 32, n).to(torch.int64) << shifts[None, :, None]).sum(1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_ggml(t: dict[str, torch.Tensor], qtype: str, k: int) -> torch.Tensor:
    """Kernel layout -> dense float64 [N, K] (the reference the kernel is tested against)."""
    hb, sb, sg, zero = GGML_KERNEL_TYPES[qtype]
    q = unpack_int32(t["ql"], 4, dim=0)[:k].long()  # [K, N]
    if hb == 1:
        words = t["qh"].long() & 0xFFFFFFFF
        q |= ((words.repeat_interleave(32, 0) >> (torch.arange(k, device=q.device) % 32)[:, None]) & 1) << 4
    elif hb == 2:
        q |= unpack_int32(t["qh"], 2, dim=0)[:k].long() << 4
    d = t["d"].double().repeat_interleave(sb, 0)[:k]
    s = d * (t["sc"].double().repeat_interleave(sg, 0)[:k] if "sc" in t else 1.0)
    w = (q.double() - zero) * s
    if "m" in t:
        m = t["m"].double().repeat_interleave(sb, 0)[:k]
        w = w - m * t["mn"].double().repeat_interleave(sg, 0)[:k] if "mn" in t else w + m
    return w.t()


if triton is not None:
    from mixq.kernels.tiles import SplitOutput, grouped_tile, split_k_range, store_tile

    @triton.jit
    def _tile(ql_ptr, qh_ptr, d_ptr, m_ptr, sc_ptr, mn_ptr, t, offs_n, n_ok, stride_l, stride_h, stride_d, stride_s,
              HB: tl.constexpr, SB: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, HAS_M: tl.constexpr,
              HAS_SC: tl.constexpr, HAS_MN: tl.constexpr):
        """K tile t (one sub-block of BK values) of BN columns: (q [BK, BN] int32, S [BN], O [BN])."""
        rw = tl.arange(0, BK // 8)
        packed = tl.load(ql_ptr + (t * (BK // 8) + rw)[:, None] * stride_l + offs_n[None, :], mask=n_ok[None, :],
                         other=0, eviction_policy="evict_first")
        q = tl.reshape((packed[:, None, :] >> (tl.arange(0, 8) * 4)[None, :, None]) & 0xF, (BK, BN))
        if HB > 0:  # one word row of high bits per tile (32 values x 1 bit, 16 x 2 bits)
            hw = tl.load(qh_ptr + t * stride_h + offs_n, mask=n_ok, other=0, eviction_policy="evict_first")
            q |= ((hw[None, :] >> (tl.arange(0, BK) * HB)[:, None]) & ((1 << HB) - 1)) << 4
        g = (t * BK) // SB
        d = tl.load(d_ptr + g * stride_d + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        s = d
        if HAS_SC:
            s = d * tl.load(sc_ptr + t * stride_s + offs_n, mask=n_ok, other=0).to(tl.float32)
        o = tl.zeros((BN,), dtype=tl.float32)
        if HAS_M:
            m = tl.load(m_ptr + g * stride_d + offs_n, mask=n_ok, other=0.0).to(tl.float32)
            if HAS_MN:
                o = -(m * tl.load(mn_ptr + t * stride_s + offs_n, mask=n_ok, other=0).to(tl.float32))
            else:
                o = m
        return q, s, o

    @triton.jit
    def _ggml_gemv_kernel(x_ptr, ql_ptr, qh_ptr, d_ptr, m_ptr, sc_ptr, mn_ptr, b_ptr, out_ptr, ws_ptr, cnt_ptr, N, K,
                          split_k, stride_l, stride_h, stride_d, stride_s, stride_os,
                          HB: tl.constexpr, SB: tl.constexpr, ZERO: tl.constexpr, HAS_M: tl.constexpr,
                          HAS_SC: tl.constexpr, HAS_MN: tl.constexpr, HAS_BIAS: tl.constexpr, BN: tl.constexpr,
                          BK: tl.constexpr):
        """One activation row: per tile sum_k x_k (q - ZERO) S + O sum_k x_k, in fp32."""
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_n = pid_n * BN + tl.arange(0, BN)
        n_ok = offs_n < N
        t0, t1 = split_k_range(pid_k, K // BK, split_k)
        acc = tl.zeros((BN,), dtype=tl.float32)
        for t in range(t0, t1):
            q, s, o = _tile(ql_ptr, qh_ptr, d_ptr, m_ptr, sc_ptr, mn_ptr, t, offs_n, n_ok, stride_l, stride_h,
                            stride_d, stride_s, HB, SB, BK, BN, HAS_M, HAS_SC, HAS_MN)
            x = tl.load(x_ptr + t * BK + tl.arange(0, BK)).to(tl.float32)  # [BK]
            qx = tl.sum(x[:, None] * (q - ZERO).to(tl.float32), axis=0)  # [BN]
            acc += s * qx + o * tl.sum(x, axis=0)
        if HAS_BIAS:
            if pid_k == 0:
                acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        store_tile(acc, out_ptr, ws_ptr, cnt_ptr, pid_n, pid_k, split_k, offs_n, offs_n, stride_os, n_ok, True)

    @triton.jit
    def _ggml_mm_kernel(x_ptr, ql_ptr, qh_ptr, d_ptr, m_ptr, sc_ptr, mn_ptr, b_ptr, out_ptr, ws_ptr, cnt_ptr, M, N, K,
                        split_k, stride_xm, stride_l, stride_h, stride_d, stride_s, stride_os, stride_om,
                        HB: tl.constexpr, SB: tl.constexpr, ZERO: tl.constexpr, HAS_M: tl.constexpr,
                        HAS_SC: tl.constexpr, HAS_MN: tl.constexpr, HAS_BIAS: tl.constexpr, BM: tl.constexpr,
                        BN: tl.constexpr, BK: tl.constexpr, UPCAST: tl.constexpr, GROUP_M: tl.constexpr,
                        FIXUP: tl.constexpr):
        """Tensor-core tiles [BM, BN]; the weight tile dequantized in fp32, rounded once to
        the activation dtype (UPCAST: kept fp32, for fp32 activations and the interpreter)."""
        pid = tl.program_id(0)
        pid_k = tl.program_id(1)
        pid_m, pid_n = grouped_tile(pid, M, N, BM, BN, GROUP_M)
        offs_m = pid_m * BM + tl.arange(0, BM)
        offs_n = pid_n * BN + tl.arange(0, BN)
        m_ok = offs_m < M
        n_ok = offs_n < N
        t0, t1 = split_k_range(pid_k, K // BK, split_k)
        DT: tl.constexpr = tl.float32 if UPCAST else x_ptr.dtype.element_ty
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for t in range(t0, t1):
            q, s, o = _tile(ql_ptr, qh_ptr, d_ptr, m_ptr, sc_ptr, mn_ptr, t, offs_n, n_ok, stride_l, stride_h,
                            stride_d, stride_s, HB, SB, BK, BN, HAS_M, HAS_SC, HAS_MN)
            w = ((q - ZERO).to(tl.float32) * s[None, :] + o[None, :]).to(DT)  # [BK, BN]
            a = tl.load(x_ptr + offs_m[:, None] * stride_xm + (t * BK + tl.arange(0, BK))[None, :],
                        mask=m_ok[:, None], other=0.0)
            if UPCAST:
                acc += tl.dot(a.to(tl.float32), w, input_precision="ieee")
            else:
                acc += tl.dot(a, w)
        if HAS_BIAS:
            if pid_k == 0:
                acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        offs = offs_m[:, None] * stride_om + offs_n[None, :]
        store_tile(acc, out_ptr, ws_ptr, cnt_ptr, pid, pid_k, split_k, offs, offs, stride_os,
                   m_ok[:, None] & n_ok[None, :], FIXUP)


    @triton.jit
    def _ggml_dequant_kernel(ql_ptr, qh_ptr, d_ptr, m_ptr, sc_ptr, mn_ptr, out_ptr, N, n0, width, stride_l, stride_h,
                             stride_d, stride_s, stride_o, HB: tl.constexpr, SB: tl.constexpr, ZERO: tl.constexpr,
                             HAS_M: tl.constexpr, HAS_SC: tl.constexpr, HAS_MN: tl.constexpr, BN: tl.constexpr,
                             BK: tl.constexpr):
        """out[k, n - n0] = W[n, k] for the sub-block `program_id(0)` and BN columns of
        [n0, n0 + width), in out's dtype (computed in fp32, rounded once): W^T row-major."""
        t = tl.program_id(0)
        cols = tl.program_id(1) * BN + tl.arange(0, BN)
        offs_n = n0 + cols
        n_ok = (cols < width) & (offs_n < N)
        q, s, o = _tile(ql_ptr, qh_ptr, d_ptr, m_ptr, sc_ptr, mn_ptr, t, offs_n, n_ok, stride_l, stride_h, stride_d,
                        stride_s, HB, SB, BK, BN, HAS_M, HAS_SC, HAS_MN)
        w = (q - ZERO).to(tl.float32) * s[None, :] + o[None, :]
        offs_k = t * BK + tl.arange(0, BK)
        tl.store(out_ptr + offs_k[:, None] * stride_o + cols[None, :], w.to(out_ptr.dtype.element_ty),
                 mask=n_ok[None, :])


CHUNK_OVERRIDE: int | None = None  # tests: force the dequantize + cuBLAS path at this chunk width


def _sm_count(device: torch.device) -> int:
    from mixq.kernels.wna16 import _sm_count as sms

    return sms(device)


def _config(m: int, n: int, k: int, bk: int, device: torch.device) -> tuple[str, int, int, int, int, int]:
    """(kind, BM, BN, split_k, num_warps, num_stages): a GEMV for one row, else tiles; split-K
    to give ~4 programs per SM (untuned: bench/kernels.py --only ggml times it)."""
    tiles_k = k // bk
    if interpreting():
        return ("gemv", 1, 64, min(2, tiles_k), 4, 1) if m == 1 else ("mm", 16, 64, min(2, tiles_k), 4, 1)
    sms = _sm_count(device)
    if m == 1:
        bn = 128 if n > 512 else 64
        return "gemv", 1, bn, max(1, min(tiles_k, -(-4 * sms // -(-n // bn)), 32)), 4, 2
    bm = 16 if m <= 16 else 64 if m <= 64 else 128
    bn = 64 if m <= 64 else 128
    blocks = -(-m // bm) * -(-n // bn)
    return "mm", bm, bn, max(1, min(tiles_k // 4 or 1, -(-2 * sms // blocks))), 4 if bm < 128 else 8, 3


def ggml_gemm(x: torch.Tensor, t: dict[str, torch.Tensor], qtype: str, n: int, bias: torch.Tensor | None = None
              ) -> torch.Tensor:
    """x [M, K] fp16/bf16 (fp32 under the interpreter) times the packed weight `t` (roles of
    `pack_ggml`, logical [N, K]) -> [M, N] in x's dtype. K must be a multiple of the type's
    super-block (256 for K-quants, 32 otherwise)."""
    if qtype not in GGML_KERNEL_TYPES:
        raise ValueError(f"ggml_gemm: type {qtype!r} has no kernel here; supported: {', '.join(GGML_KERNEL_TYPES)}")
    if x.dim() != 2 or x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"ggml_gemm: x must be 2-D fp16/bf16/fp32, got {x.dtype} {list(x.shape)}")
    k = x.shape[1]
    hb, sb, sg, zero = GGML_KERNEL_TYPES[qtype]
    if k % sb or tuple(t["ql"].shape) != (k // 8, n) or tuple(t["d"].shape) != (k // sb, n):
        raise ValueError(f"ggml_gemm: {qtype} weight ql {list(t['ql'].shape)}, d {list(t['d'].shape)} does not "
                         f"fit K={k}, N={n}")
    return torch.ops.mixq.ggml_gemm(x.contiguous(), t["ql"], t.get("qh"), t["d"], t.get("m"), t.get("sc"),
                                    t.get("mn"), bias, qtype, n)


@torch.library.custom_op("mixq::ggml_gemm", mutates_args=())
def _ggml_op(x: torch.Tensor, ql: torch.Tensor, qh: torch.Tensor | None, d: torch.Tensor, m: torch.Tensor | None,
             sc: torch.Tensor | None, mn: torch.Tensor | None, bias: torch.Tensor | None, qtype: str,
             n: int) -> torch.Tensor:
    rows, k = x.shape
    hb, sb, sg, zero = GGML_KERNEL_TYPES[qtype]
    chunk = CHUNK_OVERRIDE
    if chunk is None:
        from mixq.kernels.wna16_dequant import dequant_chunk

        chunk = 0 if interpreting() else dequant_chunk(rows, n, k, x.element_size())
    if chunk:
        return _dequant_gemm(x, ql, qh, d, m, sc, mn, bias, qtype, n, chunk)
    kind, bm, bn, split, warps, stages = _config(rows, n, k, sg, x.device)
    so = SplitOutput(rows, n, split, bm, bn, x.dtype, x.device)
    dummy = ql
    cnt = so.counters if so.counters is not None else dummy
    ptrs = (ql, qh if qh is not None else dummy, d, m if m is not None else d, sc if sc is not None else dummy,
            mn if mn is not None else dummy, bias if bias is not None else dummy, so.out, so.ws, cnt)
    strides = (ql.stride(0), qh.stride(0) if qh is not None else 0, d.stride(0), sc.stride(0) if sc is not None else 0)
    common = dict(HB=hb, SB=sb, ZERO=zero, HAS_M=m is not None, HAS_SC=sc is not None, HAS_MN=mn is not None,
                  HAS_BIAS=bias is not None, BN=bn, BK=sg, num_warps=warps, num_stages=stages)
    if kind == "gemv":
        _ggml_gemv_kernel[(triton.cdiv(n, bn), split)](x, *ptrs, n, k, split, *strides, so.split_stride, **common)
    else:
        upcast = interpreting() or x.dtype == torch.float32
        _ggml_mm_kernel[(triton.cdiv(rows, bm) * triton.cdiv(n, bn), split)](
            x, *ptrs, rows, n, k, split, x.stride(0), *strides, so.split_stride, n, BM=bm, UPCAST=upcast, GROUP_M=8,
            FIXUP=so.fixup, **common)
    return so.result()


def _dequant_gemm(x, ql, qh, d, m, sc, mn, bias, qtype: str, n: int, chunk: int) -> torch.Tensor:
    """x @ W^T through a [K, chunk] buffer of the dequantized weight and torch.mm per chunk."""
    from mixq.kernels.wna16_dequant import chunked_mm

    k = x.shape[1]
    hb, sb, sg, zero = GGML_KERNEL_TYPES[qtype]
    bn = 64 if interpreting() else 128
    dummy = ql
    ptrs = (ql, qh if qh is not None else dummy, d, m if m is not None else d, sc if sc is not None else dummy,
            mn if mn is not None else dummy)
    strides = (ql.stride(0), qh.stride(0) if qh is not None else 0, d.stride(0), sc.stride(0) if sc is not None else 0)

    def fill(buf: torch.Tensor, c0: int, cn: int) -> None:
        _ggml_dequant_kernel[(k // sg, triton.cdiv(cn, bn))](
            *ptrs, buf, n, c0, cn, *strides, buf.stride(0), HB=hb, SB=sb, ZERO=zero, HAS_M=m is not None,
            HAS_SC=sc is not None, HAS_MN=mn is not None, BN=bn, BK=sg, num_warps=4)

    return chunked_mm(x, n, chunk, bias, fill)


@_ggml_op.register_fake
def _(x, ql, qh, d, m, sc, mn, bias, qtype, n):
    return x.new_empty((x.shape[0], n))
