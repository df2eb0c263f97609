"""CPU decode's per-layer ops, one call each, against the torch code they replaced (same run).

Shapes of the embedded default model (SmolLM2-135M: hidden 576, 9 heads / 3 KV heads of 64,
16-token KV pages, tied 49152 x 576 head), one row (decode) unless said:

  attention   SDPA on 3-d tensors (torch's math fallback) vs 4-d (its CPU flash kernel),
              decode at 160 and 1000 tokens of context, and a 128-token causal prefill
  kv gather   a sequence's KV pages by advanced indexing vs index_select
  rms norm    the torch code (residual add + ~8 ops) vs mixq.kernels.cpu_elementwise
  rotary      the torch code on q [1, 9, 64] and k [1, 3, 64] vs the C call
  q8_0 head   mixq's q8_0 GEMV on the 49152 x 576 blocks (28.7 MB) vs torch.mv on the same
              weight in bf16 (56.6 MB), warm and after a 300 MB copy evicts the caches

Median of --reps timed calls after warm-up, one intra-op thread (pin the process with
taskset for stable figures). Prints a markdown table; --out writes JSON.

    taskset -c 0 python bench/cpu_ops.py [--reps 200] [--out ops.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path[0] = str(Path(__file__).resolve().parents[1])  # bench/kernels.py would shadow `kernels`

from mixq.kernels import cpu_elementwise, cpu_gguf  # noqa: E402
from mixq.layers.norm import rms_norm_torch  # noqa: E402
from mixq.layers.rotary import RotaryEmbedding, _rotate  # noqa: E402

H, HKV, D, PAGE, HIDDEN, VOCAB = 9, 3, 64, 16, 576, 49152


def median_us(fn, reps: int, before=None) -> float:
    """Median µs of fn() over reps calls (each after `before()` when given, untimed)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        if before is not None:
            before()
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e6)
    return statistics.median(times)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def attention_rows(reps: int, g: torch.Generator) -> list[dict]:
    rows = []
    for ctx, nq in ((160, 1), (1000, 1), (128, 128)):
        q = torch.randn(nq, H, D, generator=g).bfloat16()
        k = torch.randn(ctx, HKV, D, generator=g).bfloat16()
        v = torch.randn(ctx, HKV, D, generator=g).bfloat16()
        mask = torch.ones(nq, ctx, dtype=torch.bool).tril(ctx - nq) if nq > 1 else None
        q3, k3, v3 = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)

        def three(q3=q3, k3=k3, v3=v3, mask=mask):
            return F.scaled_dot_product_attention(q3, k3, v3, attn_mask=mask, scale=D**-0.5, enable_gqa=True)

        def four(q3=q3, k3=k3, v3=v3, mask=mask):
            return F.scaled_dot_product_attention(q3[None], k3[None], v3[None], attn_mask=mask, scale=D**-0.5,
                                                  enable_gqa=True)[0]

        kr, vr = (t.double().repeat_interleave(H // HKV, 0) for t in (k3, v3))  # GQA: head h reads h // 3
        scores = q3.double() @ kr.transpose(1, 2) * D**-0.5
        ref = torch.softmax(scores if mask is None else scores.masked_fill(~mask, float("-inf")), -1) @ vr
        r = max(3, reps // (10 if nq > 1 or ctx > 500 else 1))
        rows.append({"op": f"attention {'prefill' if nq > 1 else 'decode'} ctx {ctx}", "before": "3-d SDPA (math)",
                     "after": "4-d SDPA (flash)", "before_us": median_us(three, r), "after_us": median_us(four, r),
                     "before_err": rel_err(three(), ref), "after_err": rel_err(four(), ref)})
    kc = torch.randn(256, PAGE, HKV, D, generator=g).bfloat16()
    pages = torch.randperm(256, generator=g)[:10].int()
    rows.append({"op": "kv gather, 10 pages", "before": "cache[pages]", "after": "index_select",
                 "before_us": median_us(lambda: kc[pages], reps), "after_us": median_us(lambda: kc.index_select(0, pages), reps),
                 "before_err": 0.0, "after_err": rel_err(kc.index_select(0, pages), kc[pages.long()])})
    return rows


def elementwise_rows(reps: int, g: torch.Generator) -> list[dict]:
    x = (torch.randn(1, HIDDEN, generator=g) * 3).bfloat16()
    res = torch.randn(1, HIDDEN, generator=g).bfloat16()
    w = (1 + 0.1 * torch.randn(HIDDEN, generator=g)).bfloat16()

    def torch_norm():
        return rms_norm_torch(x, res, w, 1e-5)[0]

    exact = (x.double() + res.double()).bfloat16().double()
    exact = w.double() * exact / (exact.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt()
    rows = [{"op": "rms norm + residual, 1 x 576", "before": "torch ops", "after": "C call",
             "before_us": median_us(torch_norm, reps),
             "after_us": median_us(lambda: cpu_elementwise.add_rms_norm(x, res, w, 1e-5), reps),
             "before_err": rel_err(torch_norm(), exact),
             "after_err": rel_err(cpu_elementwise.add_rms_norm(x, res, w, 1e-5)[0], exact)}]
    rope = RotaryEmbedding(D, 8192, {"rope_theta": 100000.0})
    qkv = torch.randn(1, (H + 2 * HKV) * D, generator=g).bfloat16()
    q, k, _ = qkv.split([H * D, HKV * D, HKV * D], -1)
    q, k = q.view(1, H, D), k.view(1, HKV, D)
    pos = torch.tensor([160])

    def torch_rotary():  # RotaryEmbedding.forward's torch code
        c, s = rope.cos[pos].unsqueeze(1), rope.sin[pos].unsqueeze(1)
        return [_rotate(q, c, s), _rotate(k, c, s)]

    c_q, _ = cpu_elementwise.rotary_neox(pos, q, k, rope.cos, rope.sin)
    rows.append({"op": "rotary q 1x9x64 + k 1x3x64", "before": "torch ops", "after": "C call",
                 "before_us": median_us(torch_rotary, reps),
                 "after_us": median_us(lambda: cpu_elementwise.rotary_neox(pos, q, k, rope.cos, rope.sin), reps),
                 "before_err": 0.0, "after_err": rel_err(c_q, torch_rotary()[0])})
    return rows


def head_rows(reps: int, g: torch.Generator) -> list[dict]:
    from mixq.formats.gguf_quants import dequantize_blocks

    blocks = torch.randint(0, 256, (VOCAB, HIDDEN // 32, 34), dtype=torch.uint8, generator=g)
    blocks[:, :, :2] = (torch.rand(VOCAB, HIDDEN // 32, generator=g) * 0.01 + 1e-3).half() \
        .view(torch.uint8).view(VOCAB, HIDDEN // 32, 2)
    w = dequantize_blocks(blocks, "q8_0").bfloat16()
    x = torch.randn(1, HIDDEN, generator=g).bfloat16()
    ref = x.double() @ dequantize_blocks(blocks, "q8_0").double().t()
    junk, sink = torch.empty(300 << 20, dtype=torch.uint8), torch.empty(300 << 20, dtype=torch.uint8)
    r = max(3, reps // 20)
    rows = []
    for cold in (False, True):
        before = (lambda: sink.copy_(junk)) if cold else None
        rows.append({"op": f"tied head 49152 x 576, {'cold' if cold else 'warm'}", "before": "torch.mv bf16 (56.6 MB)",
                     "after": "q8_0 GEMV (28.7 MB)",
                     "before_us": median_us(lambda: torch.mv(w, x[0]), r, before),
                     "after_us": median_us(lambda: cpu_gguf.q8_0_linear(x, blocks, torch.float32), r, before),
                     "before_err": rel_err(torch.mv(w, x[0])[None], ref),
                     "after_err": rel_err(cpu_gguf.q8_0_linear(x, blocks, torch.float32), ref)})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    ok, why = cpu_elementwise.available()
    if not ok or not cpu_gguf.available()[0]:
        raise SystemExit(f"the CPU kernels are not built here: {why or cpu_gguf.available()[1]}")
    g = torch.Generator().manual_seed(0)
    rows = attention_rows(a.reps, g) + elementwise_rows(a.reps, g) + head_rows(a.reps, g)
    print(f"# CPU decode ops, {platform.processor() or platform.machine()}, torch {torch.__version__}, one thread")
    print("| op | before | after | before µs | after µs | speedup | before err | after err |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['op']} | {r['before']} | {r['after']} | {r['before_us']:.1f} | {r['after_us']:.1f} | "
              f"{r['before_us'] / r['after_us']:.1f}x | {r['before_err']:.1e} | {r['after_err']:.1e} |")
    if a.out:
        Path(a.out).write_text(json.dumps({"date": datetime.datetime.now().isoformat(timespec="seconds"),
                                           "command": " ".join(sys.argv), "torch": torch.__version__,
                                           "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
