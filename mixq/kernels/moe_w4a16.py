"""INT4 experts on the compiled W4A16 GEMV (issue 18 point 2; not wired into the engine yet).

The few-row GEMV of `cuda/w4a16_mma.cu` grouped over experts: `moe_align` (the fused MoE's
one-launch sort) cuts the (token, expert) pairs into 16-row blocks of one expert each; grid
y runs over those blocks (a static bound: blocks past the used ones exit), grid x over the
expert's 64-column blocks times the K split. Each CTA stages its rows of the activations
(gathered: pair // top-k for gate/up, the pair's own row for down), streams that expert's
weight from the stack straight into registers, and writes the pairs' output rows. At decode
every expert holds one to a few rows, the regime the GEMV is built for.

A layer (`moe_layer`, all experts INT4): align, gate+up as one stacked [2I, H] GEMV per
expert, SiLU-and-mul, down, then the top-k weighted sum per token.

Layout: each expert packed by `w4a16_mma.pack_w4a16` (still 4 bits a weight), stacked:
  qw      int32 [E, K/16, 2N]
  scales  [E, G, N] activation dtype (the mma column order)
  zeros   uint8 [E, G, N] | None (symmetric around 8)
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from mixq.kernels import w4a16_mma
from mixq.kernels.elementwise import silu_and_mul
from mixq.kernels.tiles import split_counters
from mixq.kernels.w4a16_mma import W4A16MMAWeight, pack_w4a16, w4a16_reference

BM = 16  # rows per block: one m16n8k16 row tile


@dataclass
class ExpertStack:
    """One projection of E experts in the mma layout (see the module docstring)."""

    qw: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    group_size: int
    n: int
    k: int

    @property
    def experts(self) -> int:
        return self.qw.shape[0]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qw, self.scales, self.zeros) if t is not None)

    def expert(self, e: int) -> W4A16MMAWeight:
        """Expert e as a dense-GEMM weight (views, no copy)."""
        return W4A16MMAWeight(self.qw[e], self.scales[e], None if self.zeros is None else self.zeros[e], None,
                              self.group_size, self.n, self.k)


def pack_experts(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int,
                 dtype: torch.dtype) -> ExpertStack:
    """Canonical -> stacked mma layout. q [E, N, K] ints in [0, 16); scales [E, N, K/group];
    zeros None or ints [E, N, K/group]. (Act-order experts are not taken: the GEMV has no
    per-expert activation permutation.)"""
    if q.dim() != 3:
        raise ValueError(f"pack_experts: q must be [E, N, K], got {list(q.shape)}")
    packed = [pack_w4a16(q[e], scales[e], None if zeros is None else zeros[e], group_size, dtype)
              for e in range(q.shape[0])]
    return ExpertStack(torch.stack([p.qw for p in packed]), torch.stack([p.scales for p in packed]),
                       None if zeros is None else torch.stack([p.zeros for p in packed]),
                       group_size, q.shape[1], q.shape[2])


def moe_split(n: int, k: int, sms: int, active_blocks: int, warps: int) -> tuple[int, int] | None:
    """(kcs, spc) of the grouped GEMV: the K split whose CTA count over the `active_blocks`
    row blocks the routing is expected to fill is nearest 4 CTAs per SM (16-row blocks:
    the activations [16, spc * 16] must fit the GEMV's shared-memory budget)."""
    return w4a16_mma.gemv_split(BM, n * max(1, active_blocks), k, sms, warps)


@torch.library.custom_op("mixq::w4a16_moe_gemv", mutates_args=())
def _moe_gemv_op(a: torch.Tensor, qw: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                 sorted_ids: torch.Tensor, block_fid: torch.Tensor, slots: torch.Tensor, nfid: int, row_div: int,
                 out_rows: int, n: int, group_size: int, kcs: int, spc: int, variant: int) -> torch.Tensor:
    dev = a.device
    k = a.shape[1]
    row_blocks = block_fid.numel()
    nblocks = n // 64
    out = torch.empty((out_rows, n), device=dev, dtype=a.dtype)
    if out_rows == 0:
        return out
    ws = torch.empty((row_blocks * nblocks * kcs * BM * 64 if kcs > 1 else 1,), device=dev, dtype=torch.float32)
    counters = split_counters(dev, row_blocks * nblocks)
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    with torch.cuda.device(index):
        lib = w4a16_mma._lib(dev)
        stream = ctypes.c_void_p(torch.cuda.current_stream(dev).cuda_stream)
        w4a16_mma._check(lib.mixq_w4a16_moe_gemv(
            int(a.dtype == torch.bfloat16), variant, a.data_ptr(), qw.data_ptr(), scales.data_ptr(),
            zeros.data_ptr() if zeros is not None else None, out.data_ptr(), ws.data_ptr(), counters.data_ptr(),
            sorted_ids.data_ptr(), block_fid.data_ptr(), slots.data_ptr(), nfid, row_div, row_blocks, n, k,
            group_size, kcs, spc, qw[0].numel() // 4, scales[0].numel(), zeros[0].numel() if zeros is not None else 0,
            stream), "MoE GEMV")
    return out


@_moe_gemv_op.register_fake
def _(a, qw, scales, zeros, sorted_ids, block_fid, slots, nfid, row_div, out_rows, n, group_size, kcs, spc, variant):
    return a.new_empty((out_rows, n))


def grouped_gemv(a: torch.Tensor, stack: ExpertStack, sorted_ids: torch.Tensor, block_fid: torch.Tensor,
                 slots: torch.Tensor, nfid: int, row_div: int, out_rows: int, active_blocks: int,
                 variant: int = 1, kcs: int | None = None) -> torch.Tensor:
    """out[p] = a[p // row_div] @ W_e(p)^T for every pair p listed in `sorted_ids` (the
    blocks' experts e = slots[block_fid[b]]); rows of pairs that are listed nowhere are left
    unwritten. a [rows, K] bf16/fp16 on CUDA, in the stack's activation dtype."""
    if a.dim() != 2 or a.shape[1] != stack.k:
        raise ValueError(f"grouped_gemv: a must be [rows, {stack.k}], got {list(a.shape)}")
    if a.dtype != stack.scales.dtype:
        raise ValueError(f"grouped_gemv: a dtype {a.dtype} differs from the stack's prepared dtype {stack.scales.dtype}")
    for name, t in (("a", a), ("qw", stack.qw), ("sorted_ids", sorted_ids), ("block_fid", block_fid), ("slots", slots)):
        if t.device.type != "cuda" or t.device != a.device:
            raise ValueError(f"grouped_gemv: {name} is on {t.device}; every operand must be on one CUDA device")
    for name, t in (("sorted_ids", sorted_ids), ("block_fid", block_fid), ("slots", slots)):
        if t.dtype != torch.int32 or not t.is_contiguous():
            raise ValueError(f"grouped_gemv: {name} must be contiguous int32, got {t.dtype}")
    if sorted_ids.numel() != BM * block_fid.numel() or slots.numel() < nfid:
        raise ValueError(f"grouped_gemv: {sorted_ids.numel()} sorted ids for {block_fid.numel()} blocks of {BM} rows "
                         f"and {slots.numel()} slots for {nfid} experts do not fit")
    warps = w4a16_mma.GEMV_VARIANTS[variant][0]
    sms = w4a16_mma._sms(a.device.index if a.device.index is not None else torch.cuda.current_device())
    split = (w4a16_mma.gemv_split(BM, stack.n, stack.k, sms, warps, kcs=kcs) if kcs is not None
             else moe_split(stack.n, stack.k, sms, active_blocks, warps))
    if split is None:
        raise ValueError(f"grouped_gemv: K={stack.k} does not split over {warps} warps in 16-row blocks"
                         f"{'' if kcs is None else f' with kcs={kcs}'}")
    return torch.ops.mixq.w4a16_moe_gemv(a.contiguous(), stack.qw, stack.scales, stack.zeros, sorted_ids, block_fid,
                                         slots, nfid, row_div, out_rows, stack.n, stack.group_size, split[0], split[1],
                                         variant)


def moe_layer(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w13: ExpertStack,
              w2: ExpertStack) -> torch.Tensor:
    """sum_j w[t, j] * down_e(silu(gate_e(x_t)) * up_e(x_t)), e = ids[t, j], every expert INT4:
    w13 stacks [gate; up] rows ([2I, H] per expert), w2 [H, I]. No host sync."""
    from mixq.kernels import fused_moe as fm

    t, top_k = topk_ids.shape
    e, inter = w13.experts, w2.k
    if w13.n != 2 * inter or w2.n != x.shape[1] or w13.k != x.shape[1] or w2.experts != e:
        raise ValueError(f"moe_layer: w13 [{e}, {w13.n}, {w13.k}] / w2 [{w2.experts}, {w2.n}, {w2.k}] do not make "
                         f"a layer of hidden {x.shape[1]}")
    fid_map = torch.arange(e, dtype=torch.int32, device=x.device)
    al = fm.moe_align(topk_ids, fid_map, e, BM)
    pairs = t * top_k
    active = min(pairs, e)
    h = grouped_gemv(x, w13, al.sorted_ids, al.block_fid, fid_map, e, top_k, pairs, active)
    g = silu_and_mul(h[:, :inter], h[:, inter:])
    y = grouped_gemv(g, w2, al.sorted_ids, al.block_fid, fid_map, e, 1, pairs, active)
    return (y.view(t, top_k, -1).float() * topk_weights.float().unsqueeze(-1)).sum(1).to(x.dtype)


def moe_reference(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w13: ExpertStack,
                  w2: ExpertStack) -> torch.Tensor:
    """Float64 reference of `moe_layer` (each pair through its experts' float64 dequantization;
    the intermediate rounded to x's dtype as the layer does)."""
    inter = w2.k
    out = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
    for ti in range(topk_ids.shape[0]):
        for j in range(topk_ids.shape[1]):
            ex = int(topk_ids[ti, j])
            h = w4a16_reference(x[ti:ti + 1], w13.expert(ex))
            g = (torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]).to(x.dtype)
            out[ti] += float(topk_weights[ti, j]) * w4a16_reference(g, w2.expert(ex))[0]
    return out
