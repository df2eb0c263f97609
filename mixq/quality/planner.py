"""`mixq plan --measure`: the mix with the least summed estimated loss under a byte budget.

Each group (a layer's attention, a dense MLP, a shared expert, a routed expert, the LM
head; see mixq.quality.units) offers every combination of its units' candidate formats
that a load plan accepts (a smoothed pair from one source); an option's bytes are its
units' bytes and its loss the sum of their measured losses (a smoothed pair's measured
together). The multiple-choice knapsack (mixq.quality.knapsack) picks one option per
group with the fixed bytes (embeddings, norms, routers: always the base) plus the options'
bytes within the budget. Bytes come from headers, so the YAML it writes loads to exactly
the predicted bytes, which is what `mixq inspect` reports (checked before writing)."""

from __future__ import annotations

import itertools
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from mixq.config.resolve import PrecisionResolver
from mixq.config.schema import MixedPrecisionConfig
from mixq.errors import ConfigError, MixqError
from mixq.formats.plan import build_plan
from mixq.quality.knapsack import BudgetTooSmall, Option, solve
from mixq.quality.units import Unit, UnitSpace
from mixq.quality.verify import Contender, VerifySettings
from mixq.quality.verify import best as verify_best
from mixq.quality.verify import score as verify_score
from mixq.tracking.memory import MemoryStats


@dataclass
class MeasuredPlan:
    config_path: str
    budget_bytes: int
    predicted_bytes: int
    inspect_bytes: int  # what the written config loads to (headers): equals predicted_bytes
    predicted_loss: float
    bits_per_weight: float
    estimator: str
    solver: str
    min_bytes: int
    max_bytes: int
    by_format: dict  # family -> MemoryStats bucket dict
    units: dict[str, dict[str, int]]  # kind -> {precision: count}
    assignment: dict[str, str] = field(default_factory=dict)  # unit id -> precision
    written: str = "plan"  # the contender written: "plan", "uniform <format>" or "runner-up <i>"
    verification: dict | None = None  # mixq.quality.verify.score's record (None: not verified)


def read_measure(path: str | os.PathLike) -> dict:
    """A measure.json document; a file that is not one is a one-line error."""
    import json

    try:
        doc = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise MixqError(f"--measure {path}: no such file") from None
    except (OSError, ValueError) as e:
        raise MixqError(f"--measure {path}: not a measure file ({e})") from None
    if not isinstance(doc, dict) or doc.get("format_version") != 1 or "entries" not in doc or "sources" not in doc:
        raise MixqError(f"--measure {path}: not a measure file written by `mixq measure` (format_version 1)")
    return doc


def sources_for(doc: dict, given: dict[str, str]) -> dict[str, str]:
    """The checkpoint paths to plan with: the measured ones, overridden by `given`."""
    paths = {s["path_key"]: s["path"] for s in doc["sources"].values()}
    for k, v in given.items():
        paths[k] = str(Path(v).resolve())
    return paths


def check_base(doc: dict, base_path: str, where: str) -> None:
    """Refuse a measure file made on another model (before reading the candidates)."""
    from mixq.formats.registry import CheckpointCatalog
    from mixq.quality.units import fingerprint

    cat = CheckpointCatalog(base_path)
    if fingerprint(cat, list(cat.entries)) != doc["model"]["fingerprint"]:
        raise MixqError(f"{where} was measured on another model: its base {doc['model']['base']} is not "
                        f"{base_path} (tensor names, shapes or dtypes differ)")


def check_space(doc: dict, space: UnitSpace, where: str) -> None:
    """Refuse a measure file made on another model or other checkpoints."""
    fps = space.fingerprints()
    base = doc["base_precision"]
    if fps.get(space.base_precision) != doc["model"]["fingerprint"]:
        raise MixqError(f"{where} was measured on another model: its base {doc['model']['base']} is not "
                        f"{space.paths['fp16_path']} (tensor names, shapes or dtypes differ)")
    for f, s in doc["sources"].items():
        if f == base:
            continue
        if f not in space.candidates:  # left out by --formats: its estimates are not used
            continue
        if fps[f] != s["fingerprint"]:
            raise MixqError(f"{where} was measured on other checkpoints: {f} at "
                            f"{space.paths[space.mp.path_key_for(f)]} does not store the units as {s['path']} did")
    if [u["id"] for u in doc["units"]] != [u.id for u in space.units]:
        raise MixqError(f"{where} lists other units than this model has")


def _losses(doc: dict, estimator: str, stats_freq: dict | None) -> dict[tuple[tuple[str, ...], str], float]:
    units = {u["id"]: u for u in doc["units"]}
    out = {}
    for e in doc["entries"]:
        if estimator not in e:
            raise MixqError(f"--estimator {estimator}: the measure file has no {estimator} estimates (it has "
                            f"{', '.join(doc['estimators'])})")
        loss = e[estimator]
        u = units[e["units"][0]]
        if stats_freq is not None and u["expert"] is not None:  # routing frequency from the stats given here
            f_new = stats_freq.get((u["layer"], u["expert"]), 0.0)
            if estimator == "proxy":
                loss = e["rel_error"] * f_new
            elif u["frequency"] > 0:
                loss = loss * f_new / u["frequency"]
        out[(tuple(e["units"]), e["precision"])] = loss
    return out


def group_options(space: UnitSpace, units: list[Unit], losses: dict) -> list[Option]:
    """Every valid combination of the group's unit formats, with bytes and loss."""
    base = space.base_precision
    ids = [u.id for u in units]
    opts = []
    for combo in itertools.product(*(list(space.bytes[u.id]) for u in units)):
        a = dict(zip(ids, combo))
        loss, ok, covered = 0.0, True, set()
        for x, y in space.links:
            if x in a and y in a and a[x] == a[y] and a[x] != base and space.smoothing[a[x]]:
                key = (tuple(i for i in ids if i in (x, y)), a[x])
                if key not in losses:
                    ok = False
                    break
                loss += losses[key]
                covered |= {x, y}
            elif x in a and y in a and a[x] != a[y] and (space.smoothing.get(a[x]) or space.smoothing.get(a[y])):
                ok = False  # a smoothed pair split across sources: the load plan refuses it
                break
        if not ok:
            continue
        for uid, f in a.items():
            if uid in covered or f == base:
                continue
            if ((uid,), f) not in losses:
                ok = False
                break
            loss += losses[((uid,), f)]
        if ok:
            opts.append(Option(sum(space.bytes[uid][f] for uid, f in a.items()), loss, a))
    return opts


def _template(u: Unit) -> tuple[str, str]:
    """(regex head with {L}/{E} placeholders for the layer/expert number, regex tail)
    matching the unit's tensors."""
    leaves = sorted(n.rsplit(".", 2)[-2] for n in u.tensors)
    prefix = u.tensors[0].rsplit(".", 2)[0] + "."  # "model.layers.3.mlp.experts.5."
    head = ""
    for part in re.split(r"(\.layers\.\d+\.|\.experts\.\d+\.)", prefix):
        if re.fullmatch(r"\.layers\.\d+\.", part):
            head += r"\.layers\.{L}\."
        elif re.fullmatch(r"\.experts\.\d+\.", part):
            head += r"\.experts\.{E}\."
        else:
            head += re.escape(part)
    tail = (f"(?:{'|'.join(leaves)})" if len(leaves) > 1 else leaves[0]) + r"\.weight"
    return head, tail


def compact_mapping(space: UnitSpace, assign: dict[str, str]) -> dict[str, str]:
    """Few rules: per unit kind a regex for its most common format, then per (kind, format)
    one regex over the layers (experts: per layer, over the experts) that differ; checked by
    resolving every tensor, exact names wherever the rules would be wrong."""
    from collections import Counter

    base = space.base_precision
    mapping: dict[str, str] = {}
    kinds: dict[str, list[Unit]] = {}
    for u in space.units:
        kinds.setdefault(u.kind, []).append(u)
    for kind, us in kinds.items():
        if kind == "lm_head":
            for n in us[0].tensors:
                mapping[n] = assign[us[0].id]
            continue
        head, tail = _template(us[0])
        default = Counter(assign[u.id] for u in us).most_common(1)[0][0]
        if default != base:
            mapping["re:" + head.replace("{L}", r"\d+").replace("{E}", r"\d+") + tail] = default
        groups: dict[tuple, list[Unit]] = {}
        for u in us:
            if assign[u.id] != default:
                groups.setdefault((assign[u.id], u.layer if u.expert is not None else None), []).append(u)
        for (f, layer), members in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] or -1)):
            if layer is None:
                alts = "|".join(str(u.layer) for u in members)
                key = head.replace("{L}", f"(?:{alts})" if len(members) > 1 else alts).replace("{E}", r"\d+")
            else:
                alts = "|".join(str(u.expert) for u in members)
                key = head.replace("{L}", str(layer)).replace("{E}", f"(?:{alts})" if len(members) > 1 else alts)
            mapping["re:" + key + tail] = f
    desired = {n: base for n in space.base_plan.tensors}
    for u in space.units:
        for n in u.tensors:
            desired[n] = assign[u.id]
    key_of = space.mp.path_key_for
    try:
        got = PrecisionResolver(mapping).resolve_all(list(space.base_plan.tensors))
        wrong = [n for n, r in got.items() if key_of(r.precision) != key_of(desired[n])]
    except ConfigError:  # rules that tie: exact names only
        mapping, wrong = {}, [n for n, p in desired.items() if p != base]
    for n in wrong:
        mapping[n] = desired[n]
    return mapping


def uniform_contenders(space: UnitSpace, options: list[list[Option]], fixed: int, budget: int) -> list[Contender]:
    """Every single format for every unit (a unit not offered it stays in the base) whose
    bytes fit the budget: what a user gets from one checkpoint alone."""
    base = space.base_precision
    out = []
    for f in [*space.candidates, base]:
        total, loss, assign = fixed, 0.0, {}
        for g in options:
            want = {uid: (f if f in space.bytes[uid] else base) for uid in g[0].label}
            opt = next((o for o in g if o.label == want), None)
            if opt is None:  # e.g. a smoothed pair that this format would split
                break
            total, loss = total + opt.bytes, loss + opt.loss
            assign.update(want)
        else:
            if total <= budget:
                out.append(Contender(f"uniform {f}", assign, total, loss))
    return out


def config_doc(space: UnitSpace, assign: dict[str, str], sections: dict | None = None) -> dict:
    """The config document of an assignment: the checkpoints it reads and a compact mapping."""
    mapping = compact_mapping(space, assign)
    used = {"fp16_path"} | {space.mp.path_key_for(f) for f in set(assign.values())}
    return {"mixed_precision": {**{k: v for k, v in space.mp.paths().items() if k in used},
                                "weight_mapping": mapping}, **(sections or {})}


def plan_from_measure(doc: dict, space: UnitSpace, budget_bytes: int, out_path: str | os.PathLike,
                      estimator: str | None = None, stats_freq: dict | None = None, sections: dict | None = None,
                      measure_path: str = "measure.json", verify: VerifySettings | None = None,
                      progress: bool | None = None) -> MeasuredPlan:
    """Solve the knapsack; with `verify`, score the plan, the uniform candidates that fit and
    a few runners-up on held-out calibration tokens (mixq.quality.verify) and keep the best;
    write its YAML (only once it checks out)."""
    estimator = estimator or ("exact" if "exact" in doc["estimators"] else "proxy")
    losses = _losses(doc, estimator, stats_freq)
    groups = list(space.groups().values())
    options = [group_options(space, us, losses) for us in groups]
    fixed = space.fixed_bytes()
    lo = fixed + sum(min(o.bytes for o in g) for g in options)
    hi = fixed + sum(max(o.bytes for o in g) for g in options)
    try:
        sol = solve(options, budget_bytes - fixed, alternatives=verify.neighbors if verify else 0)
    except BudgetTooSmall:
        raise MixqError(f"the budget ({budget_bytes} bytes, {budget_bytes / 2**30:.6g} GiB) is below the smallest "
                        f"mix these checkpoints allow: {lo} bytes ({lo / 2**30:.6g} GiB) with every unit in its "
                        "cheapest format") from None

    def contender(name: str, choice: list[int]) -> Contender:
        assign: dict[str, str] = {}
        for g, c in zip(options, choice):
            assign.update(g[c].label)
        return Contender(name, assign, fixed + sum(g[c].bytes for g, c in zip(options, choice)),
                         float(sum(g[c].loss for g, c in zip(options, choice))))

    plan = contender("plan", sol.choice)
    chosen, record = plan, None
    if verify is not None:
        contenders: list[Contender] = [plan]
        extra = [contender(f"runner-up {i + 1}", c) for i, c in enumerate(sol.alternatives)]
        for c in [*uniform_contenders(space, options, fixed, budget_bytes), *extra]:
            if all(c.assignment != d.assignment for d in contenders):
                contenders.append(c)
        record = verify_score(contenders, {c.name: config_doc(space, c.assignment) for c in contenders},
                              space.paths["fp16_path"], doc, f"--measure {measure_path}", verify, progress)
        chosen = verify_best(contenders, record)
        record["written"] = chosen.name
    assign, predicted = chosen.assignment, chosen.bytes
    params = sum(t.numel for t in space.base_plan.tensors.values())
    doc_out = config_doc(space, assign, sections)
    cal = doc["calibration"]
    header = (f"# written by `mixq plan --measure {measure_path}` ({estimator} estimates, {sol.method} knapsack)\n"
              f"# budget: {budget_bytes} bytes ({budget_bytes / 2**30:.4f} GiB, {8 * budget_bytes / params:.3f} "
              f"bits/weight)\n"
              f"# predicted weights: {predicted} bytes ({predicted / 2**30:.4f} GiB, {8 * predicted / params:.3f} "
              f"bits/weight), as mixq inspect counts them\n"
              f"# predicted loss: {chosen.estimated_loss:.6g} (sum of per-unit {estimator} estimates"
              + (", mean KLD in nats/token" if estimator == "exact" else ", relative output error x frequency")
              + f"; calibrated on {cal['tokens']} tokens of {cal['text']})\n"
              + _verify_header(record))
    out_path = Path(out_path)
    fd, tmp = tempfile.mkstemp(prefix=".plan-", suffix=".yaml", dir=out_path.parent if out_path.parent.is_dir()
                               else None)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(header + yaml.safe_dump(doc_out, sort_keys=False, width=4096))
        final = build_plan(MixedPrecisionConfig.from_yaml(tmp))
        got = MemoryStats.from_plan(final)
        if got.total.bytes != predicted:
            raise RuntimeError(f"plan: predicted {predicted} bytes but the written config holds {got.total.bytes}")
        try:
            os.replace(tmp, out_path)
        except OSError as e:
            raise MixqError(f"-o {out_path}: cannot write: {e.strerror}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    kinds: dict[str, dict[str, int]] = {}
    for u in space.units:
        kinds.setdefault(u.kind, {}).setdefault(assign[u.id], 0)
        kinds[u.kind][assign[u.id]] += 1
    return MeasuredPlan(str(out_path), budget_bytes, predicted, got.total.bytes, chosen.estimated_loss,
                        8 * predicted / params, estimator, sol.method, lo, hi, got.as_dict()["by_format"], kinds,
                        assign, chosen.name, record)


def _verify_lines(record: dict | None) -> list[str]:
    """What the verification scored and chose, for the YAML header and the summary."""
    if record is None:
        return ["not verified (--disable-verify)"]
    lines = [f"verified on calibration tokens {record['first_token']}..{record['last_token']} of {record['text']} (after the "
             f"measured ones; {record['tokens']} scored, windows of {record['window']}, {record['dtype']}): "
             f"mean KLD vs the base of each contender; wrote {record['written']}"]
    for name, c in record["contenders"].items():
        mark = "  <- written" if name == record["written"] else ""
        lines.append(f"  {name:<18} {c['kld_mean']:.6f}  ({c['bytes']} bytes, estimated {c['estimated_loss']:.6g})"
                     + mark)
    return lines


def _verify_header(record: dict | None) -> str:
    return "".join(f"# {line}\n" for line in _verify_lines(record))


def render(r: MeasuredPlan) -> str:
    """The summary `mixq plan --measure` prints."""
    from mixq.inspect_plan import _fmt_bytes as size

    lines = [f"wrote {r.config_path}",
             f"  budget {size(r.budget_bytes)} ({r.budget_bytes} bytes); possible: {size(r.min_bytes)} .. "
             f"{size(r.max_bytes)}",
             f"  predicted bytes {r.predicted_bytes} == mixq inspect {r.inspect_bytes} ({size(r.predicted_bytes)}, "
             f"{r.bits_per_weight:.3f} bits/weight)",
             f"  predicted loss {r.predicted_loss:.6g} ({r.estimator} estimates, {r.solver} knapsack)",
             *("  " + line for line in _verify_lines(r.verification)),
             "  by format: " + ", ".join(f"{fam} {size(b['memory_mb'] * 2**20)} ({b['tensors']} tensors)"
                                         for fam, b in r.by_format.items())]
    for kind, counts in r.units.items():
        n = sum(counts.values())
        lines.append(f"  {kind}: " + ", ".join(f"{f} {c}/{n}" for f, c in sorted(counts.items(), key=lambda x: -x[1])))
    lines.append(f"  check: mixq inspect --mixed-precision-config {r.config_path}")
    return "\n".join(lines)
