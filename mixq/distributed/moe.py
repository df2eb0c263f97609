"""Expert-parallel token dispatchers: they wrap a SparseMoE's expert compute (`moe.compute`,
the reference loop or the fused kernel) around the experts this rank owns.

Both hand `moe.compute` only LOCAL experts, numbered 0..n_local-1, with a `Routing` whose
pairs for other ranks' experts carry id -1 and weight 0, and a `Dispatch` listing only the
local pairs. A kernel that replaces `moe.compute` must take its experts from its `experts`
argument and skip ids < 0 (vLLM's expert_map convention).

- `AllReduceDispatch` (default): attention TP leaves every token on every rank, so no
  token has to move: each rank computes its experts (or its TP shard of each) for the
  tokens routed to them and one all-reduce over the TP group sums the partial outputs
  (= reduce-scatter + all-gather). Cheapest while tokens are replicated.
- `AllToAllDispatch`: each rank routes its own slice of the tokens, sends every
  (token, expert) pair to the expert's owner, gets the expert outputs back, combines its
  slice and all-gathers the slices. The shape EP takes when tokens are not replicated
  (DP attention); needs whole experts per rank (ep == tp).
"""

from __future__ import annotations

from functools import cached_property

import torch
from torch import nn

from mixq.distributed.comm import GroupComm
from mixq.layers.moe import Dispatch, Routing, SparseMoE, dispatch


class _LocalDispatch(Dispatch):
    """The dispatch of this rank's pairs; like Dispatch, computed on first use only (the
    fused kernels never ask, so their forward has no host sync and can be graph-captured)."""

    def __init__(self, local: Routing, count: int, flat: torch.Tensor):
        super().__init__(local, count)
        self._flat = flat  # [T*k] local expert id, `count` for other ranks' pairs

    @cached_property
    def counts(self) -> list[int]:
        return torch.bincount(self._flat, minlength=self.num_experts + 1)[: self.num_experts].tolist()

    @cached_property
    def order(self) -> torch.Tensor:
        return self._flat.argsort(stable=True)[: sum(self.counts)]  # others sort last, then are cut off


def localize(r: Routing, first: int, count: int) -> tuple[Routing, Dispatch]:
    """Global routing -> routing over experts [first, first+count) renumbered from 0;
    other experts' pairs get id -1 and weight 0 and are left out of the dispatch."""
    ids = r.topk_ids - first
    mine = (ids >= 0) & (ids < count)
    local = Routing(torch.where(mine, ids, -1), torch.where(mine, r.topk_weights, 0.0))
    return local, _LocalDispatch(local, count, torch.where(mine, ids, count).flatten())


class AllReduceDispatch:
    """Local experts on replicated tokens, partial outputs summed over the TP group."""

    def __init__(self, experts: nn.ModuleList, first: int, comm: GroupComm):
        self.experts, self.first, self.comm = experts, first, comm

    def __call__(self, moe: SparseMoE, x: torch.Tensor, r: Routing) -> torch.Tensor:
        local, d = localize(r, self.first, len(self.experts))
        out = moe.compute(self.experts, x, local, d)  # [T, hidden], this rank's share
        return self.comm.all_reduce(out)


class AllToAllDispatch:
    """Tokens travel to their experts' ranks and back (whole experts per rank)."""

    def __init__(self, experts: nn.ModuleList, first: int, comm: GroupComm):
        self.experts, self.first, self.comm = experts, first, comm

    def __call__(self, moe: SparseMoE, x: torch.Tensor, r: Routing) -> torch.Tensor:
        world, rank, n_local = self.comm.size, self.comm.rank, len(self.experts)
        t, k = r.topk_ids.shape
        chunk = -(-t // world)
        lo, hi = min(rank * chunk, t), min((rank + 1) * chunk, t)  # the tokens this rank routes
        flat = r.topk_ids[lo:hi].flatten()  # [(hi-lo)*k] global expert ids
        dest = flat // n_local
        order = dest.argsort(stable=True)  # pairs grouped by destination rank
        send = torch.bincount(dest, minlength=world)
        recv = self.comm.all_to_all(send, [1] * world, [1] * world)
        send_counts, recv_counts = send.tolist(), recv.tolist()
        tokens = lo + order // k
        x_in = self.comm.all_to_all(x[tokens], send_counts, recv_counts)  # [P, hidden]
        e_in = self.comm.all_to_all(flat[order] % n_local, send_counts, recv_counts)
        # every received row is one (token, expert) pair: weight 1, combined at its source
        rr = Routing(e_in[:, None], torch.ones(e_in.shape[0], 1, device=x.device))
        y = moe.compute(self.experts, x_in, rr, dispatch(rr, n_local))
        y = self.comm.all_to_all(y, recv_counts, send_counts)  # back, in `order`
        part = torch.zeros(chunk, x.shape[1], dtype=torch.float32, device=x.device)
        w = r.topk_weights[lo:hi].flatten()[order]
        part.index_add_(0, order // k, y.float() * w[:, None])
        return self.comm.all_gather(part.to(x.dtype), 0)[:t]  # every rank gets every token
