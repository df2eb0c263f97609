"""Expert activation statistics on the host: the table, its JSON document (the schema
MISSION.md promises, plus additions in their own top-level keys), parsing and merging.

Definitions (docs/expert-tracking.md):
- total_tokens_processed: token-expert pairs routed to the expert (a token routed to it in
  any of its top-k slots counts once; each token contributes top_k pairs to its layer);
- activation_count: forward passes (engine steps) in which the expert received >= 1 token;
- last_activation_time: wall-clock time (epoch seconds) of the last such pass, null if none.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

FORMAT_VERSION = 1


def expert_key(layer_id: int, expert_id: int) -> str:
    return f"layer_{layer_id}_expert_{expert_id}"


def load_balance(tokens: list[int]) -> dict:
    """Load-balance figures of one layer from its per-expert token counts.

    max_over_mean: hottest expert's load / mean load (1.0 = perfectly balanced, E = one
    expert takes everything); entropy_bits: Shannon entropy of the token distribution over
    experts; normalized_entropy: entropy / log2(E) in [0, 1] (1 = balanced). null when the
    layer routed no token.
    """
    total, n = sum(tokens), len(tokens)
    if total == 0 or n == 0:
        return {"max_over_mean": None, "entropy_bits": None, "normalized_entropy": None}
    h = -sum(c / total * math.log2(c / total) for c in tokens if c)
    return {"max_over_mean": max(tokens) * n / total, "entropy_bits": h,
            "normalized_entropy": h / math.log2(n) if n > 1 else 1.0}


def empty_requests() -> dict:
    return {"num_requests": 0, "input_tokens": 0, "output_tokens": 0, "by_request": {}}


MAX_REQUESTS_KEPT = 1024  # by_request keeps the most recent requests; the totals cover all


def merge_requests(a: dict, b: dict) -> dict:
    out = {"num_requests": a["num_requests"] + b["num_requests"],
           "input_tokens": a["input_tokens"] + b["input_tokens"],
           "output_tokens": a["output_tokens"] + b["output_tokens"],
           "by_request": {rid: dict(v) for rid, v in a["by_request"].items()}}
    for rid, v in b["by_request"].items():
        out["by_request"][rid] = dict(v)
    while len(out["by_request"]) > MAX_REQUESTS_KEPT:
        out["by_request"].pop(next(iter(out["by_request"])))
    return out


@dataclass
class ExpertTable:
    """Counts of `len(layer_ids)` MoE layers (row i = layer `layer_ids[i]`, ascending).

    activations [L, E] int64, tokens [L, E] int64, slot_tokens [L, k, E] int64 (routed
    pairs by top-k slot; pairs recorded by hand have no slot, so its sum over slots may be
    less than `tokens`), last_time [L, E] float64 (0 = never).
    """

    layer_ids: list[int]
    activations: torch.Tensor
    tokens: torch.Tensor
    slot_tokens: torch.Tensor
    last_time: torch.Tensor
    num_passes: int = 0
    since: float = 0.0
    requests: dict = field(default_factory=empty_requests)

    @property
    def num_experts(self) -> int:
        return self.tokens.shape[1]

    @property
    def top_k(self) -> int:
        return self.slot_tokens.shape[1]

    @classmethod
    def empty(cls, layer_ids: list[int], num_experts: int, top_k: int, since: float = 0.0) -> ExpertTable:
        L = len(layer_ids)
        z = torch.zeros(L, num_experts, dtype=torch.int64)
        return cls(sorted(layer_ids), z, z.clone(), torch.zeros(L, top_k, num_experts, dtype=torch.int64),
                   torch.zeros(L, num_experts, dtype=torch.float64), since=since)

    def row(self, layer_id: int) -> int:
        try:
            return self.layer_ids.index(layer_id)
        except ValueError:
            raise ValueError(f"layer_id {layer_id} is not a tracked MoE layer (tracked: "
                             f"{', '.join(map(str, self.layer_ids)) or 'none'})") from None

    def merged(self, other: ExpertTable) -> ExpertTable:
        """Element-wise sum over the union of layers (last_time: the later one)."""
        layers = sorted(set(self.layer_ids) | set(other.layer_ids))
        E, k = max(self.num_experts, other.num_experts), max(self.top_k, other.top_k)
        out = ExpertTable.empty(layers, E, k, since=min((s for s in (self.since, other.since) if s), default=0.0))
        for t in (self, other):
            rows = [layers.index(lid) for lid in t.layer_ids]
            e, kk = t.num_experts, t.top_k
            out.activations[rows, :e] += t.activations
            out.tokens[rows, :e] += t.tokens
            out.slot_tokens[rows, :kk, :e] += t.slot_tokens
            out.last_time[rows, :e] = torch.maximum(out.last_time[rows, :e], t.last_time)
        out.num_passes = self.num_passes + other.num_passes
        out.requests = merge_requests(self.requests, other.requests)
        return out

    # -- the document ------------------------------------------------------------------

    def top(self, top_k: int = 10, layer_id: int | None = None, expert_id: int | None = None) -> list[dict]:
        """The most loaded experts: by tokens, then activations, then (layer, expert);
        experts never routed to are left out."""
        toks, acts = self.tokens.tolist(), self.activations.tolist()
        cands = [(r, e) for r in range(len(self.layer_ids)) for e in range(self.num_experts)
                 if (layer_id is None or self.layer_ids[r] == layer_id) and (expert_id is None or e == expert_id)
                 and (toks[r][e] > 0 or acts[r][e] > 0)]
        cands.sort(key=lambda re: (-toks[re[0]][re[1]], -acts[re[0]][re[1]], self.layer_ids[re[0]], re[1]))
        return [{"layer_id": self.layer_ids[r], "expert_id": e, "activation_count": acts[r][e],
                 "total_tokens_processed": toks[r][e]} for r, e in cands[: max(top_k, 0)]]

    def to_doc(self, top_k: int = 10, layer_id: int | None = None, expert_id: int | None = None) -> dict:
        """The JSON document, optionally restricted to one layer and/or one expert id."""
        rows = range(len(self.layer_ids)) if layer_id is None else [self.row(layer_id)]
        if expert_id is not None and not 0 <= expert_id < self.num_experts:
            raise ValueError(f"expert_id {expert_id} is out of range: layers have {self.num_experts} experts")
        experts = range(self.num_experts) if expert_id is None else [expert_id]
        expert_stats, layer_stats, balance, slots = {}, {}, {}, {}
        for r in rows:
            lid = self.layer_ids[r]
            toks, acts, last = self.tokens[r].tolist(), self.activations[r].tolist(), self.last_time[r].tolist()
            for e in experts:
                expert_stats[expert_key(lid, e)] = {
                    "layer_id": lid, "expert_id": e, "activation_count": acts[e],
                    "last_activation_time": last[e] if last[e] > 0 else None, "total_tokens_processed": toks[e]}
            layer_stats[str(lid)] = {
                "total_experts": self.num_experts, "total_activations": sum(acts), "total_tokens": sum(toks),
                "experts": {str(e): {"activation_count": acts[e], "total_tokens_processed": toks[e]}
                            for e in range(self.num_experts)}}
            balance[str(lid)] = load_balance(toks)
            slots[str(lid)] = self.slot_tokens[r].tolist()
        return {
            "expert_stats": expert_stats,
            "layer_stats": layer_stats,
            "top_experts": self.top(top_k, layer_id, expert_id),
            "load_balance": balance,
            "tokens_by_slot": slots,
            "requests": self.requests,
            "meta": {"format_version": FORMAT_VERSION, "num_experts": self.num_experts, "top_k": self.top_k,
                     "layer_ids": list(self.layer_ids), "num_forward_passes": self.num_passes,
                     "since": self.since},
        }

    @classmethod
    def from_doc(cls, doc: dict, source: str = "<stats>") -> ExpertTable:
        """Parse a document written by `to_doc` (or any with the MISSION schema's
        expert_stats; the other sections are optional). ValueError names what is wrong."""
        if not isinstance(doc, dict) or not isinstance(doc.get("expert_stats"), dict):
            raise ValueError(f"{source}: not an expert stats document (no 'expert_stats' mapping)")
        meta = doc.get("meta") or {}
        try:
            entries = [(int(v["layer_id"]), int(v["expert_id"]), int(v["activation_count"]),
                        int(v["total_tokens_processed"]), v.get("last_activation_time"))
                       for v in doc["expert_stats"].values()]
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{source}: malformed expert_stats entry ({type(e).__name__}: {e})") from None
        layers = sorted({lid for lid, *_ in entries} | {int(x) for x in meta.get("layer_ids", [])})
        E = max([meta.get("num_experts", 0)] + [e + 1 for _, e, *_ in entries])
        slot_doc = doc.get("tokens_by_slot") or {}
        k = int(meta.get("top_k", 0) or max((len(v) for v in slot_doc.values()), default=0))
        t = cls.empty(layers, E, k, since=float(meta.get("since", 0.0)))
        for lid, e, a, n, last in entries:
            if lid < 0 or e < 0 or a < 0 or n < 0:
                raise ValueError(f"{source}: negative value in {expert_key(lid, e)}")
            r = t.row(lid)
            t.activations[r, e], t.tokens[r, e] = a, n
            t.last_time[r, e] = float(last) if last is not None else 0.0
        for lid, mat in slot_doc.items():
            try:
                m = torch.tensor(mat, dtype=torch.int64).reshape(-1, E) if mat else torch.zeros(0, E, dtype=torch.int64)
                t.slot_tokens[t.row(int(lid)), : m.shape[0]] = m
            except (RuntimeError, ValueError, TypeError) as e:
                raise ValueError(f"{source}: tokens_by_slot[{lid!r}] is not a [top_k, {E}] matrix: {e}") from None
        t.num_passes = int(meta.get("num_forward_passes", 0))
        if doc.get("requests"):
            t.requests = merge_requests(empty_requests(), doc["requests"])
        return t


def read_stats(path: str | os.PathLike) -> dict:
    """A stats JSON file as a dict; ValueError naming the file when it is not one."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text())
    except OSError as e:
        raise ValueError(f"{p}: cannot read: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: invalid JSON: {e}") from None
    ExpertTable.from_doc(doc, str(p))  # validate
    return doc


def write_json(path: str | os.PathLike, doc: dict) -> None:
    """Write atomically (a temp file in the same directory, then rename), so a reader never
    sees half a file and a symlink at `path` is replaced rather than followed."""
    p = Path(path)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=1)
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def merge_stats(*docs: dict) -> dict:
    """Sum several stats documents (e.g. one per data/expert-parallel rank) into one."""
    if not docs:
        raise ValueError("merge_stats: no documents")
    table = ExpertTable.from_doc(docs[0])
    for d in docs[1:]:
        table = table.merged(ExpertTable.from_doc(d))
    return table.to_doc(top_k=len(docs[0].get("top_experts", [])) or 10)
