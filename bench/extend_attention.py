"""Paged extend attention benchmark and GPU check: our kernel (one launch for a mixed step of
prefill chunks and decodes) against torch SDPA on the same tokens, on Llama-3-8B attention
(32 query heads, 8 KV heads, head dim 128, page 16, bf16).

Cases: one 2048-token prefill from empty; 4 x 512 from empty; a 512-token chunk after a
3584-token prefix; one 1024-token chunk (from empty) with 63 decodes at context 1000.

Columns, per case:
  extend        mixq.kernels.extend_attention on the paged cache (tile list built beforehand,
                as the engine does once per step), CUDA-graph timed (bench/timing.py)
  sdpa          the peer: F.scaled_dot_product_attention on contiguous K/V gathered from the
                cache beforehand (not timed), one call per group of same-shaped sequences
                (a batch): is_causal=True for a fresh prefill, the causal_lower_right bias
                for a chunk after a prefix (flash handles it), no mask for decodes; GQA by
                enable_gqa (flash only: SDPA is pinned to flash, so it is flash or an error;
                if flash refuses, K/V are expanded to H heads and any backend may run, and
                the row says so). CUDA-graph timed
  layer_torch   mixq's PagedAttention.forward with --attention-backend torch_native (the K/V
                write, then one SDPA call per sequence with a materialised mask): what the
                engine ran before this kernel; timed eagerly, as the engine runs such steps
  layer_triton  the same layer with the triton backend (this kernel), timed eagerly
TFLOP/s counts causal FLOPs: 4 * H * D * (sum over query rows of the keys each attends).
Every output is checked against the float64 reference (relative L2 and max abs error); a
mismatch exits non-zero.

    python bench/extend_attention.py [--out results.json] [--sweep] [--smoke]

--sweep also times (and checks) the kernel under several launch configs (CONFIG_OVERRIDE).
--smoke runs tiny shapes on the CPU under the Triton interpreter (checks the script and the
numbers; its timings mean nothing).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

SMOKE = "--smoke" in sys.argv
if SMOKE:  # before triton.jit decorates the kernels
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from timing import EAGER_FALLBACKS, eager_us, time_us  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from torch.nn.attention.bias import causal_lower_right  # noqa: E402

from mixq.kernels import extend_attention as ea  # noqa: E402
from mixq.layers.attention import PagedAttention  # noqa: E402
from mixq.layers.forward_batch import ForwardBatch  # noqa: E402

H, HKV, D, PAGE = (4, 2, 32, 16) if SMOKE else (32, 8, 128, 16)
DTYPE = torch.bfloat16
DEV = torch.device("cpu" if SMOKE else "cuda")
# (name, [(tokens already in the cache, new tokens)] per sequence)
CASES = [
    ("prefill 64", [(0, 64)]), ("2 x 32", [(0, 32)] * 2), ("16 after 48", [(48, 16)]),
    ("32 + 3 decodes @40", [(0, 32)] + [(39, 1)] * 3),
] if SMOKE else [
    ("prefill 2048", [(0, 2048)]), ("4 x 512", [(0, 512)] * 4), ("512 after 3584", [(3584, 512)]),
    ("1024 + 63 decodes @1000", [(0, 1024)] + [(999, 1)] * 63),
]
SWEEP = [ea.ExtendConfig(*c) for c in ((64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 2), (128, 64, 8, 3),
                                       (128, 128, 8, 2), (128, 32, 4, 2), (64, 32, 4, 2))]
# Relative L2 error vs float64: bf16 inputs are exact in the reference too; the kernel (and
# flash) round the probabilities to bf16 before p @ v (2^-8 relative per term, averaging
# down over the keys) and the output once to bf16 (2^-8). The kernel tests' budget.
TOL = 1.6e-2


def build(seqs, gen):
    """A cache holding every sequence's context on shuffled pages, its block tables and
    the step's q and metadata."""
    ctx = [a + n for a, n in seqs]
    need = [-(-c // PAGE) for c in ctx]
    nb = sum(need)
    k = torch.randn(nb, PAGE, HKV, D, device=DEV, dtype=DTYPE, generator=gen)
    v = torch.randn(nb, PAGE, HKV, D, device=DEV, dtype=DTYPE, generator=gen)
    order = torch.randperm(nb, device=DEV, generator=gen).to(torch.int32)
    tables = torch.zeros(len(seqs), max(need), dtype=torch.int32, device=DEV)
    at = 0
    for i, n in enumerate(need):
        tables[i, :n] = order[at:at + n]
        at += n
    qs = [0]
    for _, n in seqs:
        qs.append(qs[-1] + n)
    q = torch.randn(qs[-1], H, D, device=DEV, dtype=DTYPE, generator=gen)
    return q, k, v, tables, qs, ctx


def gathered(cache, tables, i, ctx):
    """[Hkv, ctx, D] contiguous: sequence i's keys (or values) in order."""
    blocks = tables[i, : -(-ctx // PAGE)].long()
    return cache[blocks].flatten(0, 1)[:ctx].transpose(0, 1).contiguous()


def sdpa_peer(q, k, v, tables, qs, ctx, seqs):
    """(fn, args, note): SDPA over groups of same-shaped sequences (see the docstring)."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, s in enumerate(seqs):
        groups.setdefault(s, []).append(i)
    calls = []  # (rows, q [B, H, n, D], k, v [B, Hkv, ctx, D], mask, is_causal)
    for (a, n), idx in groups.items():
        rows = torch.cat([torch.arange(qs[i], qs[i + 1], device=DEV) for i in idx])
        qg = torch.stack([q[qs[i]:qs[i + 1]].transpose(0, 1) for i in idx]).contiguous()
        kg = torch.stack([gathered(k, tables, i, ctx[i]) for i in idx])
        vg = torch.stack([gathered(v, tables, i, ctx[i]) for i in idx])
        mask = causal_lower_right(n, a + n) if a and n > 1 else None
        calls.append((rows, qg, kg, vg, mask, a == 0 and n > 1))
    out = torch.empty_like(q)

    def run(calls, gqa, backends):
        with sdpa_kernel(backends):
            for rows, qg, kg, vg, mask, causal in calls:
                o = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask, is_causal=causal, scale=D**-0.5,
                                                   enable_gqa=gqa)
                out[rows] = o.transpose(1, 2).flatten(0, 1)
        return out

    flash = [SDPBackend.FLASH_ATTENTION] if not SMOKE else [SDPBackend.MATH, SDPBackend.FLASH_ATTENTION]
    try:
        run(calls, True, flash)
        return (lambda: run(calls, True, flash)), "flash, enable_gqa"
    except RuntimeError as e:  # flash refused this shape: expanded K/V, any fused backend
        note = f"flash refused ({str(e).splitlines()[0][:80]}); K/V expanded to {H} heads"
        wide = [(r, qg, kg.repeat_interleave(H // HKV, 1), vg.repeat_interleave(H // HKV, 1), m, c)
                for r, qg, kg, vg, m, c in calls]
        backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
        return (lambda: run(wide, False, backends)), note


def layer_fn(q, k, v, tables, qs, ctx, seqs, triton_backend):
    """PagedAttention.forward on this step (its K/V write included; the new tokens' K/V are
    the cache's own, so the cache does not change)."""
    attn = PagedAttention(H, HKV, D, D**-0.5)
    attn.k_cache, attn.v_cache, attn.decode_kernel = k, v, triton_backend
    pos = [p for a, n in seqs for p in range(a, a + n)]
    seq_of = [i for i, (_, n) in enumerate(seqs) for _ in range(n)]
    slots = torch.tensor([int(tables[i, p // PAGE]) * PAGE + p % PAGE for i, p in zip(seq_of, pos)], device=DEV)
    kn, vn = k.view(-1, HKV, D)[slots].clone(), v.view(-1, HKV, D)[slots].clone()

    def t(x):
        return torch.tensor(x, device=DEV)

    # one step's batch, as the engine builds it; its tile list is built at the first call
    # and then cached, as the engine shares it between the layers
    batch = ForwardBatch(positions=t(pos), slot_mapping=slots, query_start=t(qs), context_lens=t(ctx),
                         block_tables=tables, logits_index=t([0]), query_start_list=qs, context_lens_list=ctx,
                         block_size=PAGE)

    def step():
        return attn(q, kn, vn, batch).view(-1, H, D)

    return step


def cpu_us(fn, args_list, name: str = "") -> float:
    """Smoke mode: wall-clock microseconds of one call after one warm-up (no meaning)."""
    fn(*args_list[0])
    t0 = time.perf_counter()
    fn(*args_list[0])
    return (time.perf_counter() - t0) * 1e6


def errors(out, ref) -> dict:
    diff = out.double() - ref
    rel = float(diff.norm() / ref.norm())
    return {"rel_err": rel, "max_abs_err": float(diff.abs().max()), "ok": rel < TOL}


def bench_case(name, seqs, gen, sweep: bool) -> dict:
    q, k, v, tables, qs, ctx = build(seqs, gen)
    qs_t, ctx_t = torch.tensor(qs, device=DEV), torch.tensor(ctx, device=DEV)
    ref = ea.paged_extend_reference(q, k, v, tables, qs_t, ctx_t, D**-0.5)
    flops = 4 * H * D * sum(a + j + 1 for a, n in seqs for j in range(n))
    timer, eager = (cpu_us, cpu_us) if SMOKE else (time_us, lambda fn, a, name="": eager_us(fn, a, 20, warmup=3))
    row = {"case": name, "seqs": [list(s) for s in seqs], "tokens": qs[-1], "flops": flops}

    def record(key, fn, t):
        r = errors(fn(), ref)
        r["us"] = t(lambda: fn(), [()], name=f"{key} {name}")
        r["TFLOPs"] = flops / (r["us"] * 1e-6) / 1e12
        row[key] = r

    tiles = ea.plan_tiles(qs, ctx, H // HKV, D, DEV)
    row["config"] = list(ea.extend_config(H // HKV, D, DEV))
    record("extend", lambda: ea.paged_extend_attention(q, k, v, tables, qs_t, ctx_t, D**-0.5, tiles), timer)
    peer, row["sdpa_note"] = sdpa_peer(q, k, v, tables, qs, ctx, seqs)
    record("sdpa", peer, timer)
    record("layer_torch", layer_fn(q, k, v, tables, qs, ctx, seqs, False), eager)
    record("layer_triton", layer_fn(q, k, v, tables, qs, ctx, seqs, True), eager)
    if sweep:
        row["sweep"] = []
        for cfg in SWEEP:
            ea.CONFIG_OVERRIDE = cfg
            try:
                tl = ea.plan_tiles(qs, ctx, H // HKV, D, DEV)
                fn = lambda tl=tl: ea.paged_extend_attention(q, k, v, tables, qs_t, ctx_t, D**-0.5, tl)  # noqa: E731
                r = {"config": list(cfg), **errors(fn(), ref), "us": timer(fn, [()], name=f"sweep {cfg} {name}")}
            except Exception as e:  # a config that does not compile (shared memory) is reported, not fatal
                r = {"config": list(cfg), "error": f"{type(e).__name__}: {str(e)[:200]}", "ok": True}
            finally:
                ea.CONFIG_OVERRIDE = None
            row["sweep"].append(r)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--sweep", action="store_true", help="also time the kernel under several launch configs")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU interpreter")
    args = ap.parse_args()
    gen = torch.Generator(device=DEV).manual_seed(0)
    device = (platform.processor() or "cpu") if SMOKE else torch.cuda.get_device_name(DEV)
    print(f"# paged extend attention, {device}; H {H}, Hkv {HKV}, D {D}, page {PAGE}, {DTYPE}; "
          f"default config {tuple(ea.extend_config(H // HKV, D, DEV))} (block_m, block_n, warps, stages)")
    results = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "device": device,
               "command": " ".join(sys.argv), "torch": torch.__version__,
               "shape": {"heads": H, "kv_heads": HKV, "head_dim": D, "page": PAGE, "dtype": str(DTYPE)}, "rows": []}
    cols = ("extend", "sdpa", "layer_torch", "layer_triton")
    print("\n| case | tokens | extend µs | TFLOP/s | SDPA µs | TFLOP/s | extend vs SDPA | layer torch_native µs "
          "| layer triton µs | layer speedup | rel err extend / SDPA | max abs err extend / SDPA |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    failures = []
    for name, seqs in CASES:
        r = bench_case(name, seqs, gen, args.sweep)
        results["rows"].append(r)
        e, s, lt, lx = (r[c] for c in cols)
        failures += [f"{c} {name}: rel err {r[c]['rel_err']:.1e}" for c in cols if not r[c]["ok"]]
        failures += [f"sweep {x['config']} {name}: rel err {x['rel_err']:.1e}" for x in r.get("sweep", [])
                     if not x["ok"]]
        print(f"| {name} | {r['tokens']} | {e['us']:.1f} | {e['TFLOPs']:.1f} | {s['us']:.1f} | {s['TFLOPs']:.1f} "
              f"| {s['us'] / e['us']:.2f}x | {lt['us']:.1f} | {lx['us']:.1f} | {lt['us'] / lx['us']:.1f}x "
              f"| {e['rel_err']:.1e} / {s['rel_err']:.1e} | {e['max_abs_err']:.1e} / {s['max_abs_err']:.1e} |",
              flush=True)
        if DEV.type == "cuda":
            torch.cuda.empty_cache()
    notes = {r["case"]: r["sdpa_note"] for r in results["rows"]}
    print("\nSDPA peer:", "; ".join(f"{k}: {v}" for k, v in notes.items()))
    if args.sweep:
        print("\n| case | " + " | ".join(f"{tuple(c)}" for c in SWEEP) + " |")
        print("|---|" + "---|" * len(SWEEP))
        for r in results["rows"]:
            cells = [f"{x['us']:.1f}" + ("" if x["ok"] else " BAD") if "us" in x else "fails" for x in r["sweep"]]
            print(f"| {r['case']} | " + " | ".join(cells) + " |")
    results["eager_fallbacks"] = list(EAGER_FALLBACKS)
    if EAGER_FALLBACKS:
        print("NOT graph-captured (timed eagerly):", ", ".join(EAGER_FALLBACKS))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    if failures:
        raise SystemExit("outputs off the float64 reference: " + "; ".join(failures))


if __name__ == "__main__":
    main()
