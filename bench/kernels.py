"""Kernel benchmark: our W4A16/W8A16 Triton GEMM against the peers in the same run.

Peers: cuBLAS BF16 (torch.matmul), torch's INT4 tinygemm (aten._weight_int4pack_mm),
torch._scaled_mm FP8 and torch._int_mm INT8 (peer figures only; our FP8/INT8 kernels are
not written yet). Reports microseconds (median of CUDA-event timings over many reps,
rotating over enough weight copies that every rep reads from HBM, not L2), weight
bandwidth, % of the measured copy bandwidth (the HBM roofline at small M) and % of the
measured BF16 matmul peak (large M).

    python bench/kernels.py [--quick] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from mixq.kernels.wna16 import pack_wna16, wna16_gemm

SHAPES = {  # name: (K, N), Llama-3-8B
    "qkv 4096x6144": (4096, 6144),
    "o 4096x4096": (4096, 4096),
    "gate_up 4096x28672": (4096, 28672),
    "down 14336x4096": (14336, 4096),
}
MS = (1, 16, 64, 256, 2048)
L2_BYTES = 64 * 2**20


def time_us(fn, args_list, reps=50, warmup=5) -> float:
    """Median microseconds of fn(*args) cycling through args_list (to defeat L2)."""
    for i in range(warmup):
        fn(*args_list[i % len(args_list)])
    torch.cuda.synchronize()
    times = []
    for i in range(reps):
        a = args_list[i % len(args_list)]
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn(*a)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) * 1000)
    return statistics.median(times)


def copy_bandwidth() -> float:
    x = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    t = time_us(lambda: y.copy_(x), [()], reps=20)
    return 2 * x.numel() / (t * 1e-6)  # bytes read + written per second


def matmul_peak() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t = time_us(torch.matmul, [(a, b)], reps=20)
    return 2 * 8192**3 / (t * 1e-6)


def copies(nbytes: int) -> int:
    return max(1, min(16, -(-3 * L2_BYTES // max(nbytes, 1))))


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
            t_tiny = time_us(lambda p, z, x=x: torch.ops.aten._weight_int4pack_mm(x, p, group, z), tiny)
        # correctness at this shape against the dense bf16 weight (same values)
        y = wna16_gemm(x, w4)
        ref = x.float() @ dense.float().t()
        err = ((y.float() - ref).norm() / ref.norm()).item()
        rows.append({"shape": name, "M": m, "ours_us": ours, "cublas_bf16_us": cublas, "tinygemm_us": t_tiny,
                     "weight_bytes": w4.nbytes, "rel_err": err})
    return rows


def bench_peers_fp8_int8(k, n, m):
    out = {}
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    try:
        xf, wf = x.to(torch.float8_e4m3fn), w.to(torch.float8_e4m3fn)
        one = torch.ones((), device="cuda")
        out["scaled_mm_fp8_us"] = time_us(lambda: torch._scaled_mm(xf, wf.t(), one, one, out_dtype=torch.bfloat16),
                                          [()])
    except Exception as e:
        out["scaled_mm_fp8_us"] = f"n/a ({type(e).__name__})"
    try:
        xi, wi = x.clamp(-127, 127).to(torch.int8), w.clamp(-127, 127).to(torch.int8)
        out["int_mm_us"] = time_us(lambda: torch._int_mm(xi, wi.t()), [()])
    except Exception as e:
        out["int_mm_us"] = f"n/a ({type(e).__name__})"
    return out


def sweep():
    """Time candidate launch configs (to choose the heuristic in wna16._config)."""

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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out")
    ap.add_argument("--sweep", action="store_true", help="time candidate launch configs and exit")
    a = ap.parse_args()
    if a.sweep:
        sweep()
        return
    dev = torch.cuda.get_device_name()
    bw, peak = copy_bandwidth(), matmul_peak()
    print(f"device {dev}; torch {torch.__version__}; copy bandwidth {bw / 1e9:.0f} GB/s; "
          f"bf16 matmul peak {peak / 1e12:.0f} TFLOP/s")
    shapes = dict(list(SHAPES.items())[2:]) if a.quick else SHAPES
    rows = []
    for name, (k, n) in shapes.items():
        rows += bench_shape(name, k, n, MS)
    print("\n| shape | M | ours W4A16 us | GB/s | % copy BW | % bf16 peak | cuBLAS BF16 us | tinygemm us | "
          "vs tinygemm | vs cuBLAS | rel err |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        k, n = shapes[r["shape"]]
        gbs = r["weight_bytes"] / (r["ours_us"] * 1e-6) / 1e9
        flops = 2 * r["M"] * k * n / (r["ours_us"] * 1e-6)
        tiny = r["tinygemm_us"]
        tiny_s = "-" if tiny is None else f"{tiny:.1f}"
        vs_tiny = "-" if tiny is None else f"{tiny / r['ours_us']:.2f}x"
        print(f"| {r['shape']} | {r['M']} | {r['ours_us']:.1f} | {gbs:.0f} | {100 * gbs * 1e9 / bw:.0f}% | "
              f"{100 * flops / peak:.0f}% | {r['cublas_bf16_us']:.1f} | {tiny_s} | {vs_tiny} | "
              f"{r['ours_us'] / r['cublas_bf16_us']:.2f}x | {r['rel_err']:.1e} |")
    peers = {m: bench_peers_fp8_int8(4096, 28672, m) for m in (16, 2048)}
    print(f"\npeers at 4096x28672: {json.dumps(peers)}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"device": dev, "torch": torch.__version__, "copy_bw": bw, "bf16_peak": peak, "rows": rows,
                       "peers": peers}, f, indent=2)


if __name__ == "__main__":
    main()
