"""`mixq measure`: what moving one unit from the base to each candidate format costs.

Two estimators, on the calibration text (never the evaluation text):

- exact: the mean KL divergence of the model's next-token distribution with only that unit
  swapped to the candidate, from the base's. Each swap recomputes the model from the
  unit's layer on (the earlier layers' outputs are kept), so a 135M model's few hundred
  swaps take minutes on a CPU; meant for small dense models.
- proxy: the unit's relative output error on the calibration activations,
  sum ||x W_c^T - x W^T||^2 / sum ||x W^T||^2 over its projections, with x the inputs the
  base model feeds it; computed in the same forward pass for every candidate at once. A
  routed expert's error is taken on the tokens routed to it and weighted by its routing
  frequency (tokens through it / tokens; from a tracking stats file when given, else
  counted on the calibration text); an expert the calibration text never reaches is
  measured on all tokens of its layer. For a smoothed pair (AWQ v->o, up->down) swapped
  together, the consumer's input is rescaled per channel by how the candidate producer's
  output relates to the base's (least squares), which is the smoothing scale.

Both run through the engine's own layers and kernels (`MixedPrecisionLinear.load`), so a
format's cost includes whatever its compute path does (activation quantization included).
The result, with each unit's bytes per candidate, goes to measure.json (format in
docs/quality.md); `mixq plan --measure` reads it."""

from __future__ import annotations

import gc
import hashlib
import json
import os
import time
from collections import defaultdict
from pathlib import Path

import torch

from mixq.errors import MixqError
from mixq.quality.metrics import spearman, token_kld
from mixq.quality.session import Session, text_windows
from mixq.quality.units import UnitSpace

FORMAT_VERSION = 1
ESTIMATORS = ("exact", "proxy")


def read_weight(plan, name: str, device):
    """One tensor of a plan as the loader yields it (with its smoothing input_scale)."""
    t = plan.tensors[name]
    qw = plan.catalog(t).read(name)
    scale = plan.input_scales.get(name)
    if scale is not None:
        qw.input_scale = scale
    return qw.to(device)


def entries_of(space: UnitSpace) -> list[dict]:
    """What to measure: one entry per (unit, candidate); a smoothed pair under a source that
    smooths pairs is one entry of both units."""
    out, seen = [], set()
    for u in space.units:
        for f in space.bytes[u.id]:
            if f == space.base_precision:
                continue
            partner = space.linked(u.id)
            if partner is not None and space.smoothing[f]:
                key = (tuple(sorted((u.id, partner))), f)
                if f in space.bytes.get(partner, {}) and key not in seen:
                    seen.add(key)
                    ids = [x.id for x in space.units if x.id in key[0]]
                    out.append({"units": ids, "precision": f})
                continue
            out.append({"units": [u.id], "precision": f})
    return out


class _Proxy:
    """Forward hooks on the unit projections that accumulate each candidate's output error."""

    def __init__(self, space: UnitSpace, sess: Session, dtype: torch.dtype, compute: bool = True):
        from mixq.layers.linear import MixedPrecisionLinear
        from mixq.layers.moe import SparseMoE

        self.space, self.dtype, self.device = space, dtype, sess.engine.device
        self.num = defaultdict(float)  # (tensor, precision, cold) -> summed squared error
        self.den = defaultdict(float)  # (tensor, cold) -> summed squared base output
        self.rows = defaultdict(int)  # tensor -> routed rows (not cold passes)
        self.cold = False
        self.ratio: dict[tuple[str, str], torch.Tensor] = {}  # (consumer, precision) -> [K] input rescale
        self.pairs = {}  # producer tensor -> consumer tensor, for smoothing candidates
        from mixq.formats.smoothing import linked_pairs

        shapes = {n: tuple(space.base_plan.tensors[n].entry.shape) for n in space.unit_of}
        for a, b in linked_pairs(shapes):
            self.pairs[a] = b
        self.consumers = set(self.pairs.values())
        # compute=False: only count the rows each projection sees (routing frequency)
        self.cands = {n: [f for f in space.bytes[u.id] if f != space.base_precision] if compute else []
                      for n, u in space.unit_of.items()}
        self.Linear = MixedPrecisionLinear
        modules = dict(sess.model.named_modules())
        self.handles = []
        for n in space.unit_of:
            mod = modules[n.removesuffix(".weight")]
            self.handles.append(mod.register_forward_hook(self._hook(n, mod)))
        # each expert module's first unit tensor (its gate), for the cold-expert pass
        self.gate_of = {id(m): f"{name}.{m.names[0]}.weight" for name, m in modules.items()
                        if isinstance(getattr(m, "names", None), tuple) and ".experts." in name}
        for m in modules.values():
            if isinstance(m, SparseMoE) and compute:
                self.handles.append(m.register_forward_hook(self._moe_hook))
        self.window_rows: dict[str, int] = {}

    def _scratch(self, name: str, f: str, like):
        lin = self.Linear(like.in_features, like.out_features)
        lin.bias = like.bias
        lin.load(read_weight(self.space.trials[f], name, self.device), self.dtype)
        return lin

    def _hook(self, name: str, mod):
        def hook(_m, args, out):
            x, y = args[0], out.float()
            cold = self.cold
            self.den[(name, cold)] += y.square().sum().item()
            if not cold:
                self.rows[name] += x.shape[0]
                self.window_rows[name] = self.window_rows.get(name, 0) + x.shape[0]
            for f in self.cands[name]:
                xin = x
                if name in self.consumers and self.space.smoothing[f]:
                    xin = x * self.ratio.pop((name, f)).to(x.dtype)
                yc = self._scratch(name, f, mod)(xin).float()
                self.num[(name, f, cold)] += (yc - y).square().sum().item()
                if name in self.pairs and self.space.smoothing[f]:
                    # how the candidate scales each output channel: the smoothing 1/s
                    r = (yc * y).sum(0) / y.square().sum(0).clamp_min(torch.finfo(torch.float32).tiny)
                    self.ratio[(self.pairs[name], f)] = r
        return hook

    def _moe_hook(self, moe, args, out):
        """Experts no token reached in this pass: run them on every token of the layer."""
        x = args[0]
        self.cold = True
        try:
            for ex in moe.experts:
                gate = self.gate_of.get(id(ex))
                if gate in self.space.unit_of and self.window_rows.get(gate, 0) == 0:
                    ex(x)
        finally:
            self.cold = False

    def start_window(self) -> None:
        self.window_rows = {}
        self.ratio.clear()

    def close(self) -> None:
        for h in self.handles:
            h.remove()

    def loss(self, tensors: list[str], f: str) -> tuple[float, bool]:
        """(relative output error, measured on all tokens because no token was routed)."""
        cold = all(self.den[(n, False)] == 0 for n in tensors)
        num = sum(self.num[(n, f, cold)] for n in tensors)
        den = sum(self.den[(n, cold)] for n in tensors)
        return (num / den if den > 0 else 0.0), cold


def _stats_frequency(stats: dict | None, space: UnitSpace, top_k: int) -> dict[tuple[int, int], float]:
    """(layer, expert) -> share of the layer's tokens routed to it, from a stats document."""
    if stats is None:
        return {}
    from mixq.tracking.expert_stats import ExpertTable

    table = ExpertTable.from_doc(stats)
    experts = {(u.layer, u.expert) for u in space.units if u.expert is not None}
    layers = {lyr for lyr, _ in experts}
    out = {}
    for lid in table.layer_ids:
        if lid not in layers:
            raise MixqError(f"--stats: the stats have MoE layer {lid} but the model has routed experts only in "
                            f"layers {', '.join(map(str, sorted(layers))) or '(none)'}")
        row = table.tokens[table.row(lid)]
        pairs = float(row.sum())
        for e in range(table.num_experts):
            if row[e] > 0 and (lid, e) not in experts:
                raise MixqError(f"--stats: the stats route tokens to expert {e} of layer {lid}, which the model "
                                "does not have")
            out[(lid, e)] = float(row[e]) * top_k / pairs if pairs else 0.0
    return out


def _settings_key(space: UnitSpace, text: str, window: int, max_tokens: int, dtype: str, device: str) -> str:
    blob = json.dumps([space.fingerprints(), hashlib.sha256(text.encode()).hexdigest(), window, max_tokens,
                       dtype, device])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _write_json(path: Path, doc: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, path)


def measure(space: UnitSpace, text: str, out_path: str | os.PathLike, text_name: str = "the text",
            window: int = 512, max_tokens: int = 512, estimators: tuple[str, ...] = ESTIMATORS,
            stats: dict | None = None, device: str = "auto", dtype: str = "auto", progress: bool | None = None,
            say=print) -> dict:
    """Measure every entry with the chosen estimators and write measure.json."""
    from tqdm import tqdm

    from mixq.layers.moe import ExpertLinear, SparseMoE

    bad = [e for e in estimators if e not in ESTIMATORS]
    if bad or not estimators:
        raise MixqError(f"--estimators: expected one or both of {', '.join(ESTIMATORS)}, got {','.join(estimators)}")
    out_path = Path(out_path)
    t0 = time.perf_counter()
    sess = Session.load(space.paths["fp16_path"], None, device, dtype, window)
    torch_dtype = sess.engine.dtype
    dtype_name = str(torch_dtype).removeprefix("torch.")
    model = sess.model
    for mod in model.modules():
        if isinstance(mod, SparseMoE) and mod.fused_plan is not None:
            mod.fused_plan = None  # swaps replace one expert: the per-expert path, each in its own format
    windows = text_windows(sess.tokenizer, text, window, max_tokens, text_name)
    top_k = getattr(model.config, "top_k", 0) or 1
    stats_freq = _stats_frequency(stats, space, top_k)
    entries = entries_of(space)
    units = {u.id: u for u in space.units}
    n_tokens = sum(len(w) - 1 for w in windows)  # scored (predicted) tokens
    n_rows = sum(len(w) for w in windows)  # tokens through every layer

    proxy = _Proxy(space, sess, torch_dtype, compute="proxy" in estimators)
    states, base_logp = [], []
    for w in tqdm(windows, desc="base pass", unit="window", disable=None if progress is None else not progress):
        proxy.start_window()
        st, logits = sess.capture(w)
        if "exact" in estimators:
            states.append(st)
            base_logp.append(torch.log_softmax(logits[:-1], -1))
        del logits
    proxy.close()

    key = _settings_key(space, text, window, max_tokens, dtype_name, sess.engine.device.type)
    partial = out_path.with_name(out_path.name + ".partial")
    done: dict[str, float] = {}
    if "exact" in estimators and partial.is_file():
        try:
            prev = json.loads(partial.read_text())
            if prev.get("key") == key:
                done = prev["exact"]
                say(f"resuming from {partial}: {len(done)} of {len(entries)} swaps already measured")
        except (OSError, ValueError, KeyError):
            done = {}
    if "exact" in estimators:
        modules = dict(model.named_modules())
        last_save = time.perf_counter()
        bar = tqdm(entries, desc="exact (one unit swapped)", unit="swap",
                   disable=None if progress is None else not progress)
        for e in bar:
            ekey = "+".join(e["units"]) + ":" + e["precision"]
            if ekey in done:
                continue
            names = [n for uid in e["units"] for n in units[uid].tensors]
            saved = {}
            for n in names:
                mod = modules[n.removesuffix(".weight")]
                saved[n] = (mod, mod.weight, mod.method, mod.input_scale)
                qw = read_weight(space.trials[e["precision"]], n, sess.engine.device)
                if isinstance(mod, ExpertLinear):
                    ExpertLinear.load(mod, qw, torch_dtype)
                    mod.prepare_alone()
                else:
                    mod.load(qw, torch_dtype)
            layers = [units[uid].layer for uid in e["units"]]
            first = len(model.model.layers) if None in layers else min(layers)
            total = 0.0
            for st, ref in zip(states, base_logp):
                logits = sess.resume(st, first)[:-1]
                total += token_kld(ref, torch.log_softmax(logits, -1)).sum().item()
            for mod, w_, m_, s_ in saved.values():
                mod.weight, mod.method, mod.input_scale = w_, m_, s_
            done[ekey] = total / n_tokens
            if time.perf_counter() - last_save > 30:
                _write_json(partial, {"key": key, "exact": done})
                last_save = time.perf_counter()

    doc_units = []
    for u in space.units:
        calib = proxy.rows[u.tensors[0]] / n_rows if u.expert is not None else 1.0
        d = {"id": u.id, "kind": u.kind, "layer": u.layer, "expert": u.expert, "group": u.group,
             "tensors": u.tensors, "frequency": calib if u.expert is not None else 1.0}
        if u.expert is not None and stats is not None:
            d["frequency_stats"] = stats_freq.get((u.layer, u.expert), 0.0)
        d["bytes"] = dict(space.bytes[u.id])
        doc_units.append(d)
    by_id = {d["id"]: d for d in doc_units}
    doc_entries = []
    for e in entries:
        names = [n for uid in e["units"] for n in units[uid].tensors]
        d = {"units": e["units"], "precision": e["precision"],
             "bytes": sum(space.bytes[uid][e["precision"]] for uid in e["units"])}
        if "exact" in estimators:
            d["exact"] = done["+".join(e["units"]) + ":" + e["precision"]]
        if "proxy" in estimators:
            rel, cold = proxy.loss(names, e["precision"])
            u0 = by_id[e["units"][0]]
            freq = u0.get("frequency_stats", u0["frequency"])
            d["rel_error"] = rel
            d["proxy"] = rel * freq
            if cold:
                d["proxy_on_all_tokens"] = True
        doc_entries.append(d)
    corr = None
    if set(estimators) == set(ESTIMATORS) and len(doc_entries) >= 2:
        corr = {"spearman": spearman([d["exact"] for d in doc_entries], [d["proxy"] for d in doc_entries]),
                "entries": len(doc_entries), "by_precision": {}}
        for f in space.candidates:
            sub = [d for d in doc_entries if d["precision"] == f]
            if len(sub) >= 2:
                corr["by_precision"][f] = spearman([d["exact"] for d in sub], [d["proxy"] for d in sub])
    fps = space.fingerprints()
    doc = {
        "format_version": FORMAT_VERSION,
        "model": {"base": str(Path(space.paths["fp16_path"]).resolve()), "architecture": model.config.architecture,
                  "parameters": sum(t.numel for t in space.base_plan.tensors.values()),
                  "fixed_bytes": space.fixed_bytes(), "fingerprint": fps[space.base_precision]},
        "sources": {f: {"path_key": space.mp.path_key_for(f),
                        "path": str(Path(space.paths[space.mp.path_key_for(f)]).resolve()),
                        "fingerprint": fps[f], "smooths_pairs": space.smoothing.get(f, False)}
                    for f in [space.base_precision, *space.candidates]},
        "base_precision": space.base_precision,
        "calibration": {"text": text_name, "sha256": hashlib.sha256(text.encode()).hexdigest(), "tokens": n_tokens,
                        "text_tokens": n_rows, "window": window, "dtype": dtype_name, "device": sess.engine.device.type},
        "estimators": list(estimators),
        "stats": stats is not None,
        "units": doc_units,
        "entries": doc_entries,
        "rank_correlation": corr,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    _write_json(out_path, doc)
    if partial.is_file():
        partial.unlink()
    sess.close()
    del sess, states, base_logp
    gc.collect()
    return doc
