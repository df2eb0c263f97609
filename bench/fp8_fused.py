"""FP8 W8A8 with the per-token activation quantization fused into its producer (issue 18,
point 3): at M rows, per Llama-3-8B projection, CUDA-graph timed in one run:

  scaled_mm     torch._scaled_mm on pre-quantized inputs alone (the peer)
  producer      the bf16 producer alone (RMSNorm + residual for qkv / gate_up, SiLU-and-mul
                for down): what a BF16 model runs before the GEMM anyway
  unfused       producer -> quant_fp8 -> _scaled_mm (before issue 18)
  fused         add_rms_norm_fp8 / silu_and_mul_fp8 -> _scaled_mm

The quantization's cost is (path - producer); the ratio reported is
(path - producer) / scaled_mm, the target <= 1.05 at M = 2048.

    python bench/fp8_fused.py [--ms 256,2048] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from mixq.kernels import elementwise as ew
from mixq.kernels.quant import quant_fp8
from mixq.kernels.quant_fused import add_rms_norm_fp8, silu_and_mul_fp8

SHAPES = {"llama3-8b qkv 4096x6144": (4096, 6144, "norm"), "llama3-8b gate_up 4096x28672": (4096, 28672, "norm"),
          "llama3-8b down 14336x4096": (14336, 4096, "silu"), "llama3-8b o 4096x4096": (4096, 4096, "none")}


def bench_case(name, k, n, prod, m, ws, gen, time_us):
    """Time one (projection, M): the peer, the producer, the unfused and the fused path."""
    w, sw = ws[0]
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen)
    res = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen)
    nw = torch.rand(k, device="cuda", generator=gen).bfloat16() + 0.5
    gu = torch.randn(m, 2 * k, device="cuda", dtype=torch.bfloat16, generator=gen)
    q0, s0 = quant_fp8(x)

    def gemm(q, s, w_, sw_):
        return torch._scaled_mm(q, w_.t(), scale_a=s, scale_b=sw_.view(1, -1), out_dtype=torch.bfloat16)

    def producer():
        if prod == "norm":
            return ew.add_rms_norm(x, res, nw, 1e-6)[0]
        if prod == "silu":
            return ew.silu_and_mul(gu[:, :k], gu[:, k:])
        return x

    def fused_q():
        if prod == "norm":
            return add_rms_norm_fp8(x, res, nw, 1e-6)[:2]
        if prod == "silu":
            return silu_and_mul_fp8(gu[:, :k], gu[:, k:])
        return quant_fp8(x)  # o_proj: the attention output has no fusable producer here

    r = {"shape": name, "M": m, "producer_kind": prod}
    r["scaled_mm"] = time_us(lambda w_, sw_: gemm(q0, s0, w_, sw_), ws)
    r["producer"] = time_us(lambda w_, sw_: producer(), ws[:1]) if prod != "none" else 0.0
    r["unfused"] = time_us(lambda w_, sw_: gemm(*quant_fp8(producer()), w_, sw_), ws)
    r["fused"] = time_us(lambda w_, sw_: gemm(*fused_q(), w_, sw_), ws)
    # the fused codes equal the unfused ones bit for bit (tests); here the whole path
    # against a float product of the producer's output as a sanity check
    qf, sf = fused_q()
    ref = producer().float() @ (w.float() * sw.view(-1, 1)).t()
    y = gemm(qf, sf, w, sw).float()
    r["rel_err"] = float((y - ref).norm() / ref.norm())
    for p in ("unfused", "fused"):
        r[f"{p}_ratio"] = (r[p] - r["producer"]) / r["scaled_mm"]
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ms", default="256,2048")
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", action="store_true")
    a = ap.parse_args()
    if a.smoke or not torch.cuda.is_available():
        from mixq.kernels.quant_fused import fp8_act_reference

        x = torch.randn(4, 64).bfloat16()
        q, s = fp8_act_reference(x)
        err = float(((q.float() * s) - x.float()).abs().max() / x.float().abs().max())
        print(f"smoke: per-token FP8 of a bf16 row block {tuple(q.shape)}, scales {tuple(s.shape)}, max rel err {err:.3f}")
        assert err < 2 ** -4
        return
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from timing import time_us

    rows = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    for name, (k, n, prod) in SHAPES.items():
        w = (torch.randn(n, k, device="cuda", generator=gen) * 0.02).to(torch.float8_e4m3fn)
        sw = torch.rand(n, device="cuda", generator=gen) * 0.01 + 0.001
        ws = [(w, sw)] + [(w.clone(), sw.clone()) for _ in range(max(0, 3 * 64 * 2**20 // w.numel() - 1))][:7]
        for m in (int(v) for v in a.ms.split(",")):
            r = bench_case(name, k, n, prod, m, ws, gen, time_us)
            rows.append(r)
            print(json.dumps(r), flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=1)
    print("\n| shape | M | producer | _scaled_mm µs | producer µs | unfused µs | fused µs | unfused ratio | "
          "fused ratio | rel err |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['M']} | {r['producer_kind']} | {r['scaled_mm']:.1f} | {r['producer']:.1f} | "
              f"{r['unfused']:.1f} | {r['fused']:.1f} | {r['unfused_ratio']:.3f} | {r['fused_ratio']:.3f} | "
              f"{r['rel_err']:.1e} |")


if __name__ == "__main__":
    main()
