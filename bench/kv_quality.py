"""Quality cost of the KV-cache dtype: KL divergence and perplexity against a BF16 KV cache.

The same weights run with --kv-cache-dtype bfloat16 (the reference), float32, fp8_e4m3 and
fp8_e5m2; everything but the cache is identical (model dtype float32 on the CPU unless --dtype says otherwise, the
GPU's bfloat16 there). Text: *The Tempest* (mixq.assets.text; no calibration uses it: the
KV scales are the checkpoint's or 1.0), scored in non-overlapping windows like `mixq
eval-ppl` (each window starts fresh; its first token is not predicted).

Reported per KV dtype, over every scored position t (llama.cpp's KL-divergence scoreboard):
  KLD        mean over t of KL(P_bf16(t) || P_kv(t)) = sum_v P_bf16 log(P_bf16 / P_kv), in nats
  KLD p99    its 99th percentile over positions
  top-1 =    fraction of positions whose most likely token is the reference's
  PPL        exp(mean NLL of the text) with that cache, and its ratio to the reference's

    python bench/kv_quality.py [--max-tokens 4096] [--window 512] [--out kv_quality.json]
    python bench/kv_quality.py --smoke    # the tiny test model, 2 windows (tests run this)

Default model: the embedded SmolLM2-135M in BF16 (--model-path / --config for another).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# bench/kernels.py would shadow the `kernels` package transformers probes for: run from the root
sys.path[0] = str(ROOT)

import torch  # noqa: E402

from mixq.assets.text import load_eval_text  # noqa: E402
from mixq.engine.engine import LLM  # noqa: E402
from mixq.engine.engine_config import resolve_device  # noqa: E402

KV_DTYPES = ("bfloat16", "float32", "fp8_e4m3", "fp8_e5m2")


@torch.inference_mode()
def window_logprobs(engine, ids: list[int], window: int) -> list[torch.Tensor]:
    """Log-softmax [n - 1, vocab] float64 of every window (blocks from the block manager)."""
    manager = engine.scheduler.blocks
    blocks = manager.take(-(-window // manager.block_size))
    try:
        out = []
        for start in range(0, len(ids) - 1, window):
            chunk = ids[start : start + window]
            if len(chunk) < 2:
                break
            out.append(engine.runner.score(chunk, blocks)[:-1].double().log_softmax(-1).cpu())
        return out
    finally:
        manager.release(blocks)


def compare(ref: list[torch.Tensor], got: list[torch.Tensor], ids: list[int], window: int) -> dict:
    kld, nll, same = [], 0.0, 0
    for w, (r, g) in enumerate(zip(ref, got)):
        kld.append((r.exp() * (r - g)).sum(-1))  # KL(ref || got) per position
        targets = torch.tensor(ids[w * window + 1 : w * window + 1 + r.shape[0]])
        nll -= float(g.gather(1, targets[:, None]).sum())
        same += int((r.argmax(-1) == g.argmax(-1)).sum())
    k = torch.cat(kld)
    return {"kld": float(k.mean()), "kld_p99": float(k.quantile(0.99)), "top1_agree": same / k.numel(),
            "ppl": math.exp(nll / k.numel()), "positions": k.numel()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-path")
    ap.add_argument("--config", help="mixed-precision YAML (default: the embedded model's BF16 checkpoint)")
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--out")
    ap.add_argument("--smoke", action="store_true", help="tiny test model, 2 windows of 64")
    a = ap.parse_args()
    if a.smoke:
        a.model_path = str(ROOT / "tests" / "fixtures" / "tiny-llama" / "bf16")
        a.max_tokens, a.window = 128, 64
    elif not a.model_path and not a.config:
        from mixq.assets.default_model import default_model_path

        a.model_path = str(default_model_path())
    if a.dtype == "auto" and resolve_device(a.device).type == "cpu":
        # the engine's CPU default is bf16 where the CPU has it: a bf16 model's K/V are exact
        # in a float32 cache, so the comparison this bench makes needs float32 activations
        a.dtype = "float32"
    results = {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"), "model": a.model_path or a.config,
               "window": a.window, "kv": {}}
    ref, ids = None, None
    for kv in KV_DTYPES:
        llm = LLM(model_path=a.model_path, mixed_precision_config=a.config, device=a.device, dtype=a.dtype,
                  kv_cache_dtype=kv, max_total_tokens=a.window + 64, max_model_len=a.window)
        eng = llm.engine
        if ids is None:
            ids = eng.tokenizer.encode(load_eval_text(8 * a.max_tokens), verbose=False)[: a.max_tokens]
            results["device"] = str(eng.device)
            results["model_dtype"] = str(eng.dtype).removeprefix("torch.")
        lps = window_logprobs(eng, ids, a.window)
        if ref is None:
            ref = lps
        results["kv"][kv] = {**compare(ref, lps, ids, a.window),
                             "bytes_per_token": eng.kv_cache_stats()["bytes_per_token"]}
        llm.close()
    base = results["kv"]["bfloat16"]["ppl"]
    print(f"{results['model']} on {results['device']} (model {results['model_dtype']}), "
          f"{results['kv']['bfloat16']['positions']} positions, window {a.window}; reference: bfloat16 KV")
    print("| KV cache | bytes/token | KLD vs bf16 KV | KLD p99 | top-1 agree | PPL | PPL vs bf16 KV |")
    print("|---|---|---|---|---|---|---|")
    for kv, r in results["kv"].items():
        print(f"| {kv} | {r['bytes_per_token']} | {r['kld']:.2e} | {r['kld_p99']:.2e} | {r['top1_agree']:.2%} | "
              f"{r['ppl']:.3f} | {r['ppl'] / base - 1:+.2%} |")
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
