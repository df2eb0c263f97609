"""Tensor-parallel layers and `parallelize`, which turns a freshly built (unloaded) model
into one rank's part of it. The model files stay the math: the hand-offs between ranks
(all-reduce after row-parallel layers, the vocab-parallel embedding and LM head, the MoE
dispatcher) are attached here, from the layout in mixq.distributed.layout.
"""

from __future__ import annotations

import torch
from torch import nn

from mixq.distributed.comm import GroupComm
from mixq.distributed.layout import ShardLayout
from mixq.distributed.moe import AllReduceDispatch, AllToAllDispatch
from mixq.layers.embedding import Embedding
from mixq.layers.linear import MixedPrecisionLinear
from mixq.layers.moe import SparseMoE
from mixq.models.llama import Attention


class RowParallelLinear(MixedPrecisionLinear):
    """Input features split over the group: each rank multiplies its K slice, an
    all-reduce sums the partial outputs. The bias joins on rank 0 only, so it is added once."""

    def __init__(self, in_features: int, out_features: int, bias: bool, comm: GroupComm):
        super().__init__(in_features, out_features, bias)
        self.comm = comm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_scale is not None:  # smoothing compensation, sliced with K
            x = x * self.input_scale
        y = self.method.apply(self.weight, x, self.bias if self.comm.rank == 0 else None)
        return self.comm.all_reduce(y)  # [T, out]


class VocabParallelLMHead(MixedPrecisionLinear):
    """LM head split by vocabulary rows; every rank gets the full logits [R, vocab]."""

    def __init__(self, in_features: int, out_features: int, comm: GroupComm):
        super().__init__(in_features, out_features)
        self.comm = comm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.comm.all_gather(super().forward(x), -1)


class VocabParallelEmbedding(Embedding):
    """Embedding rows [start, start + V/tp) on this rank: ids outside look up zeros and
    the all-reduce fills them from their owner. Tied LM head: local logits, gathered."""

    def __init__(self, vocab: int, dim: int, comm: GroupComm, tied: bool = False):
        super().__init__(vocab // comm.size, dim, tied)
        self.comm = comm
        self.start = comm.rank * self.num_embeddings

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        outside = (local < 0) | (local >= self.num_embeddings)
        out = self.lookup(local.masked_fill(outside, 0))  # [T, dim]
        out.masked_fill_(outside[:, None], 0)
        return self.comm.all_reduce(out)

    def as_lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.comm.all_gather(self.logits(hidden), -1)  # [R, vocab]


class RemoteExpert(nn.Module):
    """Stands where another EP rank's expert sits in `experts`, so module names keep the
    checkpoint's expert ids; it holds nothing and is never called."""

    def __init__(self, owner: int):
        super().__init__()
        self.owner = owner

    def forward(self, x):  # pragma: no cover - dispatchers only call local experts
        raise RuntimeError(f"expert lives on EP rank {self.owner}")

    def extra_repr(self) -> str:
        return f"on EP rank {self.owner}"


def _local(size: int, shard) -> int:
    return size if shard is None else size // shard.world


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def parallelize(model: nn.Module, layout: ShardLayout, rank: int, comm: GroupComm) -> None:
    """Make an unloaded model rank `rank`'s part: local head counts, sharded Linears
    (their shapes become the shard's, so `load` checks what arrives), all-reduces after
    row-parallel Linears, vocab-parallel embedding/LM head, EP dispatchers on MoE layers."""
    for name, mod in list(model.named_modules()):
        if isinstance(mod, Attention):
            kv = layout.mc.num_kv_heads
            mod.h = mod.h // layout.tp
            mod.kv = kv // layout.tp if layout.tp <= kv else 1
            mod.attn.num_heads, mod.attn.num_kv_heads = mod.h, mod.kv
        elif isinstance(mod, SparseMoE):
            local = layout.local_experts(rank)
            for e in range(mod.num_experts):
                if e not in local:
                    mod.experts[e] = RemoteExpert(layout.expert_owner(e))
            experts = nn.ModuleList(mod.experts[e] for e in local)
            cls = AllToAllDispatch if layout.pc.moe_dispatch == "all-to-all" else AllReduceDispatch
            # a plain attribute, not a submodule: the experts stay registered under their ids
            object.__setattr__(mod, "local_experts", experts)
            mod.dispatcher = cls(experts, local.start, comm)
        elif isinstance(mod, Embedding) and not isinstance(mod, VocabParallelEmbedding):
            _replace(model, name, VocabParallelEmbedding(mod.num_embeddings, mod.dim, comm, mod.tied))
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, MixedPrecisionLinear):
            continue
        p = layout.placement(f"{name}.weight", rank)
        out_f, in_f, bias = mod.out_features, mod.in_features, mod.bias is not None
        if p.shard is not None and p.shard.dim == 0:
            out_f = _local(out_f, p.shard)
        elif p.shard is not None:
            in_f = _local(in_f, p.shard)
        if p.style == "row":
            new = RowParallelLinear(in_f, out_f, bias, comm)
        elif p.style == "vocab":
            new = VocabParallelLMHead(in_f, out_f, comm)
        elif p.shard is None:
            continue
        else:  # column / heads / expert shards: outputs stay local (no communication)
            new = MixedPrecisionLinear(in_f, out_f, bias)
        _replace(model, name, new)
