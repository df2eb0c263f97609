"""Kernel benchmark: our dense-linear kernels against the peers in the GPU image, one run.

Ours: W4A16/W8A16 GEMM (wna16), FP8 per-channel and 128x128-block, INT8 W8A8 and W8A16
(mixq.kernels.w8a16 / w8a8 / quant; see bench/kernels_w8.py for the paths timed).
Peers: cuBLAS BF16 (torch.matmul), torch's INT4 tinygemm (aten._weight_int4pack_mm),
torch._scaled_mm FP8 (rowwise; blockwise where torch has it) and torch._int_mm.
Shapes: Llama-3-8B and Qwen3-30B-A3B (attention) layers; M in {1, 16, 64, 256, 2048}.
Reports microseconds (CUDA-graph timed, see bench/timing.py), weight bandwidth and % of the
measured copy bandwidth (the HBM roofline at small M), % of the measured BF16 / FP8
matmul peak (large M), and the relative error against a float32 product.

    python bench/kernels.py [--quick] [--out results.json] [--sweep {wna16,w8}]
    python bench/kernels.py --gguf [--quick] [--out gguf.json]   (GGUF block types: kernels_gguf.py)
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from kernels_w8 import bench_w8, sweep_w8
from timing import EAGER_FALLBACKS, bf16_peak, copies, copy_bandwidth, fp8_peak, time_us

from mixq.kernels.w8_methods import WEIGHT_ONLY_MAX_M
from mixq.kernels.wna16 import pack_wna16, wna16_gemm

SHAPES = {  # name: (K, N)
    "llama3-8b qkv 4096x6144": (4096, 6144),
    "llama3-8b o 4096x4096": (4096, 4096),
    "llama3-8b gate_up 4096x28672": (4096, 28672),
    "llama3-8b down 14336x4096": (14336, 4096),
    "qwen3-30b-a3b qkv 2048x5120": (2048, 5120),  # hidden 2048 -> 32x128 q + 2x4x128 kv
    "qwen3-30b-a3b o 4096x2048": (4096, 2048),
}
MS = (1, 16, 64, 256, 2048)


def bench_shape(name, k, n, m_list, group=128):
    g = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    q = torch.randint(0, 16, (n, k), device="cuda", generator=g, dtype=torch.int32).to(torch.uint8)
    s = (torch.rand(n, k // group, device="cuda", generator=g) * 0.01 + 0.001).to(torch.bfloat16)
    w4 = pack_wna16(q, s, None, 4, group)
    c4 = copies(w4.nbytes)
    ws = [w4] + [pack_wna16(q, s, None, 4, group) for _ in range(c4 - 1)]
    dense = (q.float() - 8).mul_(s.float().repeat_interleave(group, 1)).to(torch.bfloat16)
    cd = copies(dense.numel() * 2)
    ds = [dense] + [dense.clone() for _ in range(cd - 1)]
    # tinygemm: uint8 [N, K/2] (two nibbles per byte), scales_and_zeros [K/g, N, 2] bf16
    tiny = None
    try:
        w_u8 = ((q[:, ::2] << 4) | q[:, 1::2]).contiguous()
        packed = torch.ops.aten._convert_weight_to_int4pack(w_u8, 8)
        sz = torch.stack([s.t().float(), torch.full_like(s.t().float(), 0.0)], dim=-1).to(torch.bfloat16)
        tiny = [(packed, sz)] * 1 + [(packed.clone(), sz.clone()) for _ in range(c4 - 1)]
    except Exception as e:  # the peer is optional: report why it is missing
        print(f"tinygemm unavailable: {type(e).__name__}: {e}")
    for m in m_list:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=g)
        ours = time_us(lambda w, x=x: wna16_gemm(x, w), [(w,) for w in ws])
        cublas = time_us(lambda d, x=x: torch.matmul(x, d.t()), [(d,) for d in ds])
        t_tiny = None
        if tiny is not None:
            try:
                t_tiny = time_us(lambda p, z, x=x: torch.ops.aten._weight_int4pack_mm(x, p, group, z), tiny)
            except Exception as e:  # a peer refusing a shape is reported, not fatal
                t_tiny = f"n/a ({type(e).__name__})"
        # correctness at this shape against the dense bf16 weight (same values)
        y = wna16_gemm(x, w4)
        ref = x.float() @ dense.float().t()
        err = ((y.float() - ref).norm() / ref.norm()).item()
        rows.append({"shape": name, "M": m, "ours_us": ours, "cublas_bf16_us": cublas, "tinygemm_us": t_tiny,
                     "weight_bytes": w4.nbytes, "rel_err": err})
    return rows


def sweep_wna16():
    """Time candidate launch configs (to choose the heuristic in wna16.gpu_config)."""

    from mixq.kernels import wna16

    group = 128
    cases = [("gate_up", 4096, 28672, 1), ("gate_up", 4096, 28672, 16), ("down", 14336, 4096, 1),
             ("down", 14336, 4096, 16), ("gate_up", 4096, 28672, 2048)]
    for name, k, n, m in cases:
        g = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randint(0, 16, (n, k), device="cuda", generator=g, dtype=torch.int32).to(torch.uint8)
        s = (torch.rand(n, k // group, device="cuda", generator=g) * 0.01).to(torch.bfloat16)
        ws = [pack_wna16(q, s, None, 4, group) for _ in range(copies(n * k // 2))]
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        C = wna16.WNA16Config
        if m == 1:
            space = [C("gemv", 1, bn, 128, sk, w, 1) for bn in (64, 128, 256) for sk in (1, 2, 4, 8) for w in (2, 4)]
        elif m <= 64:
            space = [C("mm", 16 if m <= 16 else 64, bn, 128, sk, 4, st, sw) for bn in (64, 128) for sk in (1, 2, 4)
                     for st in (3, 4) for sw in (False, True)]
        else:
            space = [C("mm", bm, bn, bk, 1, w, st, True) for bm, bn, bk, w in
                     [(128, 128, 64, 8), (256, 128, 64, 8), (128, 256, 64, 8), (128, 128, 128, 8), (64, 128, 64, 4)]
                     for st in (3, 4)]
        results = []
        for cfg in space:
            wna16.CONFIG_OVERRIDE = cfg
            try:
                t = time_us(lambda w, x=x: wna16_gemm(x, w), [(w,) for w in ws], reps=30)
            except Exception as e:  # a config may not fit shared memory: skip it, say so
                print(f"  {cfg}: {type(e).__name__}")
                continue
            results.append((t, cfg))
        wna16.CONFIG_OVERRIDE = None
        results.sort(key=lambda r: r[0])
        best = ", ".join(f"{c} {t:.1f}us" for t, c in results[:4])
        print(f"sweep {name} M={m}: default {time_us(lambda w, x=x: wna16_gemm(x, w), [(w,) for w in ws]):.1f}us; "
              f"best: {best}", flush=True)


def _f(v, fmt="{:.1f}") -> str:
    return fmt.format(v) if isinstance(v, (int, float)) else "-" if v is None else "n/a"


def print_w4(rows, bw, peak):
    print("\nW4A16 (wna16) vs cuBLAS BF16 and tinygemm:\n")
    print("| shape | M | ours W4A16 us | GB/s | % copy BW | % bf16 peak | cuBLAS BF16 us | tinygemm us | "
          "vs tinygemm | vs cuBLAS | rel err |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        k, n = SHAPES[r["shape"]]
        gbs = r["weight_bytes"] / (r["ours_us"] * 1e-6) / 1e9
        flops = 2 * r["M"] * k * n / (r["ours_us"] * 1e-6)
        tiny = r["tinygemm_us"]
        vs_tiny = "-" if not isinstance(tiny, float) else f"{tiny / r['ours_us']:.2f}x"
        print(f"| {r['shape']} | {r['M']} | {r['ours_us']:.1f} | {gbs:.0f} | {100 * gbs * 1e9 / bw:.0f}% | "
              f"{100 * flops / peak:.0f}% | {r['cublas_bf16_us']:.1f} | {_f(tiny)} | {vs_tiny} | "
              f"{r['ours_us'] / r['cublas_bf16_us']:.2f}x | {r['rel_err']:.1e} |")


W8_COLS = [("cublas_bf16_us", "cuBLAS BF16"), ("fp8_quant_us", "FP8 act quant"), ("fp8_wo_us", "FP8 w-only"), ("fp8_w8a8_us", "FP8 quant+_scaled_mm"),
           ("fp8_tri_us", "FP8 quant+Triton"), ("scaled_mm_us", "_scaled_mm (peer)"), ("blk_wo_us", "FP8-blk w-only"),
           ("blk_quant_us", "1x128 act quant"), ("blk_w8a8_us", "FP8-blk quant+Triton"), ("scaled_blk_us", "_scaled_mm blk (peer)"),
           ("i8_wo_us", "INT8 W8A16"), ("i8_quant_us", "INT8 act quant"), ("i8_w8a8_us", "INT8 quant+Triton"), ("int_mm_us", "_int_mm (peer)")]
# what FP8Method / Int8Method run at each M: (label, time key, bytes key, peak kind)
CHOICES = [("FP8 per-channel", "fp8_wo", "fp8_w8a8", "fp8"), ("FP8 block 128", "blk_wo", "blk_w8a8", "blk"),
           ("INT8 W8A8", "i8_wo", "i8_w8a8", "i8"), ("INT8 W8A16", "i8_wo", "i8_wo", "i8")]


def print_w8(rows, bw, peak16, peak8):
    print("\nFP8 / INT8, every path and peer (us; peers on pre-quantized inputs):\n")
    print("| shape | M | " + " | ".join(c for _, c in W8_COLS) + " |")
    print("|---|---|" + "---|" * len(W8_COLS))
    for r in rows:
        print(f"| {r['shape']} | {r['M']} | " + " | ".join(_f(r.get(k)) for k, _ in W8_COLS) + " |")
    print(f"\nFP8 / INT8 as the methods run them (weight-only up to M = {WEIGHT_ONLY_MAX_M}):\n")
    print("| shape | M | format | path | us | weight GB/s | % copy BW | TFLOP/s | % peak | rel err |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        k, n = SHAPES[r["shape"]]
        for label, wo, w8, fmt in CHOICES:
            key = wo if r["M"] <= WEIGHT_ONLY_MAX_M else w8
            t = r.get(f"{key}_us")
            if not isinstance(t, float):
                continue
            gbs = r[f"{fmt}_bytes"] / (t * 1e-6) / 1e9
            tf = 2 * r["M"] * k * n / (t * 1e-6)
            pk = peak16 if key.endswith("_wo") else (peak8 or peak16)  # int8 TOPS = fp8 TFLOPS on H100
            print(f"| {r['shape']} | {r['M']} | {label} | {key} | {t:.1f} | {gbs:.0f} | {100 * gbs * 1e9 / bw:.0f}% | "
                  f"{tf / 1e12:.0f} | {100 * tf / pk:.0f}% | {r.get(key + '_err', float('nan')):.1e} |")


def print_targets(rows, bw):
    print("\n### FP8 targets (issue 5): M=1 >= 70% of copy BW; M=2048 within 10% of torch._scaled_mm\n")
    for r in rows:
        if r["M"] == 1 and isinstance(r.get("fp8_wo_us"), float):
            pct = 100 * r["fp8_bytes"] / (r["fp8_wo_us"] * 1e-6) / bw
            print(f"- {r['shape']} M=1: FP8 weight-only {r['fp8_wo_us']:.1f} us = {pct:.0f}% of copy BW "
                  f"({'met' if pct >= 70 else 'MISSED'})")
        if r["M"] == 2048 and isinstance(r.get("fp8_w8a8_us"), float) and isinstance(r.get("scaled_mm_us"), float):
            ratio = r["fp8_w8a8_us"] / r["scaled_mm_us"]
            print(f"- {r['shape']} M=2048: FP8 quant+GEMM {r['fp8_w8a8_us']:.1f} us = {ratio:.2f}x _scaled_mm alone "
                  f"({'met' if ratio <= 1.10 else 'MISSED'}; the activation quant pass alone: "
                  f"{_f(r.get('fp8_quant_us'))} us); block FP8 {_f(r.get('blk_w8a8_us'))} us "
                  f"vs cuBLAS blockwise {_f(r.get('scaled_blk_us'))} us")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="two Llama shapes only")
    ap.add_argument("--out")
    ap.add_argument("--sweep", choices=["wna16", "w8"], help="time candidate launch configs and exit")
    ap.add_argument("--gguf", action="store_true", help="the GGUF block types only (bench/kernels_gguf.py)")
    a = ap.parse_args()
    if a.sweep:
        sweep_wna16() if a.sweep == "wna16" else sweep_w8()
        return
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 references stay float32
    dev = torch.cuda.get_device_name()
    bw, peak16, peak8 = copy_bandwidth(), bf16_peak(), fp8_peak()
    print(f"device {dev}; torch {torch.__version__}; copy bandwidth {bw / 1e9:.0f} GB/s; "
          f"bf16 matmul peak {peak16 / 1e12:.0f} TFLOP/s; fp8 _scaled_mm peak {_f(peak8 and peak8 / 1e12, '{:.0f}')} "
          "TFLOP/s", flush=True)
    shapes = dict(list(SHAPES.items())[2:4]) if a.quick else SHAPES
    if a.gguf:
        from kernels_gguf import bench_gguf, print_gguf

        rows = []
        for name, (k, n) in shapes.items():
            r = bench_gguf(name, k, n, MS)
            rows += r
            print(f"\n### {name}")
            print_gguf(r, bw)
            sys.stdout.flush()
            if a.out:
                with open(a.out, "w") as f:
                    json.dump({"device": dev, "torch": torch.__version__, "copy_bw": bw, "gguf": rows}, f, indent=2)
        return
    rows4, rows8 = [], []
    for name, (k, n) in shapes.items():  # tables per shape as it completes: a timeout keeps the rest
        r4 = bench_shape(name, k, n, MS)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        r8 = bench_w8(name, k, n, MS, w)
        for r, w4 in zip(r8, r4):
            r["cublas_bf16_us"] = w4["cublas_bf16_us"]
        rows4 += r4
        rows8 += r8
        del w
        torch.cuda.empty_cache()
        print(f"\n### {name}")
        print_w4(r4, bw, peak16)
        print_w8(r8, bw, peak16, peak8)
        sys.stdout.flush()
        if a.out:
            with open(a.out, "w") as f:
                json.dump({"device": dev, "torch": torch.__version__, "copy_bw": bw, "bf16_peak": peak16,
                           "fp8_peak": peak8, "weight_only_max_m": WEIGHT_ONLY_MAX_M, "w4a16": rows4, "w8": rows8,
                           "eager_fallbacks": EAGER_FALLBACKS}, f, indent=2)
    print_targets(rows8, bw)
    if EAGER_FALLBACKS:
        print(f"\ntimed eagerly (graph capture failed): {'; '.join(EAGER_FALLBACKS)}")

if __name__ == "__main__":
    main()
