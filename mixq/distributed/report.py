"""The layout in words: which rank holds which layers, experts and formats, and bytes.
Rank 0 logs it after loading (measured); `mixq inspect --tp-size N` prints it from
headers (predicted)."""

from __future__ import annotations

from mixq.distributed.layout import ShardLayout


def _mib(n: float) -> str:
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{int(n)} B"


def layout_summary(layout: ShardLayout) -> str:
    mc, pc = layout.mc, layout.pc
    kv = mc.num_kv_heads
    kv_note = (f"{kv // pc.tp_size} KV head(s)" if pc.tp_size <= kv
               else f"1 KV head (each on {pc.tp_size // kv} ranks)")
    parts = [f"--tp-size {pc.tp_size}", f"{pc.nnodes} node(s)",
             f"each rank: all {mc.num_layers} layers, {mc.num_heads // pc.tp_size} attention head(s), {kv_note}, "
             f"1/{pc.tp_size} of each dense MLP and of the vocabulary"]
    if mc.num_experts:
        parts.insert(1, f"--ep-size {pc.ep_size} (moe tp {pc.moe_tp_size}, {pc.moe_dispatch})")
        share = "whole" if pc.moe_tp_size == 1 else f"1/{pc.moe_tp_size} of each"
        parts.append(f"{layout.experts_per_rank} of {mc.num_experts} experts per MoE layer ({share})")
    return "; ".join(parts)


def format_layout(layout: ShardLayout, ranks: list[dict], measured: bool = True) -> str:
    """ranks: [{"rank", "bytes", "by_format": {family: bytes}, "experts": [a, b] | None,
    "device"?}] as load_rank or ShardLayout.rank_bytes make them."""
    total = sum(r["bytes"] for r in ranks)
    head = "weights loaded per rank" if measured else "weights per rank (predicted from headers)"
    lines = [f"tensor-parallel layout: {layout_summary(layout)}", f"{head} (total {_mib(total)}):"]
    for r in ranks:
        fmts = ", ".join(f"{k} {_mib(v)}" for k, v in r["by_format"].items())
        experts = "" if r["experts"] is None else f"  experts {r['experts'][0]}-{r['experts'][1]}"
        device = f" {r['device']:<7}" if "device" in r else ""
        lines.append(f"  rank {r['rank']}{device} {_mib(r['bytes']):>12}  ({fmts}){experts}")
    return "\n".join(lines)
