"""Triton kernels of the fused MoE (launched by mixq.kernels.fused_moe, which documents the
data layout): the align/sort step and the grouped GEMM with its epilogue modes."""

from __future__ import annotations

from mixq.kernels.wna16 import triton

if triton is not None:
    import triton.language as tl

if triton is not None:

    @triton.jit
    def _fid_of(ids_ptr, fmap_ptr, p, ok):
        """Fused expert id of pair(s) p: -1 for an expert not held here, for an id < 0
        (another expert-parallel rank's expert) and where `ok` is false."""
        eid = tl.load(ids_ptr + p, mask=ok, other=-1)
        return tl.load(fmap_ptr + eid, mask=ok & (eid >= 0), other=-1)

    @triton.jit
    def _align_kernel(ids_ptr, fmap_ptr, cnt_ptr, rank_ptr, sorted_ptr, bfid_ptr, bstart_ptr, zero_ptr,
                      P, F, ROWS, NBLK, ZERO_N,
                      BM: tl.constexpr, FB: tl.constexpr, CH: tl.constexpr, ZCH: tl.constexpr):
        pid = tl.program_id(0)
        if pid > 0:  # the other programs zero the combine buffer, in parallel with the sort
            z = (pid - 1) * ZCH + tl.arange(0, ZCH)
            tl.store(zero_ptr + z, tl.zeros((ZCH,), tl.float32).to(zero_ptr.dtype.element_ty), mask=z < ZERO_N)
            return
        f = tl.arange(0, FB)
        tl.store(cnt_ptr + f, tl.zeros((FB,), tl.int32))
        for r0 in range(0, ROWS, CH):
            r = r0 + tl.arange(0, CH)
            tl.store(sorted_ptr + r, tl.full((CH,), -1, tl.int32), mask=r < ROWS)
        tl.debug_barrier()
        # rank of each pair inside its expert: the old value of the expert's counter
        for p0 in range(0, P, CH):
            p = p0 + tl.arange(0, CH)
            ok = p < P
            fid = _fid_of(ids_ptr, fmap_ptr, p, ok)
            key = tl.where(ok & (fid >= 0), fid, F)  # pairs of experts not held here: bucket F
            rank = tl.atomic_add(cnt_ptr + key, 1, mask=ok)
            tl.store(rank_ptr + p, rank, mask=ok)
        tl.debug_barrier()
        cnt = tl.load(cnt_ptr + f, mask=f < F, other=0, volatile=True)  # L1 is not coherent with atomics
        ends = tl.cumsum((cnt + BM - 1) // BM, 0)  # block end of each expert
        tl.store(bstart_ptr + 1 + f, ends, mask=f < F)
        tl.store(bstart_ptr + f, tl.zeros((FB,), tl.int32), mask=f == 0)
        tl.debug_barrier()
        for p0 in range(0, P, CH):
            p = p0 + tl.arange(0, CH)
            ok = p < P
            fid = _fid_of(ids_ptr, fmap_ptr, p, ok)
            ok = ok & (fid >= 0)
            start = tl.load(bstart_ptr + fid, mask=ok, other=0, volatile=True)
            tl.store(sorted_ptr + start * BM + tl.load(rank_ptr + p, mask=ok, other=0, volatile=True), p, mask=ok)
        for b0 in range(0, NBLK, 32):
            b = b0 + tl.arange(0, 32)
            owner = tl.sum(((ends[None, :] <= b[:, None]) & (f < F)[None, :]).to(tl.int32), axis=1)
            tl.store(bfid_ptr + b, owner, mask=b < NBLK)

    @triton.jit
    def _int_tile(acc, a_rows, row_ok, w_ptr, s_ptr, z_ptr, p_ptr, i_ptr, t, offs_n, n_ok, K, stride_wr, stride_sr,
                  BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZP: tl.constexpr, HAS_PERM: tl.constexpr,
                  HAS_IS: tl.constexpr, BK: tl.constexpr, UPCAST: tl.constexpr):
        PER: tl.constexpr = 32 // BITS
        MASK: tl.constexpr = (1 << BITS) - 1
        rw = tl.arange(0, BK // PER)
        wrow = t * (BK // PER) + rw
        w_ok = (wrow < K // PER)[:, None] & n_ok[None, :]
        # weights are read exactly once per forward: do not let them evict activations
        packed = tl.load(w_ptr + wrow[:, None] * stride_wr + offs_n[None, :], mask=w_ok, other=0,
                         eviction_policy="evict_first")
        z = 1 << (BITS - 1)  # symmetric: the zero point is implied
        if GROUP % BK == 0:  # the tile lies in one group: one scale row
            g = (t * BK) // GROUP
            s = tl.load(s_ptr + g * stride_sr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            if HAS_ZP:
                z = tl.load(z_ptr + g * stride_sr + offs_n, mask=n_ok, other=0).to(tl.float32)[None, :]
        else:  # groups smaller than the tile (always whole word rows: GROUP % PER == 0)
            g = (t * BK + rw * PER) // GROUP
            sp = g[:, None] * stride_sr + offs_n[None, :]
            s = tl.load(s_ptr + sp, mask=w_ok, other=0.0).to(tl.float32)
            if HAS_ZP:
                z = tl.load(z_ptr + sp, mask=w_ok, other=0).to(tl.float32)
        # slot j of word row r is k = r*PER + j: one dot per slot, activation columns strided
        for j in tl.static_range(PER):
            ks = t * BK + rw * PER + j
            k_ok = ks < K
            if HAS_PERM:
                cols = tl.load(p_ptr + ks, mask=k_ok, other=0)
            else:
                cols = ks
            a = tl.load(a_rows[:, None] + cols[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            if HAS_IS:
                a = a * tl.load(i_ptr + cols, mask=k_ok, other=0.0)[None, :]
            w = (((packed >> (j * BITS)) & MASK).to(tl.float32) - z) * s
            if UPCAST:  # fp32 activations, or the interpreter (whose bf16 dot is wrong)
                acc += tl.dot(a.to(tl.float32), w, input_precision="ieee")
            else:
                acc += tl.dot(a, w.to(a.dtype))
        return acc

    @triton.jit
    def _float_tile(acc, a_rows, row_ok, w_ptr, s_ptr, i_ptr, t, offs_n, n_ok, K, stride_wr, stride_sr,
                    SCALE_TILE: tl.constexpr, SBN: tl.constexpr, SBK: tl.constexpr, HAS_IS: tl.constexpr,
                    BK: tl.constexpr, UPCAST: tl.constexpr):
        ks = t * BK + tl.arange(0, BK)
        k_ok = ks < K
        a = tl.load(a_rows[:, None] + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if HAS_IS:
            a = a * tl.load(i_ptr + ks, mask=k_ok, other=0.0)[None, :]
        w = tl.load(w_ptr + offs_n[None, :] * stride_wr + ks[:, None], mask=k_ok[:, None] & n_ok[None, :],
                    other=0.0, eviction_policy="evict_first")  # [BK, BN] of the [N, K] weight
        if UPCAST:
            part = tl.dot(a.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        else:
            part = tl.dot(a, w.to(a.dtype))  # fp8 e4m3 values are exact in bf16/fp16
        if SCALE_TILE:  # block / group scales: one scale per (n-block, this k tile)
            s = tl.load(s_ptr + (offs_n // SBN) * stride_sr + (t * BK) // SBK, mask=n_ok, other=0.0)
            part = part * s[None, :]
        return acc + part

    @triton.jit
    def _moe_gemm_kernel(a_ptr, sorted_ptr, bfid_ptr, bstart_ptr, slot_ptr, topw_ptr, out_ptr, ids_ptr, fmap_ptr,
                         w0_ptr, s0_ptr, z0_ptr, p0_ptr, i0_ptr, w1_ptr, s1_ptr, z1_ptr, p1_ptr, i1_ptr,
                         N, K, F0, F1, stride_am, stride_om, stride_we, stride_wr, stride_se, stride_sr,
                         stride_pe, stride_ie,
                         TOPK: tl.constexpr, A_BY_TOKEN: tl.constexpr, MODE: tl.constexpr, INT: tl.constexpr,
                         BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZP: tl.constexpr, HAS_PERM: tl.constexpr,
                         HAS_IS: tl.constexpr, SCALE_TILE: tl.constexpr, SCALE_LAST: tl.constexpr,
                         SBN: tl.constexpr, SBK: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                         BK: tl.constexpr, SPLIT_K: tl.constexpr, UPCAST: tl.constexpr, DIRECT: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        if DIRECT:  # one pair per program, no sort: row 0 of the tile is pair pid_m
            fid = _fid_of(ids_ptr, fmap_ptr, pid_m, pid_m >= 0)
            if fid < 0:  # an expert not held here
                return
            slot = tl.load(slot_ptr + fid)
            pair = pid_m + tl.zeros((BM,), tl.int32)
            row_ok = tl.arange(0, BM) == 0
            rows = pair  # the intermediate is indexed by pair
        else:
            blk = tl.load(bstart_ptr + F0) + pid_m
            if blk >= tl.load(bstart_ptr + F1):  # the grid is a bound; the real block count is on device
                return
            slot = tl.load(slot_ptr + tl.load(bfid_ptr + blk))
            rows = blk * BM + tl.arange(0, BM)
            pair = tl.load(sorted_ptr + rows)
            row_ok = pair >= 0
        if slot < 0:  # a block of an expert in another format group
            return
        e = slot.to(tl.int64)
        token = pair // TOPK
        if A_BY_TOKEN:
            a_rows = a_ptr + token.to(tl.int64) * stride_am
        else:
            a_rows = a_ptr + rows.to(tl.int64) * stride_am
        offs_n = pid_n * BN + tl.arange(0, BN)
        n_ok = offs_n < N
        acc0 = tl.zeros((BM, BN), dtype=tl.float32)
        acc1 = tl.zeros((BM, BN), dtype=tl.float32)
        k_tiles = tl.cdiv(K, BK)
        per_split = tl.cdiv(k_tiles, SPLIT_K)
        t1 = tl.minimum(pid_k * per_split + per_split, k_tiles)
        for t in range(pid_k * per_split, t1):
            if INT:
                acc0 = _int_tile(acc0, a_rows, row_ok, w0_ptr + e * stride_we, s0_ptr + e * stride_se,
                                 z0_ptr + e * stride_se, p0_ptr + e * stride_pe, i0_ptr + e * stride_ie, t, offs_n,
                                 n_ok, K, stride_wr, stride_sr, BITS, GROUP, HAS_ZP, HAS_PERM, HAS_IS, BK, UPCAST)
                if MODE == 0:
                    acc1 = _int_tile(acc1, a_rows, row_ok, w1_ptr + e * stride_we, s1_ptr + e * stride_se,
                                     z1_ptr + e * stride_se, p1_ptr + e * stride_pe, i1_ptr + e * stride_ie, t,
                                     offs_n, n_ok, K, stride_wr, stride_sr, BITS, GROUP, HAS_ZP, HAS_PERM, HAS_IS,
                                     BK, UPCAST)
            else:
                acc0 = _float_tile(acc0, a_rows, row_ok, w0_ptr + e * stride_we, s0_ptr + e * stride_se,
                                   i0_ptr + e * stride_ie, t, offs_n, n_ok, K, stride_wr, stride_sr, SCALE_TILE,
                                   SBN, SBK, HAS_IS, BK, UPCAST)
                if MODE == 0:
                    acc1 = _float_tile(acc1, a_rows, row_ok, w1_ptr + e * stride_we, s1_ptr + e * stride_se,
                                       i1_ptr + e * stride_ie, t, offs_n, n_ok, K, stride_wr, stride_sr,
                                       SCALE_TILE, SBN, SBK, HAS_IS, BK, UPCAST)
        if SCALE_LAST:  # per-tensor / per-channel fp8: one scale per output column
            acc0 = acc0 * tl.load(s0_ptr + e * stride_se + (offs_n // SBN) * stride_sr, mask=n_ok, other=0.0)[None, :]
            if MODE == 0:
                acc1 = acc1 * tl.load(s1_ptr + e * stride_se + (offs_n // SBN) * stride_sr, mask=n_ok,
                                      other=0.0)[None, :]
        ok = row_ok[:, None] & n_ok[None, :]
        if MODE <= 2:  # into the intermediate, rows in padded order
            ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
            if MODE == 0:
                h = acc0 * tl.sigmoid(acc0) * acc1
            elif MODE == 1:
                h = acc0
            else:  # the gate launch stored gate(x) here; this is the up launch
                g = tl.load(ptrs, mask=ok, other=0.0).to(tl.float32)
                h = g * tl.sigmoid(g) * acc0
            tl.store(ptrs, h.to(out_ptr.dtype.element_ty), mask=ok)
        else:
            wt = tl.load(topw_ptr + pair, mask=row_ok, other=0.0).to(tl.float32)
            y = acc0 * wt[:, None]
            if MODE == 3:
                tl.atomic_add(out_ptr + token.to(tl.int64)[:, None] * stride_om + offs_n[None, :], y, mask=ok)
            else:
                ptrs = out_ptr + pair.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
                tl.store(ptrs, y.to(out_ptr.dtype.element_ty), mask=ok)
