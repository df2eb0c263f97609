"""Units: the parts of a model that must share one format, their candidate precisions and
what each costs in bytes, read from checkpoint headers.

A unit is what one fused GEMM reads, or one projection: per layer q/k/v together, o,
gate/up together, down; per routed expert gate/up (w1/w3) together and down (w2); the
shared expert's gate/up and down; the LM head where a candidate stores it quantized.
Units of one layer's attention, one MLP or one expert form a *group*: the planner chooses
a group's formats together, because an AWQ-style source smooths v->o and up->down pairs
and such a pair must come from one checkpoint (mixq.formats.smoothing)."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field

from mixq.config.schema import PATH_KEYS, PRECISIONS, MixedPrecisionConfig
from mixq.errors import CheckpointError, ConfigError
from mixq.formats.plan import LoadPlan, build_plan
from mixq.formats.smoothing import linked_pairs, smooths_pairs

_L = r"^(?P<prefix>.*\.layers\.(?P<layer>\d+)\."
_KINDS = (  # (kind, regex); the first match wins
    ("expert_gate_up", re.compile(_L + r"(?:mlp|block_sparse_moe)\.experts\.(?P<expert>\d+)\.)(?:gate_proj|up_proj|w1|w3)\.weight$")),
    ("expert_down", re.compile(_L + r"(?:mlp|block_sparse_moe)\.experts\.(?P<expert>\d+)\.)(?:down_proj|w2)\.weight$")),
    ("shared_gate_up", re.compile(_L + r"mlp\.shared_expert\.)(?:gate_proj|up_proj)\.weight$")),
    ("shared_down", re.compile(_L + r"mlp\.shared_expert\.)down_proj\.weight$")),
    ("qkv", re.compile(_L + r"self_attn\.)[qkv]_proj\.weight$")),
    ("o", re.compile(_L + r"self_attn\.)o_proj\.weight$")),
    ("gate_up", re.compile(_L + r"mlp\.)(?:gate_proj|up_proj)\.weight$")),
    ("down", re.compile(_L + r"mlp\.)down_proj\.weight$")),
)
_GROUP_OF = {"qkv": "attn", "o": "attn", "gate_up": "mlp", "down": "mlp", "shared_gate_up": "shared",
             "shared_down": "shared", "expert_gate_up": "expert", "expert_down": "expert"}
PRECISION_OF_KEY = {"fp8_path": "fp8", "int8_path": "int8", "int4_path": "int4", "gptq_int4_path": "gptq_int4", "gguf_path": "gguf",
                    "awq_int4_path": "awq_int4"}


@dataclass
class Unit:
    id: str  # "L3.qkv", "L3.E5.gate_up", "lm_head"
    kind: str
    layer: int | None
    expert: int | None
    group: str  # "L3.attn", "L3.E5", "lm_head"
    tensors: list[str] = field(default_factory=list)


def find_units(names) -> list[Unit]:
    """The units among tensor names, in model order."""
    units: dict[str, Unit] = {}
    for name in names:
        if name.endswith("lm_head.weight"):
            units.setdefault("lm_head", Unit("lm_head", "lm_head", None, None, "lm_head")).tensors.append(name)
            continue
        for kind, rx in _KINDS:
            m = rx.match(name)
            if not m:
                continue
            layer = int(m.group("layer"))
            expert = int(m.group("expert")) if kind.startswith("expert") else None
            part = kind.removeprefix("expert_").removeprefix("shared_")
            head = f"L{layer}" + (f".E{expert}" if expert is not None else "") + (".S" if kind.startswith("shared") else "")
            group = f"L{layer}.{_GROUP_OF[kind]}" if expert is None and not kind.startswith("shared") else head
            uid = f"{head}.{part}"
            units.setdefault(uid, Unit(uid, kind, layer, expert, group)).tensors.append(name)
            break
    return list(units.values())


def fingerprint(plan_or_catalog, names) -> str:
    """A digest of the named tensors' headers (name, shape, format, bytes): two checkpoints
    with the same digest store these tensors alike."""
    entries = plan_or_catalog.entries
    rows = [(n, list(entries[n].shape), entries[n].spec.describe(), entries[n].nbytes) for n in sorted(names)
            if n in entries]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]


class UnitSpace:
    """The units of a base checkpoint and, per candidate precision, each unit's bytes.

    paths: config path key -> checkpoint directory (fp16_path: the base). formats: the
    precisions to offer (default: one per quantized path). A candidate checkpoint that
    lacks a unit's tensor is an error naming it; a unit it stores dense is not offered it."""

    def __init__(self, paths: dict[str, str], formats: list[str] | None = None):
        self.paths = {k: str(v) for k, v in paths.items() if v is not None}
        src = MixedPrecisionConfig.from_dict({"mixed_precision": dict(self.paths)}, source="<measure sources>")
        self.mp = src.mixed_precision
        self.base_plan: LoadPlan = build_plan(src)
        dense = next(t.spec.family for t in self.base_plan.tensors.values())
        self.base_precision = "bf16" if dense == "bf16" else "fp16"
        self.candidates = self._formats(formats)
        units = find_units(self.base_plan.tensors)
        self.bytes: dict[str, dict[str, int]] = {
            u.id: {self.base_precision: sum(self.base_plan.tensors[n].nbytes for n in u.tensors)} for u in units}
        self.trials: dict[str, LoadPlan] = {}
        for f in self.candidates:
            key = self.mp.path_key_for(f)
            cat = self.base_plan.catalogs[key]
            missing = [n for u in units if u.kind != "lm_head" for n in u.tensors if n not in cat.entries]
            if missing:
                raise CheckpointError(f"the {f} checkpoint {cat.path} (mixed_precision.{key}) has no tensor "
                                      f"{missing[0]!r} ({len(missing)} unit tensors missing); a candidate must hold "
                                      "every projection of the model")
            quant = {n: f for u in units for n in u.tensors if n in cat.entries and cat.entries[n].spec.is_quantized}
            trial = build_plan(MixedPrecisionConfig.from_dict(
                {"mixed_precision": {**self.paths, "weight_mapping": quant}}, source=f"<every unit in {f}>"))
            self.trials[f] = trial
            for u in units:
                if all(n in quant for n in u.tensors):
                    self.bytes[u.id][f] = sum(trial.tensors[n].nbytes for n in u.tensors)
        self.units = [u for u in units if len(self.bytes[u.id]) > 1]  # a unit with one choice is fixed
        self.unit_of = {n: u for u in self.units for n in u.tensors}
        self.smoothing = {f: smooths_pairs(self.base_plan.catalogs[self.mp.path_key_for(f)]) for f in self.candidates}
        shapes = {n: tuple(t.entry.shape) for n, t in self.base_plan.tensors.items() if n in self.unit_of}
        # unit pairs that must share a source when it smooths pairs
        self.links = sorted({(self.unit_of[a].id, self.unit_of[b].id) for a, b in linked_pairs(shapes)
                             if self.unit_of[a].id != self.unit_of[b].id})

    def _formats(self, formats: list[str] | None) -> list[str]:
        mp = self.mp
        if formats is None:
            return [PRECISION_OF_KEY[k] for k in PATH_KEYS if k != "fp16_path" and getattr(mp, k)]
        out = []
        for f in formats:
            if f not in PRECISIONS:
                raise ConfigError(f"--formats: unknown precision {f!r}; expected one of {', '.join(PRECISIONS)}")
            key = mp.path_key_for(f)  # ConfigError naming the missing path flag
            if key != "fp16_path" and f not in out:
                out.append(f)
        if len({mp.path_key_for(f) for f in out}) != len(out):
            raise ConfigError(f"--formats {','.join(formats)}: two of them read the same checkpoint")
        return out

    def groups(self) -> dict[str, list[Unit]]:
        out: dict[str, list[Unit]] = {}
        for u in self.units:
            out.setdefault(u.group, []).append(u)
        return out

    def linked(self, uid: str) -> str | None:
        """The unit smoothed together with this one, if any."""
        for a, b in self.links:
            if uid in (a, b):
                return b if uid == a else a
        return None

    def fixed_bytes(self) -> int:
        """Bytes of every tensor outside the units (always from the base)."""
        return sum(t.nbytes for n, t in self.base_plan.tensors.items() if n not in self.unit_of)

    def fingerprints(self) -> dict[str, str]:
        """precision -> digest of its checkpoint's unit tensors (the base: of every tensor)."""
        names = list(self.unit_of)
        out = {self.base_precision: fingerprint(self.base_plan.base, list(self.base_plan.tensors))}
        for f in self.candidates:
            out[f] = fingerprint(self.base_plan.catalogs[self.mp.path_key_for(f)], names)
        return out
