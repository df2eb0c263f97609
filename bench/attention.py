"""Paged decode attention benchmark: split-KV (auto) against the single pass (splits=1) and
torch SDPA, on Llama-3-8B attention (32 query heads, 8 KV heads, head dim 128, page 16,
bf16), batch 1 / 8 / 64 x context 512 / 4096 / 16384, every row of a batch at full length.

Per shape: microseconds per call (CUDA-graph replays, median, see bench/timing.py; the
block tables rotate over enough disjoint copies of the context that no call is served from
L2), the achieved KV-read bandwidth (bytes of K + V the step must read / time) and its share
of the measured copy bandwidth, and each output's error against the float64
paged_decode_reference. Modes: auto (the split count the op picks from shapes), split1
(the single-pass kernel), auto_padded (auto with the block tables padded to PAD_KEYS keys,
as a CUDA-graph runner that pads to the longest allowed sequence would call it: the split
choice then sees the padded width), sdpa (F.scaled_dot_product_attention, GQA, on the same
K/V gathered into contiguous [S, Hkv, ctx, D] tensors; the gather is not timed).

    python bench/attention.py [--out results.json] [--smoke]

--smoke runs tiny shapes on the CPU under the Triton interpreter (checks the script and the
numbers; its timings mean nothing).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

SMOKE = "--smoke" in sys.argv
if SMOKE:  # before triton.jit decorates the kernels
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from timing import EAGER_FALLBACKS, L2_BYTES, copy_bandwidth, time_us  # noqa: E402

from mixq.kernels import paged_attention as pa  # noqa: E402

H, HKV, D, PAGE = (4, 2, 32, 16) if SMOKE else (32, 8, 128, 16)
DTYPE = torch.bfloat16
BATCHES = (1, 3) if SMOKE else (1, 8, 64)
CONTEXTS = (64, 320) if SMOKE else (512, 4096, 16384)
PAD_KEYS = 1024 if SMOKE else 32768  # auto_padded: tables as wide as this many keys
DEV = torch.device("cpu" if SMOKE else "cuda")
# Relative L2 error vs float64: bf16 inputs are exact in the reference too; the kernel rounds
# the probabilities to bf16 before p @ v (2^-8 relative per term, averaging down over the
# context) and the output once to bf16 (2^-8). Same budget as the kernel tests.
TOL = 1.6e-2


def rotations(kv_bytes: int) -> int:
    """Disjoint copies of a batch's context to cycle through: > 3x L2 in all (tables
    differ, the cache is one tensor, as in the engine)."""
    return 1 if SMOKE else max(1, min(128, -(-3 * L2_BYTES // kv_bytes)))


def build(s: int, ctx: int, copies: int, gen: torch.Generator):
    """One cache holding `copies` x s sequences of ctx keys on shuffled pages; per copy the
    block tables [s, ctx/PAGE] and the same tables padded with page 0 to PAD_KEYS keys."""
    pages = ctx // PAGE
    nb = copies * s * pages
    k = torch.randn(nb, PAGE, HKV, D, device=DEV, dtype=DTYPE, generator=gen)
    v = torch.randn(nb, PAGE, HKV, D, device=DEV, dtype=DTYPE, generator=gen)
    order = torch.randperm(nb, device=DEV, generator=gen).to(torch.int32).view(copies, s, pages)
    padded = torch.zeros(copies, s, max(pages, PAD_KEYS // PAGE), dtype=torch.int32, device=DEV)
    padded[:, :, :pages] = order
    return k, v, list(order), list(padded)


def gathered(cache: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """[s, Hkv, ctx, D] contiguous: the sequences' keys (or values) in order."""
    s, pages = tables.shape
    return cache[tables.long()].view(s, pages * PAGE, HKV, D).transpose(1, 2).contiguous()


def cpu_us(fn, args_list, name: str = "") -> float:
    """Smoke mode: wall-clock microseconds of one call after one warm-up (no meaning)."""
    fn(*args_list[0])
    t0 = time.perf_counter()
    fn(*args_list[0])
    return (time.perf_counter() - t0) * 1e6


def errors(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(relative L2, max abs) of out [S, H, D] against the float64 reference."""
    diff = out.double() - ref
    return float(diff.norm() / ref.norm()), float(diff.abs().max())


def bench_shape(s: int, ctx: int, bw: float, gen: torch.Generator) -> dict:
    kv_bytes = 2 * s * ctx * HKV * D * DTYPE.itemsize  # K and V of every row, read once
    copies = rotations(kv_bytes)
    k, v, tables, padded = build(s, ctx, copies, gen)
    q = torch.randn(s, H, D, device=DEV, dtype=DTYPE, generator=gen)
    lens = torch.full((s,), ctx, dtype=torch.int32, device=DEV)
    scale = D**-0.5
    ref = pa.paged_decode_reference(q, k, v, tables[0], lens, scale)
    timer = cpu_us if SMOKE else time_us

    def attn(t, n):
        return pa.paged_decode_attention(q, k, v, t, lens, scale, num_splits=n)

    modes = {"auto": ([(t, 0) for t in tables], attn), "split1": ([(t, 1) for t in tables], attn),
             "auto_padded": ([(t, 0) for t in padded], attn)}
    q4 = q.unsqueeze(2)  # [s, H, 1, D]
    kv = [(gathered(k, t), gathered(v, t)) for t in tables]
    modes["sdpa"] = (kv, lambda kc, vc: F.scaled_dot_product_attention(q4, kc, vc, scale=scale,
                                                                       enable_gqa=True).squeeze(2))
    row = {"batch": s, "context": ctx, "kv_bytes": kv_bytes, "copies": copies,
           "splits": {"auto": pa.plan_splits(q, k, tables[0])[0], "split1": 1,
                      "auto_padded": pa.plan_splits(q, k, padded[0])[0]}}
    for name, (args_list, fn) in modes.items():
        rel, mx = errors(fn(*args_list[0]), ref)
        us = timer(fn, args_list, name=f"{name} b{s} c{ctx}")
        row[name] = {"us": us, "GBps": kv_bytes / (us * 1e-6) / 1e9, "pct_copy_bw": 100 * kv_bytes / (us * 1e-6) / bw,
                     "rel_err": rel, "max_abs_err": mx, "ok": rel < TOL}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU interpreter")
    args = ap.parse_args()
    gen = torch.Generator(device=DEV).manual_seed(0)
    bw = 1e10 if SMOKE else copy_bandwidth()
    device = (platform.processor() or "cpu") if SMOKE else torch.cuda.get_device_name(DEV)
    sms = pa.sm_count(DEV)
    print(f"# paged decode attention, {device} ({sms} SMs), copy bandwidth {bw / 1e9:.0f} GB/s; "
          f"H {H}, Hkv {HKV}, D {D}, page {PAGE}, {DTYPE}, auto_padded tables: {PAD_KEYS} keys")
    results = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "device": device, "sms": sms,
               "command": " ".join(sys.argv), "torch": torch.__version__, "copy_bandwidth_GBps": bw / 1e9,
               "shape": {"heads": H, "kv_heads": HKV, "head_dim": D, "page": PAGE, "dtype": str(DTYPE),
                         "pad_keys": PAD_KEYS}, "rows": []}
    print("\n| batch | ctx | KV MB | splits auto / padded | auto µs | auto GB/s | % copy BW | split1 µs "
          "| split1 GB/s | auto vs split1 | auto_padded µs | SDPA µs | SDPA GB/s | auto vs SDPA "
          "| max abs err auto / split1 / padded / SDPA |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    failures = []
    for s in BATCHES:
        for ctx in CONTEXTS:
            r = bench_shape(s, ctx, bw, gen)
            results["rows"].append(r)
            a, o, p, t = r["auto"], r["split1"], r["auto_padded"], r["sdpa"]
            failures += [f"{m} b{s} c{ctx}: rel err {r[m]['rel_err']:.1e}" for m in ("auto", "split1", "auto_padded",
                                                                                      "sdpa") if not r[m]["ok"]]
            print(f"| {s} | {ctx} | {r['kv_bytes'] / 2**20:.1f} | {r['splits']['auto']} / {r['splits']['auto_padded']} "
                  f"| {a['us']:.1f} | {a['GBps']:.0f} | {a['pct_copy_bw']:.0f}% | {o['us']:.1f} | {o['GBps']:.0f} "
                  f"| {o['us'] / a['us']:.2f}x | {p['us']:.1f} | {t['us']:.1f} | {t['GBps']:.0f} "
                  f"| {t['us'] / a['us']:.2f}x | {a['max_abs_err']:.1e} / {o['max_abs_err']:.1e} / "
                  f"{p['max_abs_err']:.1e} / {t['max_abs_err']:.1e} |", flush=True)
            if DEV.type == "cuda":
                torch.cuda.empty_cache()
    speedups = [r["split1"]["us"] / r["auto"]["us"] for r in results["rows"]]
    print(f"\nauto vs split1: geometric mean {statistics.geometric_mean(speedups):.2f}x, "
          f"min {min(speedups):.2f}x, max {max(speedups):.2f}x")
    results["eager_fallbacks"] = list(EAGER_FALLBACKS)
    if EAGER_FALLBACKS:  # our op must capture: a fallback here is a bug, not a footnote
        print("NOT graph-captured (timed eagerly):", ", ".join(EAGER_FALLBACKS))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    if failures:
        raise SystemExit("outputs off the float64 reference: " + "; ".join(failures))


if __name__ == "__main__":
    main()
