"""Extend attention over the paged KV cache (Triton): a whole mixed step in one launch.

A step that is not a pure decode mixes prefill chunks (fresh, or continuing a prefix already
in the cache) with single-token decodes. The new tokens' K/V are in the cache before this
runs, so every key, old or new, is read from the pages of the sequence's block table.

Grid: one program per (query tile, KV head). A tile is up to TQ consecutive new tokens of one
sequence; its BLOCK_M rows pack those tokens with the G = H / Hkv query heads that share the
KV head (row r: token r // G, head r % G), so each page of keys and values is loaded once
for all G heads and a decode token still fills G rows. The program keeps an online softmax
(exp2, running max and sum, fp32) over blocks of BLOCK_N keys, in two phases: keys before
the tile's first query position, which every row sees (no mask), then the diagonal blocks
up to the tile's last position, under the causal mask. Keys past that position are never
read. The tile list is built once per step on the host (plan_tiles; ForwardBatch caches
it), longest tiles first so that the short ones fill the tail of the grid.

Contract (all on one device):
  q            [T, H, D]              fp16 / bf16 / fp32, the step's new tokens, last dim contiguous
  k/v_cache    [num_blocks, P, Hkv, D] q's dtype, or fp8 (e4m3fn / e5m2) holding x / k_scale
               and x / v_scale (mixq.kernels.kv_quant), P = page size
  block_tables [S, W] int32            each sequence's pages, in order (padding ignored)
  query_start  [S+1] int               sequence i owns rows query_start[i]:query_start[i+1] (n_q)
  context_lens [S] int                 tokens in the cache after the step, n_q <= ctx <= W * P
  k/v_scale    float                   per-tensor scales of an fp8 cache (1.0 otherwise)
  returns      [T, H, D] in q's dtype; row j of sequence i sits at position ctx - n_q + j and
               attends to keys 0 .. ctx - n_q + j. H must be a multiple of Hkv.
An fp8 cache is read into q's dtype (fp32 under UPCAST); k_scale is folded into the softmax
scale and v_scale into the output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from mixq.kernels.kv_quant import check_kv_dtypes, is_fp8
from mixq.kernels.paged_attention import _interpreting, check_query_and_cache, triton

if triton is not None:
    import triton.language as tl


class ExtendConfig(NamedTuple):
    block_m: int  # rows per program: tokens x query heads of one KV head
    block_n: int  # keys per inner step
    num_warps: int
    num_stages: int


# bench/extend_attention.py --sweep sets this to time candidate configs; None = extend_config
CONFIG_OVERRIDE: ExtendConfig | None = None


def extend_config(group: int, head_dim: int, device: torch.device) -> ExtendConfig:
    """Launch config for G = group query heads per KV head and this head dim.

    Hopper: 128 rows x 64 keys over 8 warps, the usual flash-attention forward tile for
    D <= 128 (sm_90 build: 239 registers a thread, no spills, K/V loads pipelined); for
    larger D, 64 x 32 (the 128-row tile spills at D = 256). The interpreter runs few large
    blocks fastest.
    """
    if CONFIG_OVERRIDE is not None:
        c = CONFIG_OVERRIDE
    elif device.type != "cuda":
        c = ExtendConfig(64, 64, 4, 1)
    elif head_dim <= 128:
        c = ExtendConfig(128, 64, 8, 2)
    else:
        c = ExtendConfig(64, 32, 8, 2)
    return c._replace(block_m=max(c.block_m, triton.next_power_of_2(group) if triton else group))


@dataclass(frozen=True)
class ExtendTiles:
    """The query tiles of one step for one tile shape (plan_tiles).

    tiles   [2, N] int32 (device): row 0 the sequence of each tile, row 1 its first new
            token (an offset into the sequence's rows), longest tile first
    block_m rows per program; each tile holds up to block_m // group tokens
    group   query heads per KV head the rows pack
    """

    tiles: torch.Tensor
    block_m: int
    group: int

    @property
    def tokens_per_tile(self) -> int:
        return self.block_m // self.group


def plan_tiles(query_start: list[int], context_lens: list[int], group: int, head_dim: int,
               device: torch.device | str, block_m: int = 0) -> ExtendTiles:
    """Cut each sequence's new tokens into tiles of block_m // group tokens (host lists in,
    one host-to-device copy). block_m = 0 takes extend_config's. Tiles are ordered by the
    keys they read, most first: the grid's tail is then the cheapest programs."""
    device = torch.device(device)
    if block_m <= 0:
        block_m = extend_config(group, head_dim, device).block_m
    if block_m < group or block_m & (block_m - 1) or block_m < 16:
        raise ValueError(f"plan_tiles: block_m {block_m} must be a power of two >= 16 and >= group {group}")
    tq = block_m // group
    work = []
    for i, ctx in enumerate(context_lens):
        n = query_start[i + 1] - query_start[i]
        if not 0 <= n <= ctx:
            raise ValueError(f"plan_tiles: sequence {i} has {n} new tokens but a context of {ctx}")
        work += [(ctx - n + min(t0 + tq, n), i, t0) for t0 in range(0, n, tq)]
    work.sort(key=lambda w: -w[0])  # stable: ties keep sequence order
    tiles = torch.tensor([[w[1] for w in work], [w[2] for w in work]], dtype=torch.int32).view(2, -1)
    # non-blocking: a blocking copy would wait for the step in flight (the overlap schedule)
    return ExtendTiles(tiles.to(device, non_blocking=True), block_m, group)


def paged_extend_reference(q, k_cache, v_cache, block_tables, query_start, context_lens, scale, k_scale=1.0,
                           v_scale=1.0):
    """Float64 reference [T, H, D]: per sequence, gather the context (times its scale) and
    attend causally."""
    h = q.shape[1]
    hkv, p = k_cache.shape[2], k_cache.shape[1]
    out = torch.empty(q.shape, dtype=torch.float64, device=q.device)
    qs = [int(x) for x in query_start]
    for i, ctx in enumerate(int(x) for x in context_lens):
        n = qs[i + 1] - qs[i]
        blocks = block_tables[i, : -(-ctx // p)].long()
        k = k_cache[blocks].flatten(0, 1)[:ctx].double().repeat_interleave(h // hkv, dim=1) * k_scale  # [ctx, H, D]
        v = v_cache[blocks].flatten(0, 1)[:ctx].double().repeat_interleave(h // hkv, dim=1) * v_scale
        w = torch.einsum("thd,nhd->htn", q[qs[i]:qs[i + 1]].double(), k) * scale  # [H, n, ctx]
        seen = torch.ones(n, ctx, dtype=torch.bool, device=q.device).tril(ctx - n)
        w = w.masked_fill(~seen, float("-inf"))
        out[qs[i]:qs[i + 1]] = torch.einsum("htn,nhd->thd", w.softmax(-1), v)
    return out


if triton is not None:

    @triton.jit
    def _attend_block(acc, m_i, l_i, q, k_ptr, v_ptr, bt_row, kvh, start, hi, pos, d, d_ok, scale_log2,
                      stride_kb, stride_kp, stride_kh, stride_vb, stride_vp, stride_vh,
                      PAGE: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, CAUSAL: tl.constexpr,
                      KV_FP8: tl.constexpr):
        """One online-softmax step over keys [start, start + BLOCK_N); CAUSAL masks keys past
        each row's position and from hi on (otherwise every key is below hi and seen)."""
        kpos = start + tl.arange(0, BLOCK_N)
        if CAUSAL:
            k_ok = kpos < hi
            page = tl.load(bt_row + kpos // PAGE, mask=k_ok, other=0).to(tl.int64)  # int64: big caches
            kv_ok = k_ok[:, None] & d_ok[None, :]
        else:
            page = tl.load(bt_row + kpos // PAGE).to(tl.int64)
            kv_ok = d_ok[None, :]
        slot = (kpos % PAGE)[:, None]
        k = tl.load(k_ptr + page[:, None] * stride_kb + slot * stride_kp + kvh * stride_kh + d[None, :],
                    mask=kv_ok, other=0.0)  # [BLOCK_N, DP]
        v = tl.load(v_ptr + page[:, None] * stride_vb + slot * stride_vp + kvh * stride_vh + d[None, :],
                    mask=kv_ok, other=0.0)
        if UPCAST:  # fp32 inputs, or the interpreter (whose bf16 dot is wrong)
            s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            if KV_FP8:  # fp8 -> q's dtype; the scales are applied outside
                k = k.to(q.dtype)
                v = v.to(q.dtype)
            s = tl.dot(q, tl.trans(k))
        s = s * scale_log2  # [BLOCK_M, BLOCK_N], log2 units
        if CAUSAL:
            s = tl.where((kpos[None, :] <= pos[:, None]) & k_ok[None, :], s, float("-inf"))
        # finite: each row saw key 0 in the first block it ran (see the kernel)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if UPCAST:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        return acc, m_new, l_i

    @triton.jit
    def _extend_kernel(q_ptr, k_ptr, v_ptr, bt_ptr, qs_ptr, ctx_ptr, tiles_ptr, out_ptr, num_tiles, scale_log2, v_scale,
                       stride_qt, stride_qh, stride_kb, stride_kp, stride_kh, stride_vb, stride_vp, stride_vh,
                       stride_bt, stride_ot, stride_oh,
                       HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, PAGE: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, KV_FP8: tl.constexpr):
        # the KV heads of a tile are neighbours in launch order, so the longest-first tile
        # order holds across the whole grid
        tile = tl.program_id(0) // HKV
        kvh = tl.program_id(0) % HKV
        seq = tl.load(tiles_ptr + tile)
        t0 = tl.load(tiles_ptr + num_tiles + tile)
        row0 = tl.load(qs_ptr + seq)
        n_q = tl.load(qs_ptr + seq + 1) - row0
        ctx = tl.load(ctx_ptr + seq)
        TQ = BLOCK_M // G  # tokens per tile (a constexpr)
        r = tl.arange(0, BLOCK_M)
        t = t0 + r // G  # the row's token, counted in the sequence's new tokens
        head = kvh * G + r % G
        row_ok = (r < TQ * G) & (t < n_q)
        pos = ctx - n_q + t  # [BLOCK_M] the row's position: it sees keys 0 .. pos
        d = tl.arange(0, DP)
        d_ok = d < D
        q_rows = (row0 + t)[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :]
        q = tl.load(q_ptr + q_rows, mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_M, DP]
        if UPCAST:
            q = q.to(tl.float32)
        first = ctx - n_q + t0  # the tile's first position
        hi = first + tl.minimum(TQ, n_q - t0)  # its last position + 1 (<= ctx)
        full = (first + 1) // BLOCK_N * BLOCK_N  # keys [0, full) are seen by every row
        bt_row = bt_ptr + seq * stride_bt
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, DP), tl.float32)
        # The first block either is all seen (full > 0) or starts at key 0, which every row
        # (padding rows too: their positions only run further) sees, so m_i turns finite
        # at once and a later block wholly masked for a row leaves it unchanged.
        for start in range(0, full, BLOCK_N):
            acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, k_ptr, v_ptr, bt_row, kvh, start, hi, pos, d, d_ok,
                                          scale_log2, stride_kb, stride_kp, stride_kh, stride_vb, stride_vp,
                                          stride_vh, PAGE=PAGE, BLOCK_N=BLOCK_N, UPCAST=UPCAST, CAUSAL=False,
                                          KV_FP8=KV_FP8)
        for start in range(full, hi, BLOCK_N):
            acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, k_ptr, v_ptr, bt_row, kvh, start, hi, pos, d, d_ok,
                                          scale_log2, stride_kb, stride_kp, stride_kh, stride_vb, stride_vp,
                                          stride_vh, PAGE=PAGE, BLOCK_N=BLOCK_N, UPCAST=UPCAST, CAUSAL=True,
                                          KV_FP8=KV_FP8)
        out = acc * (v_scale / l_i[:, None])  # v_scale: 1.0 unless the cache is fp8
        o_rows = (row0 + t)[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :]
        tl.store(out_ptr + o_rows, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def paged_extend_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, query_start: torch.Tensor, context_lens: torch.Tensor,
                           scale: float, tiles: ExtendTiles | None = None, *, k_scale: float = 1.0,
                           v_scale: float = 1.0) -> torch.Tensor:
    """See the module docstring for the contract; raises ValueError on a broken one.

    tiles: the step's plan_tiles for this layer's group and head dim (the engine builds it
    once per step, ForwardBatch.extend_tiles); None builds it here from query_start and
    context_lens, which costs a device-to-host copy (tests, benchmarks).
    """
    check_query_and_cache("paged_extend_attention", q, k_cache, v_cache)
    t, h, d = q.shape
    hkv = k_cache.shape[2]
    s_count = context_lens.shape[0]
    if block_tables.dim() != 2 or block_tables.shape[0] != s_count or query_start.shape != (s_count + 1,):
        raise ValueError(f"paged_extend_attention: block_tables [S, W] and query_start [S+1] must match "
                         f"context_lens [S] (S = {s_count}), got {list(block_tables.shape)}, "
                         f"{list(query_start.shape)}")
    check_kv_dtypes("paged_extend_attention", q, k_cache, v_cache)
    if q.stride(2) != 1 or k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError("paged_extend_attention: q and the caches need a contiguous head dim")
    if tiles is None:
        tiles = plan_tiles(query_start.tolist(), context_lens.tolist(), h // hkv, d, q.device)
    if tiles.group != h // hkv:
        raise ValueError(f"paged_extend_attention: tiles planned for {tiles.group} query heads per KV head, "
                         f"the layer has {h // hkv}")
    return torch.ops.mixq.paged_extend_attention(q, k_cache, v_cache, block_tables, query_start, context_lens,
                                                 tiles.tiles, scale, tiles.block_m, k_scale, v_scale)


@torch.library.custom_op("mixq::paged_extend_attention", mutates_args=())
def _paged_extend_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     query_start: torch.Tensor, context_lens: torch.Tensor, tiles: torch.Tensor, scale: float,
                     block_m: int, k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
    t, h, d = q.shape
    hkv, page = k_cache.shape[2], k_cache.shape[1]
    out = torch.empty((t, h, d), dtype=q.dtype, device=q.device)
    num_tiles = tiles.shape[1]
    if num_tiles == 0:
        return out
    cfg = extend_config(h // hkv, d, q.device)
    _extend_kernel[(num_tiles * hkv,)](
        q, k_cache, v_cache, block_tables, query_start, context_lens, tiles, out, num_tiles,
        scale * k_scale * 1.4426950408889634, v_scale,  # log2(e): exp2 in the kernel
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0), out.stride(0), out.stride(1),
        HKV=hkv, G=h // hkv, D=d, DP=max(16, triton.next_power_of_2(d)), PAGE=page, BLOCK_M=block_m,
        BLOCK_N=cfg.block_n, UPCAST=_interpreting() or q.dtype == torch.float32, KV_FP8=is_fp8(k_cache.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


@_paged_extend_op.register_fake
def _(q, k_cache, v_cache, block_tables, query_start, context_lens, tiles, scale, block_m, k_scale=1.0, v_scale=1.0):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)
