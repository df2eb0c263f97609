"""Turn a load plan into what can be written: one scheme per tensor, no smoothing left.

Three steps, all from headers plus a few small tensors (norm vectors, g_idx):
- `uniform_experts`: lift each MoE layer whose experts differ to one source checkpoint
  (the highest- or lowest-precision one among those it uses), for engines that run one
  scheme per MoE layer;
- `fold_smoothing`: a Linear whose AWQ/SmoothQuant source smoothed the norm feeding it
  is computed by mixq with a per-channel input scale; compressed-tensors has no such
  tensor, so the export takes that norm from the same source (exact when every Linear
  the norm feeds comes from it) or refuses, naming the norm;
- `resolve_schemes`: the compressed-tensors scheme of every tensor.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import replace

from mixq.errors import ConfigError
from mixq.export.convert import is_trivial_g_idx
from mixq.export.schemes import CtScheme, scheme_for
from mixq.formats.plan import LoadPlan, PlannedTensor
from mixq.formats.smoothing import check_pairs, feeding_norm, input_scales

_EXPERT = re.compile(r"^(?P<layer>.+\.experts)\.(?P<expert>\d+)\.(?P<proj>[^.]+)\.weight$")


def moe_layers(names) -> dict[str, list[str]]:
    """MoE layer prefix ('model.layers.3.mlp.experts') -> its experts' weight names."""
    out: dict[str, list[str]] = defaultdict(list)
    for name in names:
        m = _EXPERT.match(name)
        if m:
            out[m.group("layer")].append(name)
    return dict(out)


def _act_order(plan: LoadPlan, t: PlannedTensor) -> bool:
    """Whether a tensor's stored g_idx is non-trivial (read alone, K int32s)."""
    spec, entry = t.spec, t.entry
    if not spec.act_order:
        return False
    role = next((r for r in ("g_idx", "weight_g_idx") if r in entry.roles), None)
    if role is None:
        return False
    g_idx = plan.catalog(t).ckpt.read(entry.roles[role].tensor)
    return not is_trivial_g_idx(g_idx, entry.shape[1], spec.group_size)


def resolve_schemes(plan: LoadPlan, names=None) -> dict[str, CtScheme | None]:
    """name -> the scheme it is exported with (None: dense). Refuses, naming the tensor
    and its format, any tensor whose format has no compressed-tensors equivalent."""
    names = plan.tensors if names is None else names
    return {n: scheme_for(n, plan.tensors[n].spec, _act_order(plan, plan.tensors[n])) for n in names}


def scheme_label(s: CtScheme | None, family: str = "bf16") -> str:
    return family if s is None else s.describe()


def _candidate(plan: LoadPlan, names: list[str], path_key: str) -> tuple[tuple[int, int], list[PlannedTensor]] | None:
    """The layer's tensors all taken from one source: ((bits, bytes), planned) or None
    when that source lacks one of them."""
    cat = plan.catalogs[path_key]
    precision = next(t.precision for n in names if (t := plan.tensors[n]).path_key == path_key)
    out = []
    for n in names:
        e = cat.entries.get(n)
        if e is None or tuple(e.shape) != tuple(plan.tensors[n].entry.shape):
            return None
        out.append(PlannedTensor(n, precision, "--uniform-experts", path_key, e, cat.file_of(n)))
    bits = max(t.spec.bits for t in out)
    return (bits, sum(t.nbytes for t in out)), out


def uniform_experts(plan: LoadPlan, schemes: dict[str, CtScheme | None], mode: str) -> list[tuple[str, str, int]]:
    """Lift every MoE layer whose experts are in more than one scheme to a single source:
    mode "higher" takes the source of the most bits (then bytes) among those the layer
    uses, "lower" the fewest. Updates plan and schemes in place; returns
    [(layer, description, bytes change)]."""
    if mode not in ("higher", "lower"):
        raise ConfigError(f"--uniform-experts must be 'higher' or 'lower', got {mode!r}")
    changes = []
    for layer, names in moe_layers(plan.tensors).items():
        if len({schemes[n] for n in names}) == 1:
            continue
        options = {}
        for pk in sorted({plan.tensors[n].path_key for n in names}):
            if (c := _candidate(plan, names, pk)) is not None:
                options[pk] = c
        if not options:
            raise ConfigError(f"--uniform-experts: no single checkpoint of the mix holds every expert of {layer}")
        pick = (max if mode == "higher" else min)(options, key=lambda pk: (options[pk][0], pk))
        before, was = sum(plan.tensors[n].nbytes for n in names), census(plan, names, schemes)
        for t in options[pick][1]:
            plan.tensors[t.name] = t
        schemes.update(resolve_schemes(plan, names))
        after = sum(plan.tensors[n].nbytes for n in names)
        changes.append((layer, f"{was} -> {census(plan, names, schemes)} ({plan.tensors[names[0]].precision}, "
                        f"{mode})", after - before))
    if changes:  # sources changed: smoothing pairs and compensations follow them
        check_pairs(plan)
        plan.input_scales = input_scales(plan)
    return changes


def census(plan: LoadPlan, names, schemes) -> str:
    """'90 x pack-quantized int4 g128, 6 x bf16': how many of `names` are in each scheme."""
    counts: dict[str, int] = defaultdict(int)
    for n in names:
        counts[scheme_label(schemes[n], plan.tensors[n].spec.family)] += 1
    return ", ".join(f"{v} x {k}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))


def fold_smoothing(plan: LoadPlan) -> list[str]:
    """Replace per-Linear smoothing compensation by the source's own norm; returns notes.

    mixq feeds such a Linear x * (norm_source / norm_used). The export can only express
    this when every Linear fed by that norm comes from the same smoothed source: then
    the norm is written from that source, exactly as the source checkpoint has it."""
    if not plan.input_scales:
        return []
    consumers: dict[str, list[str]] = defaultdict(list)
    for name in plan.tensors:
        norm = feeding_norm(name)
        if norm is not None and norm in plan.tensors:
            consumers[norm].append(name)
    notes = []
    for norm in sorted({feeding_norm(n) for n in plan.input_scales}):
        users = consumers[norm]
        sources = {plan.tensors[u].path_key for u in users}
        if not all(u in plan.input_scales for u in users) or len(sources) != 1:
            desc = ", ".join(f"{u.rsplit('.', 2)[-2]} ({plan.tensors[u].precision})" for u in users)
            first = next(u for u in users if u in plan.input_scales)
            raise ConfigError(
                f"{norm} feeds {desc}: {plan.catalog(plan.tensors[first]).path} smoothed this norm into "
                f"{first.rsplit('.', 2)[-2]}, and compressed-tensors has no per-Linear input scale to "
                "compensate it, so all of them must come from that checkpoint together with the norm "
                f"(e.g. weight_mapping {norm!r}: {plan.tensors[first].precision!r} and the same for "
                "the others)"
            )
        pk = sources.pop()
        first = plan.tensors[users[0]]
        cat = plan.catalogs[pk]
        plan.tensors[norm] = replace(plan.tensors[norm], precision=first.precision, rule="export: smoothing",
                                     path_key=pk, entry=cat.entry(norm), file=cat.file_of(norm))
        for u in users:
            del plan.input_scales[u]
        notes.append(f"{norm}: taken from {cat.path} (its Linears' source smoothed it)")
    return notes
