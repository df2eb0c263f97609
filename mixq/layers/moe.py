"""Mixture of experts where every expert's gate/up (w13) and down (w2) may each be in any
stored format, and experts of one layer may differ.

route -> dispatch (tokens grouped by expert) -> expert GEMMs grouped by format -> combine,
with typed hand-offs so other dispatchers (expert parallel) and kernels (fused MoE per
format) plug in. Observers (expert tracking) attach through `route_hooks`; when there are
none the forward does no extra work.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mixq.layers.linear import MixedPrecisionLinear


@dataclass
class Routing:
    """topk_ids [T, k] int64, topk_weights [T, k] float32."""

    topk_ids: torch.Tensor
    topk_weights: torch.Tensor


@dataclass
class Dispatch:
    """Token-expert pairs sorted by expert: rows `order[start[e]:start[e+1]]` of the
    flattened [T*k] pairs go to expert e (token = pair // k)."""

    order: torch.Tensor  # [T*k] int64 pair indices sorted by expert
    counts: list[int]  # [E] tokens per expert (host list: experts without tokens are skipped)
    top_k: int


def route(logits: torch.Tensor, top_k: int, renormalize: bool, scoring: str = "softmax") -> Routing:
    """Router logits [T, E] -> top-k experts and weights (float32, as the references do)."""
    if scoring == "softmax":
        probs = logits.float().softmax(-1)
    elif scoring == "sigmoid":
        probs = logits.float().sigmoid()
    else:
        raise ValueError(f"unknown router scoring {scoring!r}")
    w, ids = probs.topk(top_k, dim=-1)
    if renormalize:
        w = w / w.sum(-1, keepdim=True)
    return Routing(ids, w)


def dispatch(r: Routing, num_experts: int) -> Dispatch:
    flat = r.topk_ids.flatten()
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    return Dispatch(order, counts, r.topk_ids.shape[1])


class Expert(nn.Module):
    """One expert's gate/up/down projections under the checkpoint's names."""

    def __init__(self, hidden: int, inter: int, names: tuple[str, str, str]):
        super().__init__()
        self.names = names
        for n, (i, o) in zip(names, ((hidden, inter), (hidden, inter), (inter, hidden))):
            setattr(self, n, MixedPrecisionLinear(i, o))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, n) for n in self.names)
        return down(F.silu(gate(x)) * up(x))


def compute_experts(experts: nn.ModuleList, x: torch.Tensor, r: Routing, d: Dispatch) -> torch.Tensor:
    """Reference expert compute: each expert with tokens runs its own GEMMs in its own
    format; outputs are scaled by routing weights and summed per token."""
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    weights = r.topk_weights.flatten()
    start = 0
    for e, n in enumerate(d.counts):
        if n == 0:
            continue
        pairs = d.order[start : start + n]
        start += n
        tokens = pairs // d.top_k
        y = experts[e](x[tokens])  # [n, hidden]
        out.index_add_(0, tokens, y.float() * weights[pairs, None])
    return out.to(x.dtype)


class LocalDispatch:
    """Every expert lives in this process: group the pairs by expert, compute, combine.
    Expert parallelism swaps in a dispatcher that sends tokens to the ranks owning their
    experts and calls `moe.compute` on the local ones (mixq.distributed.moe)."""

    def __call__(self, moe: SparseMoE, x: torch.Tensor, r: Routing) -> torch.Tensor:
        return moe.compute(moe.experts, x, r, dispatch(r, moe.num_experts))


class SparseMoE(nn.Module):
    """Router + experts (+ optional shared expert with a sigmoid gate, Qwen2-MoE)."""

    def __init__(self, hidden: int, inter: int, num_experts: int, top_k: int, renormalize: bool,
                 names=("gate_proj", "up_proj", "down_proj"), shared_inter: int = 0):
        super().__init__()
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        self.gate = MixedPrecisionLinear(hidden, num_experts)
        self.experts = nn.ModuleList(Expert(hidden, inter, names) for _ in range(num_experts))
        self.shared_expert = Expert(hidden, shared_inter, names) if shared_inter else None
        self.shared_expert_gate = MixedPrecisionLinear(hidden, 1) if shared_inter else None
        self.route_hooks: list[Callable[[Routing], None]] = []
        self.compute: Callable = compute_experts
        self.dispatcher: Callable[[SparseMoE, torch.Tensor, Routing], torch.Tensor] = LocalDispatch()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = route(self.gate(x), self.top_k, self.renormalize)  # [T, k]
        for hook in self.route_hooks:
            hook(r)
        out = self.dispatcher(self, x, r)  # [T, hidden]
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out
