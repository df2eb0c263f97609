"""Decode attention over the paged KV cache (Triton), split over the context when the
batch is too small to fill the GPU ("flash-decoding").

A decode step has one query token per sequence. The torch reference loops over the
sequences (one SDPA call each); this kernel runs every sequence and KV head in one grid:
program (s, h, j) reads the query heads of KV head h of sequence s, streams slice j of that
sequence's keys and values page by page through its block table, and keeps an online
softmax (running max and sum) so nothing of size context is materialised.

With one split (large batches) the program writes the normalised output directly. With
more, each program writes a partial (unnormalised acc, running max, running sum) to an fp32
workspace and a second small kernel merges a row's partials with the log-sum-exp rescale.
The number of splits comes from shapes and the SM count only (never from context_lens
values), so a CUDA graph captured once stays right when the lengths change between replays.

Contract (all on one device):
  q            [S, H, D]              fp16 / bf16 / fp32, the one new token of each sequence
  k/v_cache    [num_blocks, P, Hkv, D] q's dtype, or fp8 (e4m3fn / e5m2) holding x / k_scale
               and x / v_scale (mixq.kernels.kv_quant), P = page size
  block_tables [S, W] int32            the sequence's pages, in order (padding ignored)
  context_lens [S] int                 tokens in the cache for each sequence, 1 <= n <= W * P
  k/v_scale    float                   per-tensor scales of an fp8 cache (1.0 otherwise)
  returns      [S, H, D] in q's dtype; H must be a multiple of Hkv (grouped-query).
An fp8 cache is read into q's dtype (fp32 under UPCAST); k_scale is folded into the softmax
scale and v_scale into the output.
"""

from __future__ import annotations

import functools
import os

import torch

from mixq.kernels.kv_quant import check_kv_dtypes, is_fp8

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch reference path is used instead
    triton = None

BLOCK_N = 64  # keys per inner step; pages are looked up per key, so it need not match P
MIN_SLICE = 256  # fewest keys worth a split of their own (a multiple of BLOCK_N)
WAVES = 2  # programs to aim for, in multiples of the SM count
CPU_SMS = 132  # stand-in SM count off CUDA (an H100's), so the interpreter splits alike


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of `device` (cached; CPU_SMS off CUDA)."""
    if device.type != "cuda":
        return CPU_SMS
    return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())


def split_slice(max_context: int, num_splits: int, block_n: int = BLOCK_N) -> int:
    """Keys per split: max_context / num_splits rounded up to whole BLOCK_N steps."""
    per = -(-max(max_context, 1) // num_splits)
    return -(-per // block_n) * block_n


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_context: int, num_sms: int,
                      block_n: int = BLOCK_N, min_slice: int = MIN_SLICE) -> int:
    """Splits of the context per (sequence, KV head), from static sizes only.

    max_context is the most a row can hold (block_tables.shape[1] * page size), not any
    sequence's actual length: the choice, and so the grid, must not change when only
    context_lens does (CUDA-graph replays). Aims at WAVES programs per SM, with no split
    shorter than min_slice keys; returns the count of non-empty slices of max_context.
    """
    want = -(-WAVES * num_sms // max(num_seqs * num_kv_heads, 1))
    most = -(-max(max_context, 1) // min_slice)
    splits = max(1, min(want, most))
    return -(-max(max_context, 1) // split_slice(max_context, splits, block_n))


def plan_splits(q: torch.Tensor, k_cache: torch.Tensor, block_tables: torch.Tensor,
                num_splits: int = 0) -> tuple[int, int]:
    """(splits, keys per split) for a call; num_splits > 0 forces the count."""
    max_context = block_tables.shape[1] * k_cache.shape[1]
    if num_splits <= 0:
        num_splits = choose_num_splits(q.shape[0], k_cache.shape[2], max_context, sm_count(q.device))
    return num_splits, split_slice(max_context, num_splits)


def paged_decode_reference(q, k_cache, v_cache, block_tables, context_lens, scale, k_scale=1.0, v_scale=1.0):
    """Float64 reference: gather each sequence's context (times its scale) and attend."""
    s_count, h, d = q.shape
    hkv = k_cache.shape[2]
    p = k_cache.shape[1]
    out = torch.empty(s_count, h, d, dtype=torch.float64, device=q.device)
    for i in range(s_count):
        n = int(context_lens[i])
        blocks = block_tables[i, : -(-n // p)].long()
        k = k_cache[blocks].flatten(0, 1)[:n].double().repeat_interleave(h // hkv, dim=1) * k_scale  # [n, H, D]
        v = v_cache[blocks].flatten(0, 1)[:n].double().repeat_interleave(h // hkv, dim=1) * v_scale
        w = torch.einsum("hd,nhd->hn", q[i].double(), k) * scale
        out[i] = torch.einsum("hn,nhd->hd", w.softmax(-1), v)
    return out


if triton is not None:

    @triton.jit
    def _paged_decode_kernel(q_ptr, k_ptr, v_ptr, bt_ptr, ctx_ptr, out_ptr, part_acc_ptr, part_ml_ptr,
                             scale_log2, v_scale, slice_len, part_ml_stride,
                             stride_qs, stride_qh, stride_kb, stride_kp, stride_kh, stride_vb, stride_vp, stride_vh,
                             stride_bt, stride_os, stride_oh,
                             G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                             PAGE: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, SPLIT: tl.constexpr,
                             KV_FP8: tl.constexpr):
        seq = tl.program_id(0)
        kvh = tl.program_id(1)
        g = tl.arange(0, GP)
        d = tl.arange(0, DP)
        g_ok = g < G
        d_ok = d < D
        ctx = tl.load(ctx_ptr + seq)
        if SPLIT:  # this program's slice of the context; past ctx it is empty
            lo = tl.program_id(2) * slice_len
            hi = tl.minimum(lo + slice_len, ctx)
        else:
            lo = 0
            hi = ctx
        q = tl.load(q_ptr + seq * stride_qs + (kvh * G + g)[:, None] * stride_qh + d[None, :],
                    mask=g_ok[:, None] & d_ok[None, :], other=0.0)  # [GP, DP]
        if UPCAST:  # fp32 inputs, or the interpreter (whose bf16 dot is wrong)
            q = q.to(tl.float32)
        m_i = tl.full((GP,), float("-inf"), tl.float32)
        l_i = tl.zeros((GP,), tl.float32)
        acc = tl.zeros((GP, DP), tl.float32)
        for start in range(lo, hi, BLOCK_N):  # every step has a key < hi, so m_i turns finite
            pos = start + tl.arange(0, BLOCK_N)
            ok = pos < hi
            # int64: page * stride passes 2**31 elements in a large cache
            page = tl.load(bt_ptr + seq * stride_bt + pos // PAGE, mask=ok, other=0).to(tl.int64)
            slot = pos % PAGE
            kv_ok = ok[:, None] & d_ok[None, :]
            k = tl.load(k_ptr + page[:, None] * stride_kb + slot[:, None] * stride_kp + kvh * stride_kh + d[None, :],
                        mask=kv_ok, other=0.0)  # [BLOCK_N, DP]
            v = tl.load(v_ptr + page[:, None] * stride_vb + slot[:, None] * stride_vp + kvh * stride_vh + d[None, :],
                        mask=kv_ok, other=0.0)
            if UPCAST:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            elif KV_FP8:  # fp8 -> q's dtype; the scales are applied outside the loop
                k = k.to(q_ptr.dtype.element_ty)
                v = v.to(q_ptr.dtype.element_ty)
                s = tl.dot(q, tl.trans(k))
            else:
                s = tl.dot(q, tl.trans(k))
            s = tl.where(ok[None, :], s * scale_log2, float("-inf"))  # [GP, BLOCK_N], log2 units
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            if UPCAST:
                acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        acc = acc * v_scale  # the values' per-tensor scale (1.0 unless the cache is fp8)
        if SPLIT:  # partial of row (seq, head, split) in [S, H, splits, (D)]; empty: -inf, 0, 0
            row = (seq * tl.num_programs(1) * G + kvh * G + g) * tl.num_programs(2) + tl.program_id(2)
            tl.store(part_acc_ptr + row[:, None] * D + d[None, :], acc, mask=g_ok[:, None] & d_ok[None, :])
            tl.store(part_ml_ptr + row, m_i, mask=g_ok)
            tl.store(part_ml_ptr + part_ml_stride + row, l_i, mask=g_ok)
        else:
            out = acc / l_i[:, None]
            tl.store(out_ptr + seq * stride_os + (kvh * G + g)[:, None] * stride_oh + d[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])

    @triton.jit
    def _combine_splits_kernel(part_acc_ptr, part_ml_ptr, out_ptr, num_splits, part_ml_stride, stride_os, stride_oh,
                               D: tl.constexpr, DP: tl.constexpr, SB: tl.constexpr):
        """Program (s, h): out = sum_j 2^(m_j - M) acc_j / sum_j 2^(m_j - M) l_j, M = max_j m_j."""
        seq = tl.program_id(0)
        head = tl.program_id(1)
        row = (seq * tl.num_programs(1) + head) * num_splits
        j = tl.arange(0, SB)
        d = tl.arange(0, DP)
        d_ok = d < D
        m_max = tl.full((SB,), float("-inf"), tl.float32)
        for j0 in range(0, num_splits, SB):
            m_max = tl.maximum(m_max, tl.load(part_ml_ptr + row + j0 + j, mask=j0 + j < num_splits,
                                              other=float("-inf")))
        m_all = tl.max(m_max, axis=0)  # finite: split 0 holds key 0 (context_lens >= 1)
        l_sum = tl.zeros((SB,), tl.float32)
        acc = tl.zeros((SB, DP), tl.float32)
        for j0 in range(0, num_splits, SB):
            ok = j0 + j < num_splits
            w = tl.exp2(tl.load(part_ml_ptr + row + j0 + j, mask=ok, other=float("-inf")) - m_all)  # empty: 0
            l_sum += w * tl.load(part_ml_ptr + part_ml_stride + row + j0 + j, mask=ok, other=0.0)
            a = tl.load(part_acc_ptr + (row + j0 + j)[:, None] * D + d[None, :], mask=ok[:, None] & d_ok[None, :],
                        other=0.0)  # [SB, DP]
            acc += w[:, None] * a
        out = tl.sum(acc, axis=0) / tl.sum(l_sum, axis=0)
        tl.store(out_ptr + seq * stride_os + head * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d_ok)


def check_query_and_cache(op: str, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    """q [tokens, H, D] against caches [blocks, P, Hkv, D]: ValueError naming `op` when the
    ranks, the head dim or the grouping (H a multiple of Hkv) do not fit."""
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"{op}: q [tokens, H, D] and caches [B, P, Hkv, D] expected, got "
                         f"{list(q.shape)}, {list(k_cache.shape)}, {list(v_cache.shape)}")
    h, d, hkv = q.shape[1], q.shape[2], k_cache.shape[2]
    if k_cache.shape[3] != d or h % hkv:
        raise ValueError(f"{op}: {h} query heads of dim {d} do not fit a cache of {hkv} KV heads "
                         f"of dim {k_cache.shape[3]}")


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                           *, num_splits: int = 0, k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
    """See the module docstring for the contract; raises ValueError on a broken one.

    num_splits: 0 chooses from shapes and the SM count (choose_num_splits); n > 0 forces n
    slices of the context (tests, benchmarks); 1 is the single-pass kernel.
    """
    check_query_and_cache("paged_decode_attention", q, k_cache, v_cache)
    s_count = q.shape[0]
    if block_tables.shape[0] != s_count or context_lens.shape != (s_count,):
        raise ValueError("paged_decode_attention: block_tables [S, W] and context_lens [S] must match q's S")
    check_kv_dtypes("paged_decode_attention", q, k_cache, v_cache)
    if num_splits < 0:
        raise ValueError(f"paged_decode_attention: num_splits must be >= 0 (0 = auto), got {num_splits}")
    return torch.ops.mixq.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale, num_splits,
                                                 k_scale, v_scale)


@torch.library.custom_op("mixq::paged_decode_attention", mutates_args=())
def _paged_decode_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     context_lens: torch.Tensor, scale: float, num_splits: int = 0, k_scale: float = 1.0,
                     v_scale: float = 1.0) -> torch.Tensor:
    s_count, h, d = q.shape
    hkv, page = k_cache.shape[2], k_cache.shape[1]
    g = h // hkv
    out = torch.empty_like(q)
    if s_count == 0:
        return out
    splits, slice_len = plan_splits(q, k_cache, block_tables, num_splits)
    if splits > 1:  # workspace from static sizes only (under capture: the graph's pool)
        part_acc = torch.empty(s_count, h, splits, d, dtype=torch.float32, device=q.device)
        part_ml = torch.empty(2, s_count, h, splits, dtype=torch.float32, device=q.device)  # running max, sum
    else:
        part_acc = part_ml = out  # not read or written by the single-pass kernel
    upcast = _interpreting() or q.dtype == torch.float32
    dp = max(16, triton.next_power_of_2(d))
    _paged_decode_kernel[(s_count, hkv, splits)](
        q, k_cache, v_cache, block_tables, context_lens, out, part_acc, part_ml,
        scale * k_scale * 1.4426950408889634, v_scale, slice_len, part_ml.stride(0),  # log2(e): exp2 in the kernel
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0), out.stride(0), out.stride(1),
        G=g, GP=max(16, triton.next_power_of_2(g)), D=d, DP=dp, PAGE=page,
        BLOCK_N=BLOCK_N, UPCAST=upcast, SPLIT=splits > 1, KV_FP8=is_fp8(k_cache.dtype), num_warps=4, num_stages=2,
    )
    if splits > 1:
        _combine_splits_kernel[(s_count, h)](part_acc, part_ml, out, splits, part_ml.stride(0), out.stride(0),
                                             out.stride(1), D=d, DP=dp, SB=16, num_warps=4)
    return out


@_paged_decode_op.register_fake
def _(q, k_cache, v_cache, block_tables, context_lens, scale, num_splits=0, k_scale=1.0, v_scale=1.0):
    return torch.empty_like(q)
