"""Which slice of which tensor every rank holds: the tensor-parallel and expert-parallel
layout, as data, checked against a load plan before anything is read.

Tensors are placed by their checkpoint names (the Llama/Qwen/Mixtral families share them):

  style          tensors                                   each rank of the TP group holds
  q_heads        self_attn.q_proj (+bias)                  its H/tp heads: rows, Shard(0)
  kv_heads       self_attn.k_proj, v_proj (+bias)          its Hkv/tp KV heads; when tp > Hkv,
                                                           KV head r*Hkv//tp (replicated)
  column         mlp / shared_expert gate_proj, up_proj    rows (intermediate), Shard(0)
  row            o_proj, down_proj                         columns (K), Shard(1); all-reduce
  vocab          embed_tokens, lm_head                     its V/tp vocabulary rows
  expert_column  experts.E.{gate,up}_proj / w1 / w3        only if E is one of its experts;
  expert_row     experts.E.down_proj / w2                  TP-sharded over tp/ep ranks
  replicated     norms, the router (mlp.gate), shared_expert_gate
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mixq.distributed.config import ParallelConfig
from mixq.errors import CheckpointError, ConfigError
from mixq.formats.base import Shard, check_shard
from mixq.formats.plan import LoadPlan
from mixq.models.config import ModelConfig

_EXPERT = re.compile(r"\.experts\.(\d+)\.")
_RULES = [
    (re.compile(r"\.experts\.\d+\.(gate_proj|up_proj|w1|w3)\.weight$"), "expert_column"),
    (re.compile(r"\.experts\.\d+\.(down_proj|w2)\.weight$"), "expert_row"),
    (re.compile(r"\.self_attn\.q_proj\.(weight|bias)$"), "q_heads"),
    (re.compile(r"\.self_attn\.[kv]_proj\.(weight|bias)$"), "kv_heads"),
    (re.compile(r"\.self_attn\.o_proj\.weight$"), "row"),
    (re.compile(r"\.(gate_proj|up_proj)\.(weight|bias)$"), "column"),
    (re.compile(r"\.down_proj\.weight$"), "row"),
    (re.compile(r"(^|\.)embed_tokens\.weight$"), "vocab"),
    (re.compile(r"^lm_head\.weight$"), "vocab"),
    (re.compile(r"\.(gate|shared_expert_gate)\.weight$"), "replicated"),  # routers: every rank routes
]


def style_of(name: str, ndim: int) -> str:
    """The parallel style of a tensor by name; 1-d tensors without a rule are replicated
    (norms). A 2-d tensor without a rule is an error: it would be silently replicated."""
    for rx, style in _RULES:
        if rx.search(name):
            return style
    if ndim <= 1:
        return "replicated"
    raise ConfigError(
        f"tensor parallelism: no rule for tensor {name!r} ({ndim}-d); mixq shards the Llama/Qwen/Mixtral "
        "tensor names (see mixq/distributed/layout.py)"
    )


def expert_of(name: str) -> int | None:
    m = _EXPERT.search(name)
    return None if m is None else int(m.group(1))


@dataclass(frozen=True)
class Placement:
    """What one rank holds of one tensor: nothing (held False), all (shard None) or a shard."""

    style: str
    held: bool
    shard: Shard | None


class ShardLayout:
    """The TP x EP layout of one replica of a model (every rank's view)."""

    def __init__(self, mc: ModelConfig, pc: ParallelConfig):
        self.mc, self.pc = mc, pc
        self.tp, self.ep = pc.tp_size, pc.ep_size
        self.moe_tp = pc.moe_tp_size
        self.experts_per_rank = mc.num_experts // self.ep if mc.num_experts else 0

    # -- who holds what ---------------------------------------------------------------

    def moe_ranks(self, rank: int) -> tuple[int, int]:
        """(moe ep rank, moe tp rank) of a TP rank: EP groups are runs of tp/ep ranks."""
        return rank // self.moe_tp, rank % self.moe_tp

    def local_experts(self, rank: int) -> range:
        """Global ids of the experts a rank computes (all of them without EP)."""
        m, _ = self.moe_ranks(rank)
        return range(m * self.experts_per_rank, (m + 1) * self.experts_per_rank)

    def expert_owner(self, expert: int) -> int:
        """The moe ep rank (EP group) owning an expert."""
        return expert // self.experts_per_rank

    def placement(self, name: str, rank: int, ndim: int = 2) -> Placement:
        style = style_of(name, ndim)
        tp, r = self.tp, rank
        if style in ("q_heads", "column", "vocab"):
            return Placement(style, True, Shard(0, r, tp))
        if style == "row":
            return Placement(style, True, Shard(1, r, tp))
        if style == "kv_heads":
            kv = self.mc.num_kv_heads
            # tp > kv: KV heads are replicated; rank r's query heads read KV head r*kv//tp
            return Placement(style, True, Shard(0, r, tp) if tp <= kv else Shard(0, r * kv // tp, kv))
        if style in ("expert_column", "expert_row"):
            m, t = self.moe_ranks(r)
            held = self.expert_owner(expert_of(name)) == m
            shard = Shard(0 if style == "expert_column" else 1, t, self.moe_tp) if self.moe_tp > 1 else None
            return Placement(style, held, shard)
        return Placement(style, True, None)

    def placements(self, plan: LoadPlan, rank: int) -> dict[str, Placement]:
        """Every planned tensor's placement on a rank: the loader's `select` is
        `lambda n: p[n].held`, its `shard_for` is `lambda n: p[n].shard`."""
        return {name: self.placement(name, rank, len(t.entry.shape)) for name, t in plan.tensors.items()}

    # -- checks, before anything is loaded -------------------------------------------

    def check_model(self) -> None:
        """Shape-level refusals from config.json alone (ConfigError naming the tensors)."""
        mc, tp, ep = self.mc, self.tp, self.ep
        if mc.num_heads % tp:
            raise ConfigError(f"--tp-size {tp} does not divide the {mc.num_heads} attention heads "
                              "(model.layers.*.self_attn.q_proj.weight is split by heads)")
        kv = mc.num_kv_heads
        if (tp <= kv and kv % tp) or (tp > kv and tp % kv):
            raise ConfigError(f"--tp-size {tp} and the {kv} KV heads (model.layers.*.self_attn.k_proj/v_proj."
                              "weight): one must divide the other (KV heads are split, or replicated when tp > kv)")
        if mc.vocab_size % tp:
            raise ConfigError(f"--tp-size {tp} does not divide the vocabulary of {mc.vocab_size} "
                              "(model.embed_tokens.weight and lm_head.weight are split by vocabulary rows)")
        if mc.num_experts and mc.num_experts % ep:
            raise ConfigError(f"--ep-size {ep} does not divide the {mc.num_experts} experts of each MoE layer "
                              "(model.layers.*.mlp.experts.*)")

    def check(self, plan: LoadPlan) -> None:
        """check_model, then every planned tensor's shard against its format's packing,
        group and block units (headers only). Raises ConfigError naming the tensor."""
        self.check_model()
        for name, t in plan.tensors.items():
            p = self.placement(name, 0, len(t.entry.shape))
            if p.shard is None:
                continue
            try:
                check_shard(t.entry, p.shard)
            except CheckpointError as e:
                raise ConfigError(f"{self.describe()}: {e} ({t.spec.describe()} from {t.file})") from None

    def describe(self) -> str:
        s = f"--tp-size {self.tp}"
        return s + (f" --ep-size {self.ep}" if self.ep > 1 else "")

    # -- bytes per rank ----------------------------------------------------------------

    def rank_bytes(self, plan: LoadPlan) -> list[dict]:
        """Per rank, the bytes it will read and hold (as stored), by format, from headers
        only: [{"rank", "bytes", "by_format": {family: bytes}, "experts": [first, last] | None}]."""
        out = []
        for r in range(self.tp):
            by_format: dict[str, int] = {}
            for name, p in self.placements(plan, r).items():
                t = plan.tensors[name]
                if not p.held:
                    continue
                n = plan.catalog(t).nbytes(name, p.shard)
                if name in plan.input_scales:  # smoothing compensation [K], sliced with K
                    k = plan.input_scales[name].numel()
                    n += 4 * (k // p.shard.world if p.shard is not None and p.shard.dim == 1 else k)
                by_format[t.spec.family] = by_format.get(t.spec.family, 0) + n
            ex = self.local_experts(r) if self.experts_per_rank else None
            out.append({"rank": r, "bytes": sum(by_format.values()), "by_format": dict(sorted(by_format.items())),
                        "experts": None if ex is None else [ex.start, ex.stop - 1]})
        return out
