"""`mixq inspect`: what a mixed-precision config would load, from headers only."""

from __future__ import annotations

import json
from itertools import groupby

from mixq.formats.plan import LoadPlan, layer_of
from mixq.tracking.memory import MB, MemoryStats, kv_cache_report


def plan_report(plan: LoadPlan, parallel=None) -> dict:
    """A JSON-able report: every tensor, totals per format and layer, warnings; with a
    ParallelConfig, each rank's predicted weight bytes ("ranks", "layout"), after the
    layout is checked against the plan (ConfigError naming the tensor that cannot split)."""
    stats = MemoryStats.from_plan(plan).as_dict()
    kv = kv_cache_report(plan.model_config, parallel.tp_size if parallel is not None else 1)
    ranks = layout = None
    if parallel is not None:
        from mixq.distributed.layout import ShardLayout
        from mixq.distributed.report import format_layout
        from mixq.models.config import ModelConfig

        shard_layout = ShardLayout(ModelConfig.from_hf(plan.model_config), parallel)
        shard_layout.check(plan)
        ranks = shard_layout.rank_bytes(plan)
        layout = format_layout(shard_layout, ranks, measured=False)
    return {
        "base": str(plan.base.path),
        "sources": {k: str(c.path) for k, c in plan.catalogs.items()},
        "tensors": [
            {
                "name": t.name,
                "layer": layer_of(t.name),
                "precision": t.precision,
                "rule": t.rule,
                "source": t.path_key,
                "file": t.file,
                "format": t.spec.describe(),
                "family": t.spec.family,
                "shape": list(t.entry.shape),
                "bytes": t.nbytes,
                "bits_per_weight": round(8 * t.nbytes / t.numel, 4) if t.numel else 0.0,
                "smoothing_compensated": t.name in plan.input_scales,
            }
            for t in plan.tensors.values()
        ],
        "totals": stats,
        "kv_cache": kv,
        "warnings": list(plan.warnings),
        **({"ranks": ranks, "layout": layout} if ranks is not None else {}),
    }


def _fmt_bytes(n: float) -> str:
    for unit, div in (("GiB", 1024**3), ("MiB", MB), ("KiB", 1024)):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{int(n)} B"


def render_text(report: dict) -> str:
    """Human-readable tables: per layer, each tensor; then totals per format."""
    lines = [f"base: {report['base']}"]
    for key, path in report["sources"].items():
        if key != "fp16_path":
            lines.append(f"{key}: {path}")
    rows = report["tensors"]
    width = max((len(r["name"]) for r in rows), default=10)
    for layer, group in groupby(rows, key=lambda r: r["layer"]):
        lines.append("")
        lines.append(f"[layer {layer}]" if layer.isdigit() else f"[{layer}]")
        for r in group:
            lines.append(
                f"  {r['name']:<{width}}  {r['precision']:<9} {r['format']:<34} "
                f"{_fmt_bytes(r['bytes']):>11} {r['bits_per_weight']:>6.2f} bpw  {r['source']}"
                f"{'  *' if r['smoothing_compensated'] else ''}"
            )
    t = report["totals"]
    lines += ["", "totals by format:"]
    for fam, b in t["by_format"].items():
        lines.append(
            f"  {fam:<6} {b['tensors']:>6} tensors  {_fmt_bytes(b['memory_mb'] * MB):>11}"
            f" {16 * b['memory_mb'] / b['bf16_memory_mb'] if b['bf16_memory_mb'] else 0:>6.2f} bpw"
            f"  (bf16: {_fmt_bytes(b['bf16_memory_mb'] * MB)})"
        )
    lines.append(
        f"  total  {t['num_tensors']:>6} tensors  {_fmt_bytes(t['memory_mb'] * MB):>11}"
        f"  (bf16: {_fmt_bytes(t['bf16_memory_mb'] * MB)}; saved {_fmt_bytes(t['memory_saved_mb'] * MB)},"
        f" compression {t['compression_ratio']:.2f}x)"
    )
    kv = report["kv_cache"]
    per = kv["bytes_per_token"]
    rank = " per rank" if kv["tp_size"] > 1 else ""
    lines += ["", f"KV cache per token{rank} ({kv['layers']} layers x K,V x {kv['kv_heads']} KV heads x "
              f"{kv['head_dim']}): bf16 {_fmt_bytes(per['bfloat16'])}, fp8 (--kv-cache-dtype fp8_e4m3|fp8_e5m2) "
              f"{_fmt_bytes(per['fp8_e4m3'])}; at 8k tokens: {_fmt_bytes(8192 * per['bfloat16'])} vs "
              f"{_fmt_bytes(8192 * per['fp8_e4m3'])}"]
    if any(r["smoothing_compensated"] for r in rows):
        lines += ["", "* input rescaled per channel: its checkpoint smoothed the norm feeding it "
                  "differently (AWQ/SmoothQuant); see docs/formats.md"]
    if "layout" in report:
        lines += ["", report["layout"]]
    if report["warnings"]:
        lines += ["", "warnings:"] + [f"  - {w}" for w in report["warnings"]]
    return "\n".join(lines)


def render_json(report: dict) -> str:
    return json.dumps(report, indent=2)
