"""FP8 / INT8 dense-linear timings for bench/kernels.py: our kernels and their peers.

Ours (the paths FP8Method / Int8Method take, each timed on its own so the crossover
between weight-only and W8A8 is visible):
  fp8_wo     FP8 per-channel, weight-only kernel (w8a16)
  fp8_w8a8   FP8 per-channel, per-token quant + torch._scaled_mm (cuBLAS rowwise)
  fp8_tri    FP8 per-channel, per-token quant + our Triton w8a8 (the fallback path)
  blk_wo     FP8 128x128 blocks, weight-only kernel
  blk_w8a8   FP8 128x128 blocks, 1x128 group quant + our Triton block GEMM
  i8_wo      INT8 per-channel weight-only (W8A16)
  i8_w8a8    INT8 per-channel, per-token int8 quant + our Triton int8 GEMM
  <fmt>_quant_us  the activation-quant kernel alone (the W8A8 paths' extra pass)
Peers, on pre-quantized inputs (kernel only, no activation quant):
  scaled_mm  torch._scaled_mm FP8 rowwise
  scaled_blk torch._scaled_mm FP8 1x128 x 128x128 blockwise (cuBLAS 12.9+, if torch has it)
  int_mm     torch._int_mm (int32 out, no scaling epilogue; M > 16 only)
"""

from __future__ import annotations

import torch
from timing import copies, time_us

from mixq.kernels import w8a8, w8a16
from mixq.kernels.quant import quant_fp8, quant_int8
from mixq.kernels.w8a8 import scaled_mm_rowwise, w8a8_gemm
from mixq.kernels.w8a16 import w8a16_gemm

FP8 = torch.float8_e4m3fn
OURS = ("fp8_wo", "fp8_w8a8", "fp8_tri", "blk_wo", "blk_w8a8", "i8_wo", "i8_w8a8")
PEERS = ("scaled_mm", "scaled_blk", "int_mm")


def quantize(w: torch.Tensor) -> dict[str, tuple]:
    """RTN of a bf16 [N, K] weight into each layout: (q, scale) per format."""
    n, k = w.shape
    wf = w.float()
    s_ch = wf.abs().amax(1).clamp(min=1e-8) / 448
    fp8_ch = ((wf / s_ch[:, None]).clamp(-448, 448).to(FP8), s_ch)
    nb, kb = -(-n // 128), -(-k // 128)
    pad = torch.nn.functional.pad(wf, (0, kb * 128 - k, 0, nb * 128 - n))
    s_blk = pad.reshape(nb, 128, kb, 128).abs().amax((1, 3)).clamp(min=1e-8) / 448
    q_blk = (pad / s_blk.repeat_interleave(128, 0).repeat_interleave(128, 1))[:n, :k].clamp(-448, 448).to(FP8)
    s_i8 = wf.abs().amax(1).clamp(min=1e-8) / 127
    q_i8 = (wf / s_i8[:, None]).round().clamp(-127, 127).to(torch.int8)
    return {"fp8": fp8_ch, "blk": (q_blk, s_blk.contiguous()), "i8": (q_i8, s_i8)}


def dequant(fmt: str, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    if fmt == "blk":
        n, k = q.shape
        return q.float() * s.repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)[:, :k]
    return q.float() * s[:, None]


def bench_w8(name: str, k: int, n: int, m_list, w_bf16: torch.Tensor) -> list[dict]:
    """Rows {shape, M, <kernel>_us, <kernel>_err, weight bytes} for each M."""
    fmts = quantize(w_bf16)
    rows = [{"shape": name, "M": m} for m in m_list]
    for fmt, (q, s) in fmts.items():
        wbytes = q.numel() + s.numel() * 4
        ws = [(q, s)] + [(q.clone(), s.clone()) for _ in range(copies(wbytes) - 1)]
        ref_w = dequant(fmt, q, s)
        blk = (128, 128) if fmt == "blk" else None
        for row in rows:
            m = row["M"]
            row[f"{fmt}_bytes"] = wbytes
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = x.float() @ ref_w.t()
            paths = _paths(fmt, x, blk)
            for kname, fn in paths.items():
                try:
                    row[f"{kname}_us"] = time_us(fn, ws, name=f"{kname} {name} M={m}")
                    y = fn(q, s)
                    row[f"{kname}_err"] = float((y.float() - ref).norm() / ref.norm())
                except Exception as e:  # a path refusing a shape is reported, not fatal
                    row[f"{kname}_us"] = f"n/a ({type(e).__name__}: {str(e)[:80]})"
            row.update(_peers(fmt, x, ws, blk))
            quant = {"fp8": quant_fp8, "blk": lambda v: quant_fp8(v, 128), "i8": quant_int8}[fmt]
            row[f"{fmt}_quant_us"] = time_us(quant, [(x,)], name=f"quant {fmt}")  # the activation pass alone
        del ref_w
    return rows


def _paths(fmt: str, x: torch.Tensor, blk) -> dict:
    if fmt == "fp8":
        def w8a8_cublas(q, s):
            a, sa = quant_fp8(x)
            return scaled_mm_rowwise(a, sa, q, s, None)

        def w8a8_triton(q, s):
            a, sa = quant_fp8(x)
            return w8a8_gemm(a, sa, q, s, out_dtype=x.dtype)

        return {"fp8_wo": lambda q, s: w8a16_gemm(x, q, s), "fp8_w8a8": w8a8_cublas, "fp8_tri": w8a8_triton}
    if fmt == "blk":
        def block(q, s):
            a, sa = quant_fp8(x, 128)
            return w8a8_gemm(a, sa, q, s, act_group=128, block=blk, out_dtype=x.dtype)

        return {"blk_wo": lambda q, s: w8a16_gemm(x, q, s, block=blk), "blk_w8a8": block}

    def int8(q, s):
        a, sa = quant_int8(x)
        return w8a8_gemm(a, sa, q, s, out_dtype=x.dtype)

    return {"i8_wo": lambda q, s: w8a16_gemm(x, q, s), "i8_w8a8": int8}


def _peers(fmt: str, x: torch.Tensor, ws, blk) -> dict:
    out = {}
    m = x.shape[0]
    try:
        if fmt == "fp8":
            a, sa = quant_fp8(x)
            out["scaled_mm_us"] = time_us(lambda q, s: torch._scaled_mm(
                a, q.t(), scale_a=sa, scale_b=s.view(1, -1), out_dtype=torch.bfloat16), ws, name="scaled_mm")
        elif fmt == "blk":
            a, sa = quant_fp8(x, 128)
            sa_cm = sa.t().contiguous().t()  # cuBLAS wants the 1x128 scales M-major
            sbs = [(q, s.t().contiguous()) for q, s in ws]  # [K/128, N/128] for mat2 = w^T
            out["scaled_blk_us"] = time_us(lambda q, s: torch._scaled_mm(
                a, q.t(), scale_a=sa_cm, scale_b=s, out_dtype=torch.bfloat16), sbs, name="scaled_blk")
        elif m > 16:
            a, _ = quant_int8(x)
            out["int_mm_us"] = time_us(lambda q, s: torch._int_mm(a, q.t()), ws, name="int_mm")
        else:
            out["int_mm_us"] = "n/a (M <= 16)"
    except Exception as e:
        key = {"fp8": "scaled_mm_us", "blk": "scaled_blk_us"}.get(fmt, "int_mm_us")
        out[key] = f"n/a ({type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''})"
    return out


def sweep_w8(cases=None):
    """Time candidate launch configs of w8a16 (small M) and w8a8 (large M); prints the best."""
    import itertools

    cases = cases or [("w8a16", 4096, 28672, 1), ("w8a16", 14336, 4096, 1), ("w8a16", 4096, 4096, 1),
                      ("w8a16", 4096, 2048, 1), ("w8a16", 4096, 28672, 16), ("w8a16", 4096, 28672, 2048),
                      ("w8a8", 4096, 28672, 2048), ("w8a8", 4096, 4096, 256)]
    for kind, k, n, m in cases:
        fmt = "fp8" if kind == "w8a16" else "blk"  # per-channel for the GEMV, blocks for the GEMM
        q, s = quantize(torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02)[fmt]
        ws = [(q, s)] + [(q.clone(), s.clone()) for _ in range(copies(q.numel()) - 1)]
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        if kind == "w8a16":
            mod = w8a16
            fn = lambda q, s, x=x: w8a16_gemm(x, q, s)  # noqa: E731
            if m == 1:  # (BM, BN, BK, SPLIT, warps, stages, swap)
                space = itertools.product([1], [8, 16, 32, 64], [256, 512, 1024], [1, 2, 4], [4, 8], [2, 4], [False])
            elif m <= 64:
                space = itertools.product([16 if m <= 16 else 64], [64, 128], [128], [1, 2, 4, 8], [4], [3, 4],
                                          [True, False])
            else:
                space = [(bm, bn, bk, 1, w, st, sw) for bm, bn, bk, w in
                         [(128, 128, 64, 8), (128, 256, 64, 8), (256, 128, 64, 8), (64, 128, 64, 4)]
                         for st in (3, 4) for sw in (True, False)]
        else:
            mod = w8a8
            a, sa = quant_fp8(x, 128)
            fn = lambda q, s, a=a, sa=sa: w8a8_gemm(a, sa, q, s, act_group=128, block=(128, 128))  # noqa: E731
            space = itertools.product([64, 128], [64, 128, 256], [128], [1], [4, 8], [3, 4])
        default = time_us(fn, ws)
        results = []
        for cfg in space:
            mod.CONFIG_OVERRIDE = cfg
            try:
                results.append((time_us(fn, ws, reps=10, replays=3), cfg))
            except Exception as e:  # a config may not fit shared memory: skip it, say so
                print(f"  {cfg}: {type(e).__name__}")
        mod.CONFIG_OVERRIDE = None
        results.sort()
        best = ", ".join(f"{c} {t:.1f}us" for t, c in results[:4])
        print(f"sweep {kind} K={k} N={n} M={m} ({fmt} weights): default {default:.1f}us; "
              f"best (BM,BN,BK,SPLIT,warps,stages[,swap]): {best}", flush=True)
