"""W4A16 benchmark: the compiled Marlin-class kernel (`cuda-w4a16`) against the Triton
kernel (`triton-wna16`), cuBLAS BF16, torch's tinygemm and gemlite, one run, same shapes
and bytes (group 128, symmetric, bf16 activations, CUDA-graph timing over rotating weight
copies: bench/timing.py).

    python bench/w4a16.py [--out FILE] [--sweep] [--quick] [--smoke]

--sweep times the launch shapes / grid sizes / dequant chunks the heuristic chooses from;
--smoke (CPU too) packs a small weight, checks it against float64 and prints the launch
each M would get, timing nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from mixq.kernels import w4a16_mma
from mixq.kernels.w4a16_mma import MMALaunch, choose_launch, pack_w4a16, w4a16_gemm, w4a16_reference

SHAPES = {  # name: (K, N)
    "llama3-8b qkv 4096x6144": (4096, 6144),
    "llama3-8b o 4096x4096": (4096, 4096),
    "llama3-8b gate_up 4096x28672": (4096, 28672),
    "llama3-8b down 14336x4096": (14336, 4096),
    "qwen3-30b-a3b qkv 2048x5120": (2048, 5120),
    "qwen3-30b-a3b o 4096x2048": (4096, 2048),
}
MS = (1, 16, 64, 256, 2048)
GROUP = 128


def smoke() -> None:
    gen = torch.Generator().manual_seed(0)
    n, k = 128, 256
    q = torch.randint(0, 16, (n, k), generator=gen)
    s = torch.rand(n, k // GROUP, generator=gen) * 0.01 + 0.001
    w = pack_w4a16(q, s, None, GROUP, torch.bfloat16)
    x = torch.randn(3, k, generator=gen).bfloat16()
    ref = w4a16_reference(x, w)
    direct = x.double() @ ((q.double() - 8) * s.bfloat16().double().repeat_interleave(GROUP, 1)).t()
    err = float((ref - direct).norm() / direct.norm())
    print(f"smoke: layout reference vs direct dequantization rel err {err:.1e}")
    assert err < 1e-12
    for m in MS:
        print(f"M={m}: {choose_launch(m, 28672, 4096, GROUP, 132, lambda mb, sh: 2)}")


def _weights(k, n, gen):
    q = torch.randint(0, 16, (n, k), device="cuda", generator=gen, dtype=torch.int32)
    s = (torch.rand(n, k // GROUP, device="cuda", generator=gen) * 0.01 + 0.001).to(torch.bfloat16)
    return q, s


def sweep(shapes, ms, t_us, out_rows, deadline):
    """Every launch shape x min_iters (the GEMV's variants x K splits up to 16 rows, dequant
    chunks from M = 128) per shape and M."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    gen = torch.Generator(device="cuda").manual_seed(1)
    for name, (k, n) in shapes.items():
        q, s = _weights(k, n, gen)
        w = pack_w4a16(q, s, None, GROUP, torch.bfloat16)
        ws = [w] + [pack_w4a16(q, s, None, GROUP, torch.bfloat16) for _ in range(w4a16_mma_copies(w) - 1)]
        for m in ms:
            if time.time() > deadline:
                print(f"deadline: sweep stops before {name} M={m}")
                return
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen)
            cands = []
            if m <= w4a16_mma.GEMV_MAX_M:
                slices = k // 16
                for v, (warps, _) in w4a16_mma.GEMV_VARIANTS.items():
                    for kc in range(1, slices + 1):
                        if w4a16_mma.gemv_split(m, n, k, sms, warps, kcs=kc) is None or n // 64 * kc > 16 * sms:
                            continue
                        cands.append((f"g{v}/kc{kc}", lambda m_, n_, k_, g_, v=v, kc=kc: choose_launch(
                            m_, n_, k_, g_, sms, lambda mb, sp: 1, gemv=True, gemv_variant=v, kcs=kc)))
            if m < 1024:
                # row blocks per tile: as many as M needs (up to 4), and 2 (half the registers
                # of 4, the weight read once per 32-row chunk) from 48 rows
                for mbs in (None, 2) if m > 32 else (None,):
                    for shape in w4a16_mma.SHAPES:
                        for mi in (2, 8):
                            cands.append((f"s{shape}/mi{mi}" + (f"/mb{mbs}" if mbs else ""),
                                          lambda m_, n_, k_, g_, sh=shape, mi=mi, mbs=mbs: choose_launch(
                                m_, n_, k_, g_, sms, lambda mb, sp: w4a16_mma._occupancy(0, True, mb, sp, False),
                                shape=sh, min_iters=mi, dequant_min_m=1 << 30, mb=mbs)))
            if m >= 128:
                for chunk in (n, 4096, 2048, 1024):
                    if chunk <= n:
                        cands.append((f"deq{chunk}", lambda *a, c=chunk: MMALaunch("dequant", chunk=c)))
            best = None
            for label, fn in cands:
                w4a16_mma.CONFIG_OVERRIDE = fn
                try:
                    t = t_us(lambda w_, x=x: w4a16_gemm(x, w_), [(w_,) for w_ in ws])
                except ValueError:  # shape does not tile this N/K
                    continue
                finally:
                    w4a16_mma.CONFIG_OVERRIDE = None
                out_rows.append({"sweep": name, "M": m, "cfg": label, "us": t})
                if best is None or t < best[1]:
                    best = (label, t)
            heur = t_us(lambda w_, x=x: w4a16_gemm(x, w_), [(w_,) for w_ in ws])
            top = sorted((r["us"], r["cfg"]) for r in out_rows if r.get("sweep") == name and r["M"] == m)[:4]
            print(f"sweep {name} M={m}: heuristic {heur:.1f} us; best " + ", ".join(f"{c} {u:.1f}" for u, c in top),
                  flush=True)


def w4a16_mma_copies(w):
    from timing import copies
    return copies(w.nbytes)


def bench(shapes, ms, t_us, rows, deadline):
    from timing import copies

    from mixq.kernels.wna16 import pack_wna16, wna16_gemm
    try:
        import gemlite
        from gemlite.core import DType, GemLiteLinearTriton
    except Exception as e:  # the peer is optional: say why it is missing
        print(f"gemlite unavailable: {type(e).__name__}: {e}")
        gemlite = None
    gen = torch.Generator(device="cuda").manual_seed(0)
    for name, (k, n) in shapes.items():
        q, s = _weights(k, n, gen)
        w = pack_w4a16(q, s, None, GROUP, torch.bfloat16)
        c = copies(w.nbytes)
        ours = [w] + [pack_w4a16(q, s, None, GROUP, torch.bfloat16) for _ in range(c - 1)]
        tri = [pack_wna16(q.to(torch.uint8), s, None, 4, GROUP) for _ in range(c)]
        dense = (q.float() - 8).mul_(s.float().repeat_interleave(GROUP, 1)).to(torch.bfloat16)
        ds = [dense] + [dense.clone() for _ in range(copies(dense.numel() * 2) - 1)]
        tiny = None
        try:
            w_u8 = ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8).contiguous()
            packed = torch.ops.aten._convert_weight_to_int4pack(w_u8, 8)
            sz = torch.stack([s.t().float(), torch.zeros_like(s.t().float())], dim=-1).to(torch.bfloat16)
            tiny = [(packed, sz)] + [(packed.clone(), sz.clone()) for _ in range(c - 1)]
        except Exception as e:
            print(f"tinygemm unavailable: {type(e).__name__}: {e}")
        gl = None
        if gemlite is not None:
            try:
                gl = []
                for _ in range(c):
                    lin = GemLiteLinearTriton(W_nbits=4, group_size=GROUP, in_features=k, out_features=n,
                                              input_dtype=DType.BF16, output_dtype=DType.BF16)
                    lin.pack(q.to(torch.uint8), s, 8, bias=None)
                    gl.append(lin)
            except Exception as e:
                print(f"gemlite pack failed: {type(e).__name__}: {e}")
                gl = None
        del q
        for m in ms:
            if time.time() > deadline:
                print(f"deadline: stopping before {name} M={m}")
                return
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen)
            y = w4a16_gemm(x, w)
            ref = x.float() @ dense.float().t()
            err = float((y.float() - ref).norm() / ref.norm())
            r = {"shape": name, "M": m, "K": k, "N": n, "weight_bytes": w.nbytes, "rel_err": err,
                 "launch": str(choose_launch(m, n, k, GROUP, torch.cuda.get_device_properties(0).multi_processor_count,
                                             lambda mb, sh: w4a16_mma._occupancy(0, True, mb, sh, False)))}
            yt = wna16_gemm(x, tri[0])
            r["wna16_rel_err"] = float((yt.float() - ref).norm() / ref.norm())
            r["ours_us"] = t_us(lambda w_, x=x: w4a16_gemm(x, w_), [(w_,) for w_ in ours])
            r["triton_us"] = t_us(lambda w_, x=x: wna16_gemm(x, w_), [(w_,) for w_ in tri])
            r["cublas_us"] = t_us(lambda d, x=x: torch.matmul(x, d.t()), [(d,) for d in ds])
            if tiny is not None and m <= 256:
                try:
                    r["tinygemm_us"] = t_us(lambda p, z, x=x: torch.ops.aten._weight_int4pack_mm(x, p, GROUP, z), tiny)
                except Exception as e:
                    r["tinygemm_us"] = f"n/a ({type(e).__name__})"
            if gl is not None:
                try:
                    yg = gl[0](x)
                    r["gemlite_err"] = float((yg.float() - ref).norm() / ref.norm())
                    r["gemlite_us"] = t_us(lambda lin, x=x: lin(x), [(lin,) for lin in gl])
                except Exception as e:
                    r["gemlite_us"] = f"n/a ({type(e).__name__}: {str(e)[:80]})"
            rows.append(r)
            print(json.dumps(r), flush=True)


def _f(v):
    return f"{v:.1f}" if isinstance(v, float) else ("-" if v is None else str(v).split(" ")[0])


def table(rows, bw):
    """Ratios are for the shipped path (triton-wna16: Triton kernels, dequantize + cuBLAS at
    large M); the opt-in mma kernel has its own column."""
    print("\n| shape | M | wna16 (shipped) µs | % copy BW | mma (opt-in) µs | cuBLAS µs | tinygemm µs | gemlite µs | "
          "vs cuBLAS | vs tinygemm | vs gemlite | M/M=1 | rel err |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    one = {r["shape"]: r["triton_us"] for r in rows if r["M"] == 1}
    for r in rows:
        o = r["triton_us"]
        pct = 100 * r["weight_bytes"] / (o * 1e-6) / bw if bw else 0
        ratio = lambda p, o=o: f"{p / o:.2f}x" if isinstance(p, float) else "-"  # noqa: E731
        rel1 = f"{o / one[r['shape']]:.2f}" if r["shape"] in one else "-"
        print(f"| {r['shape']} | {r['M']} | {o:.1f} | {pct:.0f}% | {_f(r.get('ours_us'))} | {_f(r['cublas_us'])} | "
              f"{_f(r.get('tinygemm_us'))} | {_f(r.get('gemlite_us'))} | {ratio(r['cublas_us'])} | "
              f"{ratio(r.get('tinygemm_us'))} | {ratio(r.get('gemlite_us'))} | {rel1} | {r['rel_err']:.1e} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--quick", action="store_true", help="the Llama-3-8B MLP shapes only")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--ms", default=",".join(map(str, MS)), help="row counts to time")
    ap.add_argument("--budget-s", type=float, default=400, help="stop starting new shapes after this long")
    ap.add_argument("--sweep-s", type=float, default=120, help="the sweep's time after the table's budget")
    ap.add_argument("--sweep-ms", default="1,16,64,128,256,512", help="row counts the sweep times")
    a = ap.parse_args()
    if a.smoke or not torch.cuda.is_available():
        smoke()
        return
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from timing import copy_bandwidth, time_us

    deadline = time.time() + a.budget_s
    shapes = {k: v for k, v in SHAPES.items() if not a.quick or "gate_up" in k or "down" in k}
    if a.quick:  # the 8B MLP shapes first
        shapes = dict(sorted(shapes.items(), key=lambda kv: "down" in kv[0]))
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s", flush=True)
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "copy_bw": bw, "rows": [], "sweep": []}
    try:
        bench(shapes, [int(v) for v in a.ms.split(",")], time_us, out["rows"], deadline)
        table(out["rows"], bw)
        if a.sweep:
            sweep(shapes, [int(v) for v in a.sweep_ms.split(",")], time_us, out["sweep"], deadline + a.sweep_s)
    finally:
        if a.out:
            with open(a.out, "w") as f:
                json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
