"""Mixture of experts where every expert's gate/up (w13) and down (w2) may each be in any
stored format, and experts of one layer may differ.

route -> dispatch (tokens grouped by expert) -> expert GEMMs grouped by format -> combine,
with typed hand-offs so other dispatchers (expert parallel) and kernels (fused MoE per
format) plug in. Observers (expert tracking) attach through `route_hooks`; when there are
none the forward does no extra work.

After loading, `process_weights_after_loading` picks the compute: on CUDA (or under the
Triton interpreter with MIXQ_TRITON_INTERPRET_METHODS=1) the experts are stacked per format
group for the fused kernels (mixq.kernels.fused_moe: one sort + one launch per format group
for w13 and for w2); elsewhere each expert is prepared alone for the reference loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import nn

from mixq.formats.spec import QuantizedWeight
from mixq.kernels import moe_pack
from mixq.kernels.fused_moe import MoEPlan, fused_moe
from mixq.kernels.methods import WNA16Method
from mixq.layers.linear import DenseMethod, MixedPrecisionLinear, TorchDequantMethod


@dataclass
class Routing:
    """topk_ids [T, k] int64, topk_weights [T, k] float32."""

    topk_ids: torch.Tensor
    topk_weights: torch.Tensor


class Dispatch:
    """Token-expert pairs sorted by expert: rows `order[start[e]:start[e+1]]` of the
    flattened [T*k] pairs go to expert e (token = pair // k).

    Computed on first use: the fused kernels sort on the device themselves and never read
    `order` or `counts` (whose host list is a device sync)."""

    def __init__(self, r: Routing, num_experts: int, order: torch.Tensor | None = None,
                 counts: list[int] | None = None):
        self.topk_ids, self.top_k, self.num_experts = r.topk_ids, r.topk_ids.shape[1], num_experts
        if order is not None:  # given by the caller (e.g. only this rank's pairs)
            self.order, self.counts = order, counts

    @cached_property
    def order(self) -> torch.Tensor:
        """[T*k] int64 pair indices sorted by expert (stable)."""
        return self.topk_ids.flatten().argsort(stable=True)

    @cached_property
    def counts(self) -> list[int]:
        """[E] tokens per expert (host list: experts without tokens are skipped)."""
        return torch.bincount(self.topk_ids.flatten(), minlength=self.num_experts).tolist()


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
    return Dispatch(r, num_experts)


class ExpertLinear(MixedPrecisionLinear):
    """A routed expert's projection. `load` keeps the weight as read (no repack yet): the
    layer's `process_weights_after_loading` either stacks it with its format group (this
    linear then holds views of the stack, so the bytes exist once) or prepares it alone."""

    def load(self, qw: QuantizedWeight, dtype: torch.dtype) -> None:
        if tuple(qw.shape) != (self.out_features, self.in_features):
            raise ValueError(f"{qw.name}: shape {list(qw.shape)} does not fit a Linear of "
                             f"[{self.out_features}, {self.in_features}]")
        self.weight, self.method, self.dtype = qw, None, dtype
        self.input_scale = None if qw.input_scale is None else qw.input_scale.to(dtype)

    def prepare_alone(self) -> None:
        """The per-expert path: pick this weight's own method and repack once."""
        if self.weight is not None and self.method is None:
            super().load(self.weight, self.dtype)

    def hold_view(self, view: QuantizedWeight) -> None:
        """Hold a view of a fused stack, with a method that reads that layout."""
        if "qweight" in view.tensors:
            self.method = WNA16Method()  # the stack's int layout is the wna16 one
        else:
            self.method = DenseMethod() if view.spec.layout == "dense" else TorchDequantMethod()
        self.weight = view

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.method is None:
            raise RuntimeError(f"{self.weight.name if self.weight else 'expert linear'}: loaded but not prepared; "
                               "call the MoE layer's process_weights_after_loading()")
        return super().forward(x)


class Expert(nn.Module):
    """One expert's gate/up/down projections under the checkpoint's names."""

    def __init__(self, hidden: int, inter: int, names: tuple[str, str, str], linear=MixedPrecisionLinear):
        super().__init__()
        self.names = names
        for n, (i, o) in zip(names, ((hidden, inter), (hidden, inter), (inter, hidden))):
            setattr(self, n, linear(i, o))

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
        self.hidden, self.inter = hidden, inter
        self.gate = MixedPrecisionLinear(hidden, num_experts)
        self.experts = nn.ModuleList(Expert(hidden, inter, names, ExpertLinear) for _ in range(num_experts))
        self.shared_expert = Expert(hidden, shared_inter, names) if shared_inter else None
        self.shared_expert_gate = MixedPrecisionLinear(hidden, 1) if shared_inter else None
        self.route_hooks: list[Callable[[Routing], None]] = []
        self.fused_plan: MoEPlan | None = None
        self.use_fused: bool | None = None  # None: fused wherever the kernels run (see below)
        # (experts, x, routing, dispatch) -> [T, hidden]; an expert-parallel dispatcher wraps it
        self.compute: Callable = self.compute_local
        # (moe, x, routing) -> [T, hidden]: all experts here, or expert parallel (mixq.distributed.moe)
        self.dispatcher: Callable[[SparseMoE, torch.Tensor, Routing], torch.Tensor] = LocalDispatch()

    @property
    def expert_pool(self) -> nn.ModuleList:
        """The experts this layer computes: all of them, or under expert parallelism
        (mixq.distributed) this rank's `local_experts`, numbered from 0 as its dispatcher
        routes them."""
        return getattr(self, "local_experts", None) or self.experts

    def compute_local(self, experts: nn.ModuleList, x: torch.Tensor, r: Routing, d: Dispatch) -> torch.Tensor:
        """The experts held by this layer: fused kernels once stacked, else the reference loop.
        Routed ids index `experts` (all experts, or under expert parallelism this rank's,
        numbered from 0); ids < 0 and experts without weights add nothing."""
        if self.fused_plan is not None:
            if experts is not self.expert_pool:
                raise ValueError("fused MoE: the plan numbers another expert list than the one dispatched")
            return fused_moe(x, r.topk_ids, r.topk_weights, self.fused_plan)
        return compute_experts(experts, x, r, d)

    def process_weights_after_loading(self, fused: bool | None = None) -> None:
        """Once all weights are loaded: stack the experts per format group for the fused
        kernels or prepare each alone. fused None: `self.use_fused`, and if that is None too,
        whenever the kernels run on this device. A weight the fused kernels cannot compute
        is an error naming it, not a fallback."""
        pool = self.expert_pool
        held = {}
        for e, ex in enumerate(pool):
            lins = [getattr(ex, n) for n in ex.names]
            loaded = [lin.weight is not None for lin in lins]
            if any(loaded) and not all(loaded):
                raise ValueError(f"expert {e}: only some of {ex.names} are loaded")
            if all(loaded) and lins[0].method is None:
                held[e] = lins
        if not held:
            return
        device = next(iter(held[min(held)][0].weight.tensors.values())).device
        fused = self.use_fused if fused is None else fused
        if fused is None:
            fused = moe_pack.fused_available(device)
        if not fused:
            for lins in held.values():
                for lin in lins:
                    lin.prepare_alone()
            return
        weights = {e: moe_pack.ExpertWeights(*(lin.weight for lin in lins), tuple(lin.input_scale for lin in lins))
                   for e, lins in held.items()}
        self.fused_plan, views = moe_pack.build_moe_plan(weights, len(pool), self.hidden, self.inter,
                                                         held[min(held)][0].dtype,
                                                         foreign_ids=pool is not self.experts)
        for e, lins in held.items():
            for lin, view in zip(lins, views[e]):
                lin.hold_view(view)  # the loaded tensors lose their last reference here

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = route(self.gate(x), self.top_k, self.renormalize)  # [T, k]
        for hook in self.route_hooks:
            hook(r)
        out = self.dispatcher(self, x, r)  # [T, hidden]
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out
