"""Program-id and split-K helpers shared by the GEMM kernels (wna16, w8a16, w8a8)."""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: no kernels
    triton = None

if triton is not None:

    @triton.jit
    def grouped_tile(pid, M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
        """(pid_m, pid_n) of program `pid` in grouped order: GROUP_M row tiles take each
        weight column tile in turn while it is in L2, instead of every row tile sweeping
        the whole weight."""
        num_m = tl.cdiv(M, BM)
        width = GROUP_M * tl.cdiv(N, BN)
        first_m = (pid // width) * GROUP_M
        rows = tl.minimum(num_m - first_m, GROUP_M)
        return first_m + (pid % width) % rows, (pid % width) // rows

    @triton.jit
    def split_k_range(pid_k, k_tiles, split_k):
        """[t0, t1): the K tiles split `pid_k` of `split_k` covers (the last may be short
        or empty; an empty split still stores its zero partial)."""
        per_split = tl.cdiv(k_tiles, split_k)
        t0 = pid_k * per_split
        return t0, tl.minimum(t0 + per_split, k_tiles)

    @triton.jit
    def store_tile(acc, out_ptr, ws_ptr, cnt_ptr, tile, pid_k, split_k, out_offs, ws_offs, ws_split_stride, mask,
                   FIXUP: tl.constexpr):
        """Write a program's fp32 tile `acc`. Unsplit: the output, in its dtype. Split-K: the
        partial into the workspace; with FIXUP the last split of the tile to arrive (an
        acq_rel counter per tile) sums the partials in split order, writes the output and
        re-arms the counter: one launch, deterministic, graph-safe (the counters end at
        zero). Without FIXUP the caller sums the workspace (one parallel pass, which wins
        over one program's serial reads once tiles are large)."""
        if split_k == 1:
            tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=mask)
        elif not FIXUP:
            tl.store(ws_ptr + pid_k * ws_split_stride + ws_offs, acc, mask=mask)
        else:
            tl.store(ws_ptr + pid_k * ws_split_stride + ws_offs, acc, mask=mask)
            tl.debug_barrier()  # all of this program's partial is written before it arrives
            arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
            if arrived == split_k - 1:
                # .cg: read other SMs' partials from L2, never a stale L1 line. Eight loads in
                # flight per round (a load at a time made the sum 16 L2 round trips long);
                # the adds stay in split order.
                total = tl.zeros_like(acc)
                for s0 in range(0, split_k, 8):
                    for i in tl.static_range(8):
                        s = tl.minimum(s0 + i, split_k - 1)  # past the last split: re-read it, add zero
                        part = tl.load(ws_ptr + s * ws_split_stride + ws_offs, mask=mask, other=0.0,
                                       cache_modifier=".cg")
                        total += tl.where(s0 + i < split_k, part, 0.0)
                tl.store(out_ptr + out_offs, total.to(out_ptr.dtype.element_ty), mask=mask)
                tl.atomic_xchg(cnt_ptr + tile, 0)


MAX_SPLIT_TILES = 1 << 16
# Split-K tiles up to this many elements are summed by their last split (store_tile FIXUP):
# at 1-16 rows that saves a sum and a cast launch per GEMM; a 64 x 64 tile's serial reads
# cost more than the launches (H100, bench/engine.py at batch 64).
FIXUP_MAX_ELEMS = 16 * 128
_COUNTERS: dict[torch.device, torch.Tensor] = {}


class SplitOutput:
    """The buffers of one GEMM launch that may split K: `out` [M, N] in the output dtype;
    with split > 1 the fp32 workspace [split, M, N], and either the arrival counters
    (`fixup`: the tile's last split sums in the kernel) or a sum after the launch."""

    def __init__(self, m: int, n: int, split: int, bm: int, bn: int, dtype: torch.dtype, device: torch.device):
        self.out = torch.empty((m, n), device=device, dtype=dtype)
        self.split = split
        self.fixup = bm == 1 or bm * bn <= FIXUP_MAX_ELEMS
        self.ws = torch.empty((split, m, n), device=device, dtype=torch.float32) if split > 1 else self.out
        tiles = -(-n // bn) * -(-m // bm)
        self.counters = split_counters(device, tiles) if split > 1 and self.fixup else None
        self.split_stride = self.ws.stride(0) if split > 1 else 0

    def result(self) -> torch.Tensor:
        """The output, once the launch is queued."""
        return self.ws.sum(0).to(self.out.dtype) if self.split > 1 and not self.fixup else self.out


def split_counters(device: torch.device, tiles: int) -> torch.Tensor:
    """The per-tile arrival counters of `store_tile` on a device: int32 [MAX_SPLIT_TILES],
    zero between launches. Allocated once per device and never replaced (captured CUDA
    graphs hold its address); launches on one stream at a time share it."""
    if tiles > MAX_SPLIT_TILES:
        raise ValueError(f"split-K over {tiles} output tiles exceeds the {MAX_SPLIT_TILES} counters")
    c = _COUNTERS.get(device)
    if c is None:
        c = _COUNTERS[device] = torch.zeros(MAX_SPLIT_TILES, dtype=torch.int32, device=device)
    return c

