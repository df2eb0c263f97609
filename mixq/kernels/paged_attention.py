"""Decode attention over the paged KV cache in one launch (Triton).

A decode step has one query token per sequence. The torch reference loops over the
sequences (one SDPA call each); this kernel runs every sequence and KV head in one grid:
program (s, h) reads the query heads of KV head h of sequence s, streams that sequence's
keys and values page by page through its block table, and keeps an online softmax
(running max and sum) so nothing of size context is materialised.

Contract (all on one device):
  q            [S, H, D]              fp16 / bf16 / fp32, the one new token of each sequence
  k/v_cache    [num_blocks, P, Hkv, D] same dtype as q, P = page size
  block_tables [S, W] int32            the sequence's pages, in order (padding ignored)
  context_lens [S] int                 tokens in the cache for each sequence, >= 1
  returns      [S, H, D] in q's dtype; H must be a multiple of Hkv (grouped-query).
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch reference path is used instead
    triton = None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def paged_decode_reference(q, k_cache, v_cache, block_tables, context_lens, scale):
    """Float64 reference: gather each sequence's context and attend."""
    s_count, h, d = q.shape
    hkv = k_cache.shape[2]
    p = k_cache.shape[1]
    out = torch.empty(s_count, h, d, dtype=torch.float64, device=q.device)
    for i in range(s_count):
        n = int(context_lens[i])
        blocks = block_tables[i, : -(-n // p)].long()
        k = k_cache[blocks].flatten(0, 1)[:n].double().repeat_interleave(h // hkv, dim=1)  # [n, H, D]
        v = v_cache[blocks].flatten(0, 1)[:n].double().repeat_interleave(h // hkv, dim=1)
        w = torch.einsum("hd,nhd->hn", q[i].double(), k) * scale
        out[i] = torch.einsum("hn,nhd->hd", w.softmax(-1), v)
    return out


if triton is not None:

    @triton.jit
    def _paged_decode_kernel(q_ptr, k_ptr, v_ptr, bt_ptr, ctx_ptr, out_ptr, scale_log2,
                             stride_qs, stride_qh, stride_kb, stride_kp, stride_kh, stride_vb, stride_vp, stride_vh,
                             stride_bt, stride_os, stride_oh,
                             G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                             PAGE: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr):
        seq = tl.program_id(0)
        kvh = tl.program_id(1)
        g = tl.arange(0, GP)
        d = tl.arange(0, DP)
        g_ok = g < G
        d_ok = d < D
        ctx = tl.load(ctx_ptr + seq)
        q = tl.load(q_ptr + seq * stride_qs + (kvh * G + g)[:, None] * stride_qh + d[None, :],
                    mask=g_ok[:, None] & d_ok[None, :], other=0.0)  # [GP, DP]
        if UPCAST:  # fp32 inputs, or the interpreter (whose bf16 dot is wrong)
            q = q.to(tl.float32)
        m_i = tl.full((GP,), float("-inf"), tl.float32)
        l_i = tl.zeros((GP,), tl.float32)
        acc = tl.zeros((GP, DP), tl.float32)
        for start in range(0, ctx, BLOCK_N):
            pos = start + tl.arange(0, BLOCK_N)
            ok = pos < ctx
            page = tl.load(bt_ptr + seq * stride_bt + pos // PAGE, mask=ok, other=0)
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
        out = acc / l_i[:, None]
        tl.store(out_ptr + seq * stride_os + (kvh * G + g)[:, None] * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """See the module docstring for the contract; raises ValueError on a broken one."""
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"paged_decode_attention: q [S, H, D] and caches [B, P, Hkv, D] expected, got "
                         f"{list(q.shape)}, {list(k_cache.shape)}, {list(v_cache.shape)}")
    s_count, h, d = q.shape
    hkv = k_cache.shape[2]
    if k_cache.shape[3] != d or h % hkv:
        raise ValueError(f"paged_decode_attention: {h} query heads of dim {d} do not fit a cache of {hkv} KV heads "
                         f"of dim {k_cache.shape[3]}")
    if block_tables.shape[0] != s_count or context_lens.shape != (s_count,):
        raise ValueError("paged_decode_attention: block_tables [S, W] and context_lens [S] must match q's S")
    if k_cache.dtype != q.dtype:
        raise ValueError(f"paged_decode_attention: cache dtype {k_cache.dtype} != query dtype {q.dtype}")
    return torch.ops.mixq.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale)


@torch.library.custom_op("mixq::paged_decode_attention", mutates_args=())
def _paged_decode_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    s_count, h, d = q.shape
    hkv, page = k_cache.shape[2], k_cache.shape[1]
    g = h // hkv
    out = torch.empty_like(q)
    if s_count == 0:
        return out
    upcast = _interpreting() or q.dtype == torch.float32
    block_n = max(16, min(64, triton.next_power_of_2(page)))
    _paged_decode_kernel[(s_count, hkv)](
        q, k_cache, v_cache, block_tables, context_lens, out, scale * 1.4426950408889634,  # log2(e)
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0), out.stride(0), out.stride(1),
        G=g, GP=max(16, triton.next_power_of_2(g)), D=d, DP=max(16, triton.next_power_of_2(d)), PAGE=page,
        BLOCK_N=block_n, UPCAST=upcast, num_warps=4, num_stages=2,
    )
    return out


@_paged_decode_op.register_fake
def _(q, k_cache, v_cache, block_tables, context_lens, scale):
    return torch.empty_like(q)
