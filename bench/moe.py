"""MoE benchmark: the fused per-format MoE against the bytes-of-active-experts roofline and
the per-expert reference loop, on Qwen3-30B-A3B layer shapes (hidden 2048, moe_intermediate
768, 128 experts, top-8).

Mixes (seeded assignment of experts to formats): "mixed" = 70% GPTQ int4 g128, 20% FP8
per-channel, 10% BF16; "int4" = all GPTQ int4 g128. Weights go through the real loading
path (checkpoint layout -> ExpertLinear.load -> process_weights_after_loading stacks them).

Per token count: the fused MoE in a CUDA graph (how decode runs) and eagerly, the reference
loop (each expert through its own method: wna16 / torch dequant / cuBLAS), the roofline =
bytes of the distinct experts the routing touches / measured copy bandwidth, and the error
of the fused output against a float64 loop over the routed experts' dequantized weights
(checked at every shape; weight-only, as the fused kernels compute every format: they
upcast FP8 / INT8 weights and never quantize the activations, where the CPU's per-expert
loop quantizes them per token for W8A8 experts). Median of CUDA-
event timings; the fused timings rotate over enough copies of the layer that no repeat is
served from L2.

    python bench/moe.py [--mix mixed,int4] [--tokens 1,2,...] [--out r.json]
                        [--config JSON] [--sweep] [--breakdown] [--smoke]

--cuda-int4 also times the all-INT4 layer on the compiled W4A16 GEMV grouped over experts
(mixq/kernels/moe_w4a16.py, CUDA with nvcc only; its own random experts of the same shapes
and bytes, checked against float64 at up to 4 tokens).

--config sets mixq.kernels.fused_moe.CONFIG_OVERRIDE (keys: bm, dispatch, combine, streams,
w13/w2/w13_int/w13_float/w2_int/w2_float: {bn, bk, split_k, warps, stages}); --sweep tunes
that dict per shape by coordinate descent and prints the best; --smoke runs tiny shapes on
the CPU under the Triton interpreter (checks the script, times nothing meaningful).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time

import torch

SMOKE = "--smoke" in sys.argv
if SMOKE:
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["MIXQ_TRITON_INTERPRET_METHODS"] = "1"

from mixq.formats.packing import pack_int32  # noqa: E402
from mixq.formats.registry import reader_for_layout  # noqa: E402
from mixq.formats.spec import QuantizedWeight, WeightSpec, dense_spec  # noqa: E402
from mixq.kernels import fused_moe as fm  # noqa: E402
from mixq.layers.moe import SparseMoE, compute_experts, dispatch, route  # noqa: E402

HIDDEN, INTER, EXPERTS, TOP_K, GROUP = (256, 128, 8, 2, 128) if SMOKE else (2048, 768, 128, 8, 128)
TOKENS = (1, 3) if SMOKE else (1, 2, 4, 8, 16, 32, 64, 256, 2048)
MIXES = {"mixed": (("gptq4", 0.7), ("fp8", 0.2), ("bf16", 0.1)), "int4": (("gptq4", 1.0),)}
DEV = torch.device("cpu" if SMOKE else "cuda")


def expert_weight(fmt: str, name: str, n: int, k: int, g: torch.Generator) -> QuantizedWeight:
    """A random weight [n, k] of dequantized std ~ 1/sqrt(k), stored as `fmt` checkpoints
    store it (GPTQ v1 symmetric int4 g128, compressed-tensors FP8 per-channel, BF16)."""
    if fmt == "bf16":
        w = (torch.randn(n, k, generator=g, device=DEV) / k**0.5).to(torch.bfloat16)
        return QuantizedWeight(name, dense_spec(torch.bfloat16), (n, k), {"weight": w})
    if fmt == "fp8":
        w = torch.randn(n, k, generator=g, device=DEV) / k**0.5
        s = w.abs().amax(1, keepdim=True) / 448
        spec = WeightSpec("fp8", 8, torch.float8_e4m3fn, "channel", activation="dynamic-token")
        return QuantizedWeight(name, spec, (n, k), {"weight": (w / s).to(torch.float8_e4m3fn),
                                                   "weight_scale": s.to(torch.bfloat16)})
    q = torch.randint(0, 16, (k, n), generator=g, device=DEV, dtype=torch.int32)
    scales = (torch.rand(k // GROUP, n, generator=g, device=DEV) * 0.1 + 0.2) / k**0.5
    spec = WeightSpec("gptq", 4, torch.int32, "group", group_size=GROUP, zero_offset=1)
    zeros = torch.full((k // GROUP, n), 7, dtype=torch.int32, device=DEV)  # v1 stores zero - 1
    return QuantizedWeight(name, spec, (n, k), {"qweight": pack_int32(q, 4, dim=0),
                                                "qzeros": pack_int32(zeros, 4, dim=1), "scales": scales.half()})


def build_layer(mix: str, seed: int = 0) -> tuple[SparseMoE, dict[int, int], dict[str, int], dict]:
    """The layer (stacked for the fused path), bytes held per expert, experts per format, and
    each expert's (gate, up, down) as stored (for the float64 reference)."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    order = torch.randperm(EXPERTS, generator=torch.Generator().manual_seed(seed)).tolist()
    fmt_of, start = {}, 0
    for i, (fmt, share) in enumerate(MIXES[mix]):
        count = EXPERTS - start if i == len(MIXES[mix]) - 1 else round(share * EXPERTS)
        fmt_of.update({e: fmt for e in order[start:start + count]})
        start += count
    moe = SparseMoE(HIDDEN, INTER, EXPERTS, TOP_K, renormalize=True).to(DEV)
    stored = {}
    for e in range(EXPERTS):
        stored[e] = tuple(expert_weight(fmt_of[e], f"experts.{e}.{proj}.weight", n, k, g) for proj, (n, k) in
                          zip(("gate_proj", "up_proj", "down_proj"), ((INTER, HIDDEN), (INTER, HIDDEN), (HIDDEN, INTER))))
        for proj, qw in zip(("gate_proj", "up_proj", "down_proj"), stored[e]):
            getattr(moe.experts[e], proj).load(qw, torch.bfloat16)
    moe.process_weights_after_loading()
    if moe.fused_plan is None:
        raise RuntimeError("the fused MoE path is not available on this device")
    held = {e: sum(getattr(ex, n).weight.nbytes for n in ex.names) for e, ex in enumerate(moe.experts)}
    counts = {f: sum(1 for v in fmt_of.values() if v == f) for f, _ in MIXES[mix]}
    return moe, held, counts, stored


def dense_reference(x: torch.Tensor, r, stored: dict) -> torch.Tensor:
    """float64 MoE over the routed experts' dequantized weights, activations unquantized."""
    x64, out = x.double(), torch.zeros(x.shape[0], HIDDEN, dtype=torch.float64, device=x.device)
    for e in r.topk_ids.unique().tolist():
        tok, slot = (r.topk_ids == e).nonzero(as_tuple=True)
        gate, up, down = (reader_for_layout(qw.spec.layout).dequantize(qw).double() for qw in stored[e])
        h = x64[tok]
        y = (torch.nn.functional.silu(h @ gate.t()) * (h @ up.t())) @ down.t()
        out.index_add_(0, tok, y * r.topk_weights[tok, slot, None].double())
    return out


def copy_plan(p: fm.MoEPlan) -> fm.MoEPlan:
    """The same plan over fresh copies of every stacked tensor (defeats L2 across reps)."""
    def op(o: fm.Operand) -> fm.Operand:
        c = {r: None if getattr(o, r) is None else getattr(o, r).clone() for r in ("w", "scales", "zeros", "perm",
                                                                                    "iscale")}
        return fm.Operand(o.key, o.n, o.k, **c, bits=o.bits, group=o.group, sbn=o.sbn, sbk=o.sbk)

    def launch(la: fm.Launch) -> fm.Launch:
        return fm.Launch(la.kind, la.mode, la.f0, la.f1, la.slots, tuple(op(o) for o in la.ops), la.experts)

    return fm.MoEPlan(p.fid_map, p.fids, p.hidden, p.inter, [launch(la) for la in p.w13], [launch(la) for la in p.w2])


def sync() -> None:
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def time_us(fn, reps: int = 30, warmup: int = 3) -> float:
    """Median microseconds of fn() (CUDA events; wall clock on the CPU)."""
    if SMOKE:  # the interpreter takes seconds per call: the smoke run checks, it does not time
        reps, warmup = 2, 0
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        if DEV.type == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e) * 1000)
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Bytes per second of a large device copy (read + write), the HBM roofline."""
    if DEV.type != "cuda":
        return 1e10
    x = torch.empty(2**30, dtype=torch.uint8, device=DEV)
    y = torch.empty_like(x)
    return 2 * x.numel() / (time_us(lambda: y.copy_(x), reps=20) * 1e-6)


def graph_us(calls: list, reps: int = 30) -> float:
    """Median µs per call of `calls` captured in one CUDA graph (each run once on a side
    stream first, so every kernel is compiled before capture)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    return time_us(graph.replay, reps=reps) / len(calls)


def l2_bytes() -> int:
    return getattr(torch.cuda.get_device_properties(DEV), "L2_cache_size", 64 * 2**20) if DEV.type == "cuda" else 0


class Case:
    """One (layer, token count): inputs, the plans to rotate over, timing helpers."""

    def __init__(self, moe: SparseMoE, plans: list[fm.MoEPlan], tokens: int, seed: int, stored: dict):
        g = torch.Generator(device=DEV).manual_seed(seed)
        self.moe, self.plans, self.stored = moe, plans, stored
        self.x = torch.randn(tokens, HIDDEN, generator=g, device=DEV).to(torch.bfloat16)
        self.r = route(torch.randn(tokens, EXPERTS, generator=g, device=DEV), TOP_K, True)
        self.i, self.ref = 0, None

    def fused_once(self) -> torch.Tensor:
        self.i = (self.i + 1) % len(self.plans)
        return fm.fused_moe(self.x, self.r.topk_ids, self.r.topk_weights, self.plans[self.i])

    def reference(self) -> torch.Tensor:
        return compute_experts(self.moe.experts, self.x, self.r, dispatch(self.r, EXPERTS))

    def error(self) -> float:
        """Relative error of the fused output against the float64 reference (made once)."""
        if self.ref is None:
            self.ref = dense_reference(self.x, self.r, self.stored)
        y = fm.fused_moe(self.x, self.r.topk_ids, self.r.topk_weights, self.plans[0])
        if y.isnan().any():
            return float("nan")
        return float((y.double() - self.ref).norm() / self.ref.norm())

    def graph_us(self, reps: int = 30) -> float:
        """Median µs per fused call replaying one graph that runs every plan once."""
        if DEV.type != "cuda":
            return time_us(self.fused_once, reps=reps)
        return graph_us([self.fused_once] * len(self.plans), reps)

    def launches(self) -> list[dict]:
        """The tiles the heuristic (or --config) picks for each launch of one call."""
        seen, real = [], fm.launch_gemm

        def record(launch, a, al, w, out, top_k, cfg):
            seen.append({"kind": launch.kind, "mode": launch.mode, "weight": str(launch.ops[0].w.dtype),
                         "experts": launch.experts, "direct": al.direct, "bm": al.bm, **cfg.__dict__})
            return real(launch, a, al, w, out, top_k, cfg)

        fm.launch_gemm = record
        try:
            self.fused_once()
        finally:
            fm.launch_gemm = real
        return seen


def kernel_us(case: Case) -> dict[str, float]:
    """Device time per call of each kernel name (torch.profiler over eager calls)."""
    from torch.profiler import ProfilerActivity, profile

    n = 2 * len(case.plans)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            case.fused_once()
        sync()
    out: dict[str, float] = {}
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if t:
            out[ev.key[:40]] = out.get(ev.key[:40], 0.0) + t / n
    return out


def sweep(case: Case, ok_err: float) -> tuple[dict, float]:
    """Coordinate descent over CONFIG_OVERRIDE for one shape; each candidate is timed in a
    graph and must match the reference. Returns (best override, its µs)."""
    pairs = case.x.shape[0] * TOP_K
    axes = [("dispatch", ["direct", "sorted"] if pairs <= 64 else ["sorted"]), ("streams", [True, False]),
            ("w13_int.bn", [16, 32, 64, 128]), ("w13_float.bn", [16, 32, 64]), ("w13.stages", [3, 4]),
            ("w13.warps", [4, 8]), ("w2_int.bn", [16, 32, 64, 128]), ("w2_float.bn", [16, 32, 64, 128]),
            ("w2.split_k", [1, 2, 3, 6]), ("w2.stages", [3, 4])] + ([("bm", [16, 32, 64])] if pairs > 64 else [])
    if SMOKE:
        axes = [(a, v[:2]) for a, v in axes[:3]]
    best: dict = {}
    fm.CONFIG_OVERRIDE = None
    best_us = case.graph_us()
    for axis, values in axes:
        for v in values:
            cand = json.loads(json.dumps(best))
            key, _, field = axis.partition(".")
            if field:
                cand.setdefault(key, {})[field] = v
            else:
                cand[key] = v
            fm.CONFIG_OVERRIDE = cand
            try:
                us = case.graph_us(reps=15)
            except ValueError as e:  # a tile the kernel refuses for this launch (check_config)
                print(f"    skip {axis}={v}: {e}")
                continue
            err = case.error()
            if us < best_us and err < ok_err:
                best, best_us = cand, us
    fm.CONFIG_OVERRIDE = None
    return best, best_us


def cuda_int4(tokens_list: list[int], bw: float, results: dict) -> None:
    """The all-INT4 layer on the grouped W4A16 GEMV, in a CUDA graph, against its active bytes."""
    from mixq.kernels.moe_w4a16 import ExpertStack, moe_layer, moe_reference, pack_experts

    g = torch.Generator().manual_seed(5)

    def stack(n: int, k: int) -> ExpertStack:
        q = torch.randint(0, 16, (EXPERTS, n, k), generator=g)
        s = (torch.rand(EXPERTS, n, k // GROUP, generator=g) * 0.1 + 0.2) / k**0.5
        st = pack_experts(q, s, None, GROUP, torch.bfloat16)
        return ExpertStack(st.qw.to(DEV), st.scales.to(DEV), None, GROUP, n, k)

    layers = [(stack(2 * INTER, HIDDEN), stack(HIDDEN, INTER))]
    per_expert = (layers[0][0].nbytes + layers[0][1].nbytes) / EXPERTS
    n_copies = max(2, min(8, math.ceil(3 * l2_bytes() / (per_expert * TOP_K)) + 1))
    for _ in range(n_copies - 1):
        layers.append(tuple(ExpertStack(s.qw.clone(), s.scales.clone(), None, GROUP, s.n, s.k) for s in layers[0]))
    print("\n| layer | tokens | graph µs | active MB | roofline µs | x roofline | error |")
    print("|---|---|---|---|---|---|---|")
    for tokens in tokens_list:
        gen = torch.Generator(device=DEV).manual_seed(tokens)
        x = torch.randn(tokens, HIDDEN, generator=gen, device=DEV).to(torch.bfloat16)
        r = route(torch.randn(tokens, EXPERTS, generator=gen, device=DEV), TOP_K, True)
        ids, w = r.topk_ids.to(torch.int32), r.topk_weights.float()
        err = float("nan")
        if tokens <= 4:
            y, ref = moe_layer(x, ids, w, *layers[0]), moe_reference(x, ids, w, *layers[0])
            err = float((y.double() - ref).norm() / ref.norm())
        us = graph_us([lambda la=la, x=x, ids=ids, w=w: moe_layer(x, ids, w, *la) for la in layers])
        active = per_expert * len(ids.unique())
        roof = active / bw * 1e6
        results.setdefault("cuda_int4", []).append({"tokens": tokens, "graph_us": us, "active_bytes": active,
                                                   "roofline_us": roof, "error": err})
        print(f"| cuda-w4a16 int4 | {tokens} | {us:.1f} | {active / 2**20:.1f} | {roof:.1f} | {us / roof:.2f} | "
              f"{err:.1e} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mix", default=",".join(MIXES))
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--config", help="JSON for mixq.kernels.fused_moe.CONFIG_OVERRIDE")
    ap.add_argument("--sweep", action="store_true", help="tune the override per shape (slow: compiles)")
    ap.add_argument("--breakdown", action="store_true", help="device time per kernel (torch.profiler)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU interpreter")
    ap.add_argument("--cuda-int4", action="store_true", help="also the all-INT4 layer on the compiled grouped GEMV")
    args = ap.parse_args()
    ok_err = 2e-2  # bf16: activations, intermediate and output rounded to 2**-9; fp32 sums
    bw = copy_bandwidth()
    device = torch.cuda.get_device_name(DEV) if DEV.type == "cuda" else platform.processor() or "cpu"
    print(f"# fused MoE, {device}, copy bandwidth {bw / 1e9:.0f} GB/s; hidden {HIDDEN}, inter {INTER}, "
          f"{EXPERTS} experts, top-{TOP_K}")
    results = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "device": device,
               "command": " ".join(sys.argv), "copy_bandwidth_GBps": bw / 1e9, "torch": torch.__version__,
               "rows": [], "sweep": []}
    base = json.loads(args.config) if args.config else None
    failures = 0
    print("\n| mix | tokens | fused graph µs | fused eager µs | reference µs | active MB | roofline µs "
          "| x roofline | % roofline | vs reference | error |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for mix in args.mix.split(","):
        moe, held, counts, stored = build_layer(mix)
        t0 = [int(t) for t in args.tokens.split(",")]
        # copies: the smallest active set, repeated, must overflow L2 several times
        smallest = min(held.values()) * TOP_K
        n_copies = max(2, min(8, math.ceil(3 * l2_bytes() / smallest) + 1)) if DEV.type == "cuda" else 1
        plans = [moe.fused_plan] + [copy_plan(moe.fused_plan) for _ in range(n_copies - 1)]
        results.setdefault("mixes", {})[mix] = {"experts_per_format": counts, "copies": n_copies,
                                                "groups": [len(moe.fused_plan.w13), len(moe.fused_plan.w2)]}
        for tokens in t0:
            case = Case(moe, plans, tokens, seed=tokens, stored=stored)
            fm.CONFIG_OVERRIDE = base
            err = case.error()
            graph, eager = case.graph_us(), time_us(case.fused_once)
            ref = time_us(case.reference, reps=10 if tokens < 1024 else 5)
            active = sum(held[e] for e in case.r.topk_ids.unique().tolist())
            roof = active / bw * 1e6
            failures += not err < ok_err
            row = {"mix": mix, "tokens": tokens, "fused_graph_us": graph, "fused_eager_us": eager,
                   "reference_us": ref, "active_bytes": active, "roofline_us": roof, "error": err,
                   "launches": case.launches(), "config": base}
            if args.breakdown and DEV.type == "cuda":
                row["kernel_us"] = kernel_us(case)
            results["rows"].append(row)
            print(f"| {mix} | {tokens} | {graph:.1f} | {eager:.1f} | {ref:.1f} | {active / 2**20:.1f} | {roof:.1f} "
                  f"| {graph / roof:.2f} | {100 * roof / graph:.0f}% | {ref / graph:.1f}x | "
                  f"{err:.1e}{'' if err < ok_err else ' FAIL'} |", flush=True)
            if args.sweep:
                best, us = sweep(case, ok_err)
                results["sweep"].append({"mix": mix, "tokens": tokens, "best": best, "us": us, "heuristic_us": graph,
                                         "x_roofline": us / roof})
                print(f"|   sweep | {tokens} | best {us:.1f} µs ({us / roof:.2f}x roofline): {json.dumps(best)} |",
                      flush=True)
        del moe, plans, case, stored
        if DEV.type == "cuda":
            torch.cuda.empty_cache()
    if args.cuda_int4 and DEV.type == "cuda":
        cuda_int4([int(t) for t in args.tokens.split(",")], bw, results)
    if args.breakdown:
        for row in results["rows"]:
            print(row["mix"], row["tokens"], {k: round(v, 1) for k, v in row.get("kernel_us", {}).items()})
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1, default=str)
    if failures:
        raise SystemExit(f"{failures} shape(s) where the fused output does not match the float64 reference")


if __name__ == "__main__":
    main()
