"""`mixq plan`: turn expert activation stats into a mixed-precision config under a
memory budget.

The model is cut into units that must share one format: each layer's attention (q/k/v/o),
dense MLP, shared expert, and each routed expert (gate/up/down together, so AWQ-smoothed
pairs never split). Everything else (embeddings, norms, routers, LM head) stays in the
base. Bytes come from the load plan (safetensors headers), so the prediction is exactly
what `mixq inspect` reports for the written config.

Greedy, in priority order — attention, dense MLPs, shared experts (they see every token),
then routed experts from the most to the least loaded — each unit gets the highest format
that still fits, all later units counted at the cheapest one. An expert never gets a
higher format than a hotter one.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from mixq.config.resolve import PrecisionResolver
from mixq.config.schema import PATH_KEYS, PRECISIONS, MixedPrecisionConfig
from mixq.errors import ConfigError
from mixq.formats.plan import LoadPlan, build_plan
from mixq.tracking.expert_stats import ExpertTable
from mixq.tracking.memory import MemoryStats

KINDS = ("attention", "mlp", "shared_expert", "expert")
_UNIT_RX = (
    ("expert", re.compile(r"^.*\.layers\.(?P<layer>\d+)\.(?:mlp|block_sparse_moe)\.experts\.(?P<expert>\d+)\.[^.]+\.weight$")),
    ("shared_expert", re.compile(r"^.*\.layers\.(?P<layer>\d+)\.mlp\.shared_expert\.[^.]+\.weight$")),
    ("attention", re.compile(r"^.*\.layers\.(?P<layer>\d+)\.self_attn\.[qkvo]_proj\.weight$")),
    ("mlp", re.compile(r"^.*\.layers\.(?P<layer>\d+)\.mlp\.(?:gate|up|down)_proj\.weight$")),
)
_KIND_NAMES = {"attention": "attention (per layer)", "mlp": "dense MLPs", "shared_expert": "shared experts",
               "expert": "routed experts"}
_PRECISION_OF_KEY = {"fp8_path": "fp8", "int8_path": "int8", "int4_path": "int4", "gptq_int4_path": "gptq_int4", "gguf_path": "gguf",
                     "awq_int4_path": "awq_int4"}


@dataclass
class Unit:
    kind: str
    layer: int
    expert: int | None
    tensors: list[str] = field(default_factory=list)
    tokens: int = 0
    activations: int = 0


@dataclass
class PlanResult:
    config_path: str
    budget_bytes: int
    predicted_bytes: int
    min_bytes: int  # every unit in its cheapest format
    max_bytes: int  # every unit in its best format
    formats: list[str]  # best first
    by_format: dict  # family -> MemoryStats bucket dict (what mixq inspect prints)
    token_share: dict[str, float]  # format -> share of routed tokens landing on experts in it
    units: dict[str, dict[str, int]]  # kind -> {format: count}
    assignment: dict[str, str] = field(default_factory=dict)  # tensor -> precision (units only)


def find_units(plan: LoadPlan) -> list[Unit]:
    units: dict[tuple, Unit] = {}
    for name in plan.tensors:
        for kind, rx in _UNIT_RX:
            m = rx.match(name)
            if m:
                e = int(m.group("expert")) if kind == "expert" else None
                u = units.setdefault((kind, int(m.group("layer")), e), Unit(kind, int(m.group("layer")), e))
                u.tensors.append(name)
                break
    return list(units.values())


def _format_list(mp, base_name: str, formats: list[str] | None) -> list[str]:
    if formats is None:
        return [base_name] + [_PRECISION_OF_KEY[k] for k in PATH_KEYS if k != "fp16_path" and getattr(mp, k)]
    for f in formats:
        if f not in PRECISIONS:
            raise ConfigError(f"--formats: unknown precision {f!r}; expected one of {', '.join(PRECISIONS)}")
        mp.path_key_for(f)  # ConfigError naming the missing path flag
    if len({mp.path_key_for(f) for f in formats}) != len(formats):
        raise ConfigError(f"--formats {','.join(formats)}: two of them read the same checkpoint")
    return list(formats)


def make_plan(stats: list[dict], paths: dict[str, str], budget_bytes: int, out_path: str | os.PathLike,
              formats: list[str] | None = None, sections: dict | None = None) -> PlanResult:
    """Write a mixed-precision YAML to `out_path` that fits `budget_bytes` of weights.

    stats: exported expert stats documents (summed); paths: path key -> checkpoint dir
    (fp16_path = the base); formats: precisions to choose from (default: the base and one
    per path given); sections: `inference`/`server` sections copied into the file.
    """
    if not stats:
        raise ConfigError("plan: give at least one --stats file")
    table = ExpertTable.from_doc(stats[0])
    for d in stats[1:]:
        table = table.merged(ExpertTable.from_doc(d))
    src = MixedPrecisionConfig.from_dict({"mixed_precision": dict(paths)}, source="<plan paths>")
    mp = src.mixed_precision
    base_plan = build_plan(src)
    base_dtype = next(iter(base_plan.tensors.values())).spec.family
    formats = _format_list(mp, "bf16" if base_dtype == "bf16" else "fp16", formats)
    if len(formats) < 2:
        raise ConfigError("plan: only one format to choose from; give quantized checkpoints with --fp8-path, "
                          "--int4-path, ... (or a --mixed-precision-config that names them)")
    units = find_units(base_plan)
    _attach_stats(units, table, base_plan)

    # bytes of every unit in every format, from a plan mapping all of them to that format
    unit_names = [n for u in units for n in u.tensors]
    cost: dict[str, dict[int, int]] = {}
    for f in formats:
        cat = base_plan.catalogs[mp.path_key_for(f)]
        present = {n: f for n in unit_names if n in cat.entries}
        trial = build_plan(MixedPrecisionConfig.from_dict({"mixed_precision": {**mp.paths(), "weight_mapping": present}},
                                                          source=f"<plan: every unit in {f}>"))
        cost[f] = {i: sum(trial.tensors[n].nbytes for n in u.tensors) for i, u in enumerate(units)
                   if all(n in present for n in u.tensors)}
    numel = {i: sum(base_plan.tensors[n].numel for n in u.tensors) for i, u in enumerate(units)}
    density = {f: sum(c.values()) / max(1, sum(numel[i] for i in c)) for f, c in cost.items()}
    formats.sort(key=lambda f: -density[f])  # best (most bytes per weight) first; stable for ties

    in_units = set(unit_names)
    fixed = sum(t.nbytes for n, t in base_plan.tensors.items() if n not in in_units)
    avail = {i: [f for f in formats if i in cost[f]] for i in range(len(units))}
    assign = {i: avail[i][-1] for i in range(len(units))}
    total = fixed + sum(cost[assign[i]][i] for i in assign)
    max_bytes = fixed + sum(cost[avail[i][0]][i] for i in assign)
    if total > budget_bytes:
        raise ConfigError(f"the budget ({budget_bytes} bytes) is below the smallest this model can take with "
                          f"--formats {','.join(formats)}: {total} bytes ({total / 2**30:.6g} GiB) of weights")
    min_bytes = total
    cap = 0  # experts: the best format index still allowed (never above a hotter expert's)
    for i in _priority(units):
        u = units[i]
        for rank, f in enumerate(formats):
            if f not in avail[i] or (u.kind == "expert" and rank < cap):
                continue
            extra = cost[f][i] - cost[assign[i]][i]
            if total + extra <= budget_bytes:
                assign[i], total = f, total + extra
                break
        if u.kind == "expert":
            cap = max(cap, formats.index(assign[i]))

    mapping = _compact_mapping(units, assign, base_plan, mp, formats[0] if formats[0] in ("fp16", "bf16") else
                               ("bf16" if base_dtype == "bf16" else "fp16"))
    used_keys = {"fp16_path"} | {mp.path_key_for(f) for f in set(assign.values())}
    doc = {"mixed_precision": {**{k: v for k, v in mp.paths().items() if k in used_keys}, "weight_mapping": mapping},
           **(sections or {})}
    share = _token_share(units, assign, formats)
    header = (f"# written by `mixq plan`: weights {total / 2**30:.4f} GiB predicted for a budget of "
              f"{budget_bytes / 2**30:.4f} GiB\n# share of routed expert tokens by format: "
              + ", ".join(f"{f} {100 * s:.1f}%" for f, s in share.items()) + "\n")
    try:
        Path(out_path).write_text(header + yaml.safe_dump(doc, sort_keys=False, width=4096))
    except OSError as e:
        raise ConfigError(f"-o {out_path}: cannot write: {e.strerror}") from None

    final = build_plan(MixedPrecisionConfig.from_yaml(out_path))
    stats_final = MemoryStats.from_plan(final)
    if stats_final.total.bytes != total:
        raise RuntimeError(f"plan: predicted {total} bytes but {out_path} holds {stats_final.total.bytes}")
    kinds: dict[str, dict[str, int]] = {}
    for i, u in enumerate(units):
        kinds.setdefault(u.kind, Counter())[assign[i]] += 1
    return PlanResult(str(out_path), budget_bytes, total, min_bytes, max_bytes, formats,
                      stats_final.as_dict()["by_format"], share, {k: dict(v) for k, v in kinds.items()},
                      {n: assign[i] for i, u in enumerate(units) for n in u.tensors})


def _attach_stats(units: list[Unit], table: ExpertTable, plan: LoadPlan) -> None:
    experts: dict[int, int] = {}
    for u in units:
        if u.kind == "expert":
            experts[u.layer] = max(experts.get(u.layer, 0), u.expert + 1)
    for lid in table.layer_ids:
        if lid not in experts:
            raise ConfigError(f"the stats have MoE layer {lid} but {plan.base.path} has routed experts only in layers "
                              f"{', '.join(map(str, sorted(experts))) or '(none)'}")
        used = [e for e in range(table.num_experts) if table.tokens[table.row(lid), e] > 0]
        if used and used[-1] >= experts[lid]:
            raise ConfigError(f"the stats route tokens to expert {used[-1]} of layer {lid} but {plan.base.path} "
                              f"has {experts[lid]} experts there")
    if int(table.tokens.sum()) == 0:
        raise ConfigError("the stats hold no routed token: record some traffic first (--enable-expert-tracking)")
    for u in units:
        if u.kind == "expert" and u.layer in table.layer_ids and u.expert < table.num_experts:
            r = table.row(u.layer)
            u.tokens, u.activations = int(table.tokens[r, u.expert]), int(table.activations[r, u.expert])


def _priority(units: list[Unit]) -> list[int]:
    dense = [i for i, u in enumerate(units) if u.kind != "expert"]
    dense.sort(key=lambda i: (KINDS.index(units[i].kind), units[i].layer))
    experts = [i for i, u in enumerate(units) if u.kind == "expert"]
    experts.sort(key=lambda i: (-units[i].tokens, -units[i].activations, units[i].layer, units[i].expert))
    return dense + experts


def _token_share(units, assign, formats) -> dict[str, float]:
    total = sum(u.tokens for u in units if u.kind == "expert")
    share = {f: 0.0 for f in formats}
    for i, u in enumerate(units):
        if u.kind == "expert" and total:
            share[assign[i]] += u.tokens / total
    return share


def _glob(u: Unit, layer: str, expert: str | None = None) -> str:
    """The unit's tensors as one glob, with its layer (and expert) number replaced."""
    names = u.tensors
    cp = os.path.commonprefix(names)
    cp = cp[: cp.rfind(".") + 1]
    cs = os.path.commonprefix([n[::-1] for n in names])[::-1]
    cs = cs[min((cs.find(c) for c in "._" if c in cs), default=len(cs)):]
    cp = re.sub(r"\.layers\.\d+\.", f".layers.{layer}.", cp)
    if expert is not None:
        cp = re.sub(r"\.experts\.\d+\.$", f".experts.{expert}.", cp)
    return f"{cp}*{cs}"


def _compact_mapping(units, assign, plan: LoadPlan, mp, base_precision: str) -> dict[str, str]:
    """Few rules: per kind, a glob for its most common format; per layer, the exceptions
    (one regex per layer and format for experts). Checked by resolving every tensor; any
    tensor the rules get wrong gets an exact entry (exact names beat patterns)."""
    mapping: dict[str, str] = {}
    for kind in KINDS:
        idx = [i for i, u in enumerate(units) if u.kind == kind]
        if not idx:
            continue
        default = Counter(assign[i] for i in idx).most_common(1)[0][0]
        mapping[_glob(units[idx[0]], "*", "*" if kind == "expert" else None)] = default
        if kind != "expert":
            for i in idx:
                if assign[i] != default:
                    mapping[_glob(units[i], str(units[i].layer))] = assign[i]
            continue
        groups: dict[tuple[int, str], list[Unit]] = {}
        for i in idx:
            if assign[i] != default:
                groups.setdefault((units[i].layer, assign[i]), []).append(units[i])
        for (_, f), us in sorted(groups.items()):
            g = _glob(us[0], str(us[0].layer), "\0")
            head, tail = g.split("\0")
            alts = "|".join(str(u.expert) for u in sorted(us, key=lambda u: u.expert))
            alts = f"(?:{alts})" if len(us) > 1 else alts
            mapping["re:" + re.escape(head) + alts + re.escape(tail).replace(r"\*", ".*")] = f

    desired = {n: base_precision for n in plan.tensors}
    for i, u in enumerate(units):
        for n in u.tensors:
            desired[n] = assign[i]
    try:
        got = PrecisionResolver(mapping).resolve_all(list(plan.tensors))
        wrong = [n for n, r in got.items() if mp.path_key_for(r.precision) != mp.path_key_for(desired[n])]
    except ConfigError:  # rules that tie: fall back to exact names
        mapping = {}
        wrong = [n for n, p in desired.items() if p != base_precision]
    for n in wrong:
        mapping[n] = desired[n]
    got = PrecisionResolver(mapping).resolve_all(list(plan.tensors))
    bad = [n for n, r in got.items() if mp.path_key_for(r.precision) != mp.path_key_for(desired[n])]
    if bad:
        raise RuntimeError(f"plan: the written mapping resolves {bad[0]} to {got[bad[0]].precision}, "
                           f"not {desired[bad[0]]}")
    return mapping


def render_plan(r: PlanResult) -> str:
    """The summary `mixq plan` prints."""
    from mixq.inspect_plan import _fmt_bytes as size

    lines = [f"wrote {r.config_path}",
             f"  weights: {size(r.predicted_bytes)} predicted ({r.predicted_bytes} bytes) for a budget of "
             f"{size(r.budget_bytes)}; everything {r.formats[-1]}: {size(r.min_bytes)}, "
             f"everything {r.formats[0]}: {size(r.max_bytes)}",
             "  by format: " + ", ".join(f"{fam} {size(b['memory_mb'] * 2**20)} ({b['tensors']} tensors)"
                                         for fam, b in r.by_format.items())]
    for kind in KINDS:
        if kind in r.units:
            n = sum(r.units[kind].values())
            lines.append(f"  {_KIND_NAMES[kind]}: " + ", ".join(f"{f} {r.units[kind].get(f, 0)}/{n}" for f in r.formats
                                                   if r.units[kind].get(f)))
    lines.append("  routed expert tokens on: " + ", ".join(f"{f} {100 * s:.1f}%" for f, s in r.token_share.items()))
    lines.append(f"  check: mixq inspect --mixed-precision-config {r.config_path}")
    return "\n".join(lines)
