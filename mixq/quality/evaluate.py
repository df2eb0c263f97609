"""`mixq eval`: the scoreboard. Each config against the base (BF16) model on one text:
weight bytes (as `mixq inspect` counts them), bits per weight, perplexity, ΔPPL %, mean
and 99.9th-percentile KL divergence from the base, same-top-token %.

With a KV-cache dtype (`--kv-cache-dtype fp8_e4m3`, ...) every config runs with that cache
and the base (the reference row) with a bfloat16 one: each row then shows what the cache
costs on top of its weights; a config that is the base checkpoint itself shows the cache's
cost alone.

The base model runs first, once: its log-probabilities for every scored token go to a
temporary file (tokens x vocab float32, memory-mapped) that every config's KLD reads."""

from __future__ import annotations

import gc
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mixq.errors import MixqError
from mixq.quality.metrics import TextScore
from mixq.quality.session import Session, text_windows


@dataclass
class EvalTarget:
    """One row of the scoreboard: a mixed-precision YAML and/or a model directory."""

    name: str
    config: str | None = None
    model_path: str | None = None

    def plan(self):
        from mixq.engine.engine import EngineConfig, load_plan

        return load_plan(EngineConfig(model_path=self.model_path, mixed_precision_config=self.config))[0]


def plan_size(plan) -> tuple[int, int]:
    """(weight bytes, parameters) of a plan, exactly as `mixq inspect` totals them."""
    from mixq.tracking.memory import MemoryStats

    total = MemoryStats.from_plan(plan).total
    return total.bytes, sum(t.numel for t in plan.tensors.values())


def _assignment(plan) -> tuple:
    """What a plan computes with: each tensor's source checkpoint, format and rescaling."""
    return tuple((n, str(plan.catalogs[t.path_key].path), t.spec.describe(), n in plan.input_scales)
                 for n, t in plan.tensors.items())


def _no_bar(progress: bool | None) -> bool | None:
    return None if progress is None else not progress  # tqdm: None = only on a terminal


def _is_base(plan, base_path: Path) -> bool:
    """Every tensor read as stored from the base checkpoint, nothing rescaled."""
    return (Path(plan.base.path).resolve() == base_path and not plan.input_scales
            and all(t.path_key == "fp16_path" for t in plan.tensors.values()))


def evaluate(targets: list[EvalTarget], text: str, window: int = 512, max_tokens: int = 4096,
             base: str | None = None, device: str = "auto", dtype: str = "auto", progress: bool | None = None,
             text_name: str = "the text", kv_cache_dtype: str = "auto", skip: int = 0) -> dict[str, dict]:
    """name -> row for every target (see the module docstring), in order. `base`: the
    reference checkpoint (default: the first target's base checkpoint); a quantized base
    (a single quantized checkpoint evaluated alone) gets perplexity only. `kv_cache_dtype`:
    the configs' KV cache ("auto": the model dtype, the base's too); any other value runs
    the base with a bfloat16 KV cache. `skip`: tokens of the text left out before the first window."""
    from tqdm import tqdm

    if not targets:
        raise MixqError("eval: nothing to evaluate")
    names = [t.name for t in targets]
    if len(set(names)) != len(names):
        raise MixqError(f"eval: two configs are named {next(n for n in names if names.count(n) > 1)!r}; "
                        "name them NAME=PATH")
    plans = {t.name: t.plan() for t in targets}
    base_path = Path(base or plans[targets[0].name].base.path).resolve()
    if base is None:
        for t in targets:
            if Path(plans[t.name].base.path).resolve() != base_path:
                raise MixqError(f"eval: {t.name} is built on {plans[t.name].base.path}, not {base_path} like "
                                f"{targets[0].name}; a KL divergence compares against one base: give --base")
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="mixq-eval-") as tmp:
        base_kv = "auto" if kv_cache_dtype == "auto" else "bfloat16"
        sess = Session.load(str(base_path), None, device, dtype, window, base_kv)
        # every config computes in the base's dtype (a YAML's inference.dtype does not apply)
        dtype = str(sess.engine.dtype).removeprefix("torch.")
        base_is_dense = not any(t.spec.is_quantized for t in sess.engine.plan.tensors.values())
        windows = text_windows(sess.tokenizer, text, window, max_tokens, text_name, skip)
        n_pred = sum(len(w) - 1 for w in windows)
        store = None
        score = TextScore()
        for w in tqdm(windows, desc="base", unit="window", disable=_no_bar(progress), leave=False):
            logits = sess.logits(w)[:-1]
            logp = torch.log_softmax(logits.float(), -1)
            if store is None:
                store = np.lib.format.open_memmap(Path(tmp) / "base.npy", "w+", np.float32, (n_pred, logp.shape[1]))
                offset = 0
            store[offset : offset + logp.shape[0]] = logp.cpu().numpy()
            offset += logp.shape[0]
            score.add(logits, torch.tensor(w[1:]))
        base_row = score.summary()
        if base_is_dense:
            base_row.update(kld_mean=0.0, kld_p999=0.0, kld_max=0.0, same_top_pct=100.0)
        sess.close()
        del sess
        gc.collect()
        base_ppl = base_row["perplexity"]
        # the reference row first; with another KV cache every target (the base checkpoint too) is scored
        reference = None
        if kv_cache_dtype != base_kv or not any(_is_base(p, base_path) for p in plans.values()):
            reference = EvalTarget("base" if "base" not in plans else "base (reference)", None, str(base_path))
            targets = [reference, *targets]
            plans[reference.name] = reference.plan()
        seen: dict[tuple, dict] = {}  # the same assignment under two names is scored once
        for t in targets:
            plan = plans[t.name]
            nbytes, params = plan_size(plan)
            same = _assignment(plan)
            kv = base_kv if t is reference else kv_cache_dtype
            if _is_base(plan, base_path) and kv == base_kv:
                r = dict(base_row)
            elif (same, kv) in seen:
                r = {k: v for k, v in seen[(same, kv)].items() if k not in ("delta_ppl_pct",)}
            else:
                sess = Session.load(t.model_path, t.config, device, dtype, window, kv)
                score, offset = TextScore(), 0
                for w in tqdm(windows, desc=t.name, unit="window", disable=_no_bar(progress)):
                    logits = sess.logits(w)[:-1]
                    ref = torch.from_numpy(np.asarray(store[offset : offset + logits.shape[0]])) if base_is_dense else None
                    offset += logits.shape[0]
                    score.add(logits, torch.tensor(w[1:]), ref)
                r = score.summary()
                sess.close()
                del sess
                gc.collect()
            seen.setdefault((same, kv), dict(r))
            r["delta_ppl_pct"] = 100.0 * (r["perplexity"] / base_ppl - 1.0)
            rows[t.name] = {"name": t.name, "config": t.config, "model_path": t.model_path, "weight_bytes": nbytes,
                            "parameters": params, "bits_per_weight": 8.0 * nbytes / params, **r, "kv_cache_dtype": kv,
                            "window": window,
                            "text": text_name, "base": str(base_path)}
        del store
    return rows


def render_table(rows: dict[str, dict]) -> str:
    """The scoreboard as a fixed-width table."""
    from mixq.inspect_plan import _fmt_bytes

    head = f"{'config':<22} {'weights':>10} {'bits/w':>7} {'PPL':>9} {'ΔPPL %':>8} {'mean KLD':>9} " \
           f"{'KLD p99.9':>9} {'same top %':>10}"
    lines = [head, "-" * len(head)]

    def num(r, k, fmt):
        return format(r[k], fmt) if r.get(k) is not None else "-"

    for r in rows.values():
        lines.append(f"{r['name']:<22} {_fmt_bytes(r['weight_bytes']):>10} {r['bits_per_weight']:7.3f} "
                     f"{r['perplexity']:9.3f} {r['delta_ppl_pct']:+8.2f} {num(r, 'kld_mean', '9.5f'):>9} "
                     f"{num(r, 'kld_p999', '9.4f'):>9} {num(r, 'same_top_pct', '10.2f'):>10}")
    first = next(iter(rows.values()))
    lines.append(f"({first['tokens']} scored tokens of {first['text']}, windows of {first['window']}; "
                 f"KLD vs {first['base']}" + _kv_note(rows) + ")")
    return "\n".join(lines)


def _kv_note(rows: dict[str, dict]) -> str:
    kvs = {r.get("kv_cache_dtype", "auto") for r in rows.values()} - {"auto", "bfloat16"}
    return f" with a bfloat16 KV cache; the others with {', '.join(sorted(kvs))}" if kvs else ""


def plot_frontier(rows: list[dict], path: str, series: dict[str, str] | None = None, title: str | None = None) -> None:
    """Mean KLD (log scale) against bits per weight, one labelled point per row; rows of
    the same `series[name]` are joined by a line (e.g. the planned mixes). Needs matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MixqError("--plot needs matplotlib: pip install 'mixq[plot]'") from None
    series = series or {}
    fig, ax = plt.subplots(figsize=(8, 5.5))
    pts = [r for r in rows if r.get("kld_mean")]  # BF16 (KLD 0) has no place on a log axis
    lines: dict[str, list[dict]] = {}
    for r in pts:
        if r["name"] in series:
            lines.setdefault(series[r["name"]], []).append(r)
    for label, rs in lines.items():
        rs = sorted(rs, key=lambda r: r["bits_per_weight"])
        ax.plot([r["bits_per_weight"] for r in rs], [r["kld_mean"] for r in rs], "o-", label=label)
    for r in pts:
        if r["name"] not in series:
            ax.plot(r["bits_per_weight"], r["kld_mean"], "s", label=r["name"])
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (all weights, as mixq inspect counts bytes)")
    ax.set_ylabel("mean KL divergence from BF16 (nats/token)")
    ax.set_title(title or "quality per byte")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
