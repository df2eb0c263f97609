"""GGUF block types in our kernels vs dequantize-then-cuBLAS and vs wna16 on the same bits.

For each type (q4_0, q4_1, q8_0 through wna16; q5_0, q5_1, q4_k, q5_k, q6_k through the ggml
kernel) a random weight in that type's blocks is prepared by its LinearMethod (the repack
the engine does once) and timed per call, next to:
  - dequant+cuBLAS: the torch reference (dequantize the blocks to BF16, then matmul), what a
    GPU run would cost without a kernel for the type;
  - cuBLAS BF16 on the dense weight (no dequantization; the speed-of-light peer);
  - wna16 on the same bits: INT4 g32 with uint8 zeros for the 4-bit types, INT8 g32 for the
    5/6-bit ones (wna16 has no 5/6-bit packing), the closest layout our kernels had before.
Relative error against a float32 product of gguf's dequantized weight.

    python bench/kernels.py --gguf [--quick]        (CUDA; tables per shape)
    python bench/kernels_gguf.py --smoke            (CPU interpreter: one tiny shape, no timing)
"""

from __future__ import annotations

import argparse
import os
import sys

if __name__ == "__main__" and "--smoke" in sys.argv:  # before triton.jit decorates the kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from mixq.formats.gguf import gguf_spec  # noqa: E402
from mixq.formats.gguf_quants import QUANT_TYPES, dequantize  # noqa: E402
from mixq.formats.spec import QuantizedWeight  # noqa: E402
from mixq.kernels.methods import GGMLMethod, WNA16Method  # noqa: E402
from mixq.kernels.wna16 import pack_wna16, wna16_gemm  # noqa: E402

TYPES = ("q4_0", "q4_1", "q8_0", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k")


def random_blocks(qtype: str, n: int, k: int, seed: int = 0) -> torch.Tensor:
    """uint8 [N, K/B, T]: random bits with every fp16 scale in a sane range."""
    t = QUANT_TYPES[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (n, k // t.block, t.nbytes), dtype=np.uint8)
    scale_at = {"q4_k": (0, 2), "q5_k": (0, 2), "q6_k": (208,), "q4_1": (0, 2), "q5_1": (0, 2)}.get(qtype, (0,))
    for pos in scale_at:
        d = (rng.random(raw.shape[:2]) * 2e-3 + 1e-4).astype(np.float16)
        raw[..., pos:pos + 2] = d.view(np.uint8).reshape(*raw.shape[:2], 2)
    return torch.from_numpy(raw)


def bench_gguf(name: str, k: int, n: int, m_list, device="cuda", timer=None) -> list[dict]:
    """Rows {shape, M, type, ours_us, dequant_cublas_us, cublas_bf16_us, wna16_us, bytes, rel_err}."""
    from timing import copies, time_us

    timer = timer or time_us
    rows = []
    for qtype in TYPES:
        blocks = random_blocks(qtype, n, k).to(device)
        qw = QuantizedWeight("w", gguf_spec(qtype), (n, k), {"blocks": blocks})
        method = WNA16Method() if qtype in ("q4_0", "q4_1", "q8_0") else GGMLMethod()
        prep = method.prepare(qw, torch.bfloat16)
        nbytes = sum(t.numel() * t.element_size() for t in prep.tensors.values())
        c = copies(nbytes) if device == "cuda" else 1
        preps = [prep] + [method.prepare(qw, torch.bfloat16) for _ in range(c - 1)]
        dense = dequantize(blocks, qtype).to(torch.bfloat16)
        dq_blocks = [blocks] + [blocks.clone() for _ in range(c - 1)]
        bits = 4 if qtype.startswith("q4") else 8
        q = torch.randint(0, 2**bits, (n, k), device=device, dtype=torch.int32).to(torch.uint8)
        s = torch.rand(n, k // 32, device=device).half() * 1e-2
        z = torch.randint(0, 2**bits, (n, k // 32), device=device) if bits == 4 else None
        w16 = [pack_wna16(q, s, z, bits, 32) for _ in range(c)]
        for m in m_list:
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            y = method.apply(prep, x, None)
            ref = x.float() @ dense.float().t()
            err = ((y.float() - ref).norm() / ref.norm()).item()
            rows.append({
                "shape": name, "M": m, "type": qtype, "method": method.name, "bytes": nbytes,
                "rel_err": err,
                "ours_us": timer(lambda p, x=x, mt=method: mt.apply(p, x, None), [(p,) for p in preps]),
                "dequant_cublas_us": timer(lambda b, x=x, qt=qtype: x @ dequantize(b, qt).to(torch.bfloat16).t(),
                                           [(b,) for b in dq_blocks]),
                "cublas_bf16_us": timer(lambda d, x=x: x @ d.t(), [(dense,)] * c),
                "wna16_us": timer(lambda w, x=x: wna16_gemm(x, w), [(w,) for w in w16]),
                "wna16_peer": f"int{bits} g32{' asym' if z is not None else ''}",
            })
        del preps, dq_blocks, w16, dense
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def print_gguf(rows, bw: float | None = None) -> None:
    print("\nGGUF types: our kernel vs dequant+cuBLAS, cuBLAS BF16 (dense) and wna16 on the same bits:\n")
    print("| shape | M | type | method | ours us | GB/s | % copy BW | dequant+cuBLAS us | cuBLAS BF16 us | "
          "wna16 (peer) us | vs dequant+cuBLAS | vs wna16 | rel err |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        gbs = r["bytes"] / (r["ours_us"] * 1e-6) / 1e9
        pct = f"{100 * gbs * 1e9 / bw:.0f}%" if bw else "-"
        print(f"| {r['shape']} | {r['M']} | {r['type']} | {r['method']} | {r['ours_us']:.1f} | {gbs:.0f} | {pct} | "
              f"{r['dequant_cublas_us']:.1f} | {r['cublas_bf16_us']:.1f} | {r['wna16_us']:.1f} ({r['wna16_peer']}) | "
              f"{r['dequant_cublas_us'] / r['ours_us']:.2f}x | {r['wna16_us'] / r['ours_us']:.2f}x | "
              f"{r['rel_err']:.1e} |")


def _smoke() -> None:
    """Every path once on the CPU under the Triton interpreter (no timing): the script runs."""
    os.environ.setdefault("MIXQ_TRITON_INTERPRET_METHODS", "1")
    rows = bench_gguf("smoke 256x64", 256, 64, (1, 3), device="cpu", timer=lambda fn, args: (fn(*args[0]), 1.0)[1])
    print_gguf(rows)
    assert all(r["rel_err"] < 2e-2 for r in rows), rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    if ap.parse_args().smoke:
        _smoke()
