"""KV-cache capacity: bytes per token and concurrent long-context requests, FP8 vs BF16 KV.

For each --kv-cache-dtype the engine is started on the same model with the same KV-cache
byte budget; reported from what it allocated (the cache tensors' bytes, not a formula):
bytes per token, tokens the cache holds, and how many requests of --context tokens fit at
once (whole blocks each; what the scheduler can keep running without preempting). Then a
block-manager check: that many --context-token sequences are held together and one
more does not.

    python bench/kv_capacity.py [--budget-gib 4] [--context 8192] [--out kv_capacity.json]
    python bench/kv_capacity.py --gpu-memory   # CUDA: size from --mem-fraction-static instead
    python bench/kv_capacity.py --smoke        # the tiny test model (tests run this)

Default model: the embedded SmolLM2-135M (BF16 checkpoint).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# bench/kernels.py would shadow the `kernels` package transformers probes for: run from the root
sys.path[0] = str(ROOT)

from mixq.engine.block_manager import BlockManager  # noqa: E402
from mixq.engine.engine import LLM  # noqa: E402
from mixq.engine.sampling_params import SamplingParams  # noqa: E402
from mixq.engine.sequence import Sequence  # noqa: E402

KV_DTYPES = ("bfloat16", "fp8_e4m3")


def fits_together(num_blocks: int, page: int, context: int) -> int:
    """How many context-token sequences the block manager holds at once (one more is refused)."""
    bm = BlockManager(num_blocks, page, enable_caching=False)
    n = 0
    while True:
        s = Sequence(f"r{n}", [n + 1] * context, SamplingParams(max_new_tokens=1))
        if not bm.can_allocate(s, [], context):
            return n
        bm.allocate(s, [], context)
        n += 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-path")
    ap.add_argument("--config")
    ap.add_argument("--budget-gib", type=float, default=4.0, help="KV-cache bytes for every dtype")
    ap.add_argument("--gpu-memory", action="store_true", help="size the cache from --mem-fraction-static (CUDA)")
    ap.add_argument("--mem-fraction-static", type=float, default=0.85)
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out")
    ap.add_argument("--smoke", action="store_true")
    a = ap.parse_args()
    if a.smoke:
        a.model_path = str(ROOT / "tests" / "fixtures" / "tiny-llama" / "bf16")
        a.budget_gib, a.context = 1 / 1024, 256
    elif not a.model_path and not a.config:
        from mixq.assets.default_model import default_model_path

        a.model_path = str(default_model_path())
    results = {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"), "model": a.model_path or a.config,
               "context": a.context, "kv": {}}
    for kv in KV_DTYPES:
        kw = dict(model_path=a.model_path, mixed_precision_config=a.config, device=a.device, kv_cache_dtype=kv,
                  page_size=a.page_size, max_model_len=a.context, max_running_requests=1)
        if not a.gpu_memory:  # the same byte budget for every dtype
            probe = LLM(**kw, max_total_tokens=a.page_size).engine
            per = probe.kv_cache_stats()["bytes_per_token"]
            kw["max_total_tokens"] = int(a.budget_gib * 2**30 // per)
            del probe
        else:
            kw["mem_fraction_static"] = a.mem_fraction_static
        eng = LLM(**kw).engine
        held = sum(m.k_cache.nbytes + m.v_cache.nbytes for m in eng.runner.attn_layers)
        blocks = eng.scheduler.blocks.num_blocks
        per_token = held // ((blocks + 1) * a.page_size)  # the runner keeps one scratch block past the scheduler's
        results["device"] = str(eng.device)
        results["kv"][kv] = {"bytes_per_token": per_token, "cache_bytes": held, "tokens": blocks * a.page_size,
                             "requests_at_context": blocks // -(-a.context // a.page_size),
                             "admitted_together": fits_together(blocks, a.page_size, a.context)}
        del eng
        gc.collect()  # the next engine sizes its cache from the GPU's free memory (it empties torch's cache first)
    print(f"{results['model']} on {results['device']}, context {a.context} tokens, page {a.page_size}"
          + ("" if a.gpu_memory else f", KV budget {a.budget_gib:g} GiB"))
    print("| KV cache | bytes/token | cache GiB | tokens | requests at full context | admitted together |")
    print("|---|---|---|---|---|---|")
    for kv, r in results["kv"].items():
        print(f"| {kv} | {r['bytes_per_token']} | {r['cache_bytes'] / 2**30:.3f} | {r['tokens']} | "
              f"{r['requests_at_context']} | {r['admitted_together']} |")
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
