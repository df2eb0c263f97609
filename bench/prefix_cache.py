"""Prefix caching: prefill tokens saved and time to first token with a shared system prompt.

N concurrent requests share one long system prompt (default 2048 tokens of *The Tempest*),
each followed by its own question (~30 tokens), greedy, a few new tokens each. Two engines
on the same model, started once each, serve the same workload in the same run: prefix
caching on (the default) and off (--disable-radix-cache). Two waves per engine:

  cold  the N requests arrive at once on an empty cache
  warm  N more (other questions) arrive after the first wave finished: the system prompt
        is already cached

Reported per engine and wave: prompt tokens admitted, tokens computed (admitted minus
found in the cache), time to first token (mean, median, max over the N requests: from
add_request to the step that sampled its first token) and the wave's wall time. Greedy
tokens of the two engines are compared (they must agree: the cache changes which blocks
hold the K/V, not the math).

    python bench/prefix_cache.py [--requests 16] [--system-tokens 2048] [--out results.json]
    python bench/prefix_cache.py --smoke   # the tiny test model, short prompt (tests run this)

Default model: the embedded default mix (SmolLM2-135M); --model-path / --config for another.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# bench/kernels.py would shadow the `kernels` package transformers probes for: run from the root
sys.path[0] = str(ROOT)

from mixq.assets.text import load_eval_text  # noqa: E402
from mixq.engine.engine import LLM  # noqa: E402
from mixq.engine.sampling_params import SamplingParams  # noqa: E402

QUESTIONS = ["Who speaks first in this scene, and why?", "Summarise the passage in one line.",
             "Which character is angriest?", "Where does the scene take place?",
             "What does the storm stand for?", "Name two characters who appear.",
             "What happens to the ship?", "Is anyone lost at sea?"]


def workload(tok, system_tokens: int, n: int, wave: int, random_ids: bool = False, seed: int = 0) -> list[list[int]]:
    """n prompts: one shared system prompt (The Tempest) + a question of its own each. With
    random_ids (a random-weight checkpoint whose tokenizer knows no English), random token ids
    of the same lengths: one shared prefix of system_tokens, then 24 ids per request."""
    if random_ids:
        import torch

        g = torch.Generator().manual_seed(seed)
        system = torch.randint(3, len(tok), (system_tokens,), generator=g).tolist()
        g.manual_seed(seed + 1000 * (wave + 1))
        return [system + torch.randint(3, len(tok), (24,), generator=g).tolist() for _ in range(n)]
    system = tok.encode(load_eval_text(6 * system_tokens), verbose=False)[:system_tokens]
    if len(system) < system_tokens:
        raise ValueError(f"the text gave {len(system)} tokens, fewer than --system-tokens {system_tokens}")
    out = []
    for i in range(n):
        q = f"\n\nQuestion {wave}.{i}: {QUESTIONS[(i + wave) % len(QUESTIONS)]} (ask #{i * 7 + wave})\nAnswer:"
        out.append(system + tok.encode(q))
    return out


def run_wave(llm: LLM, prompts: list[list[int]], new_tokens: int, tag: str) -> dict:
    eng = llm.engine
    sched = eng.scheduler
    admitted0, cached0 = sched.admitted_tokens, sched.cached_tokens
    sp = SamplingParams(max_new_tokens=new_tokens, temperature=0, ignore_eos=True)
    t0 = time.perf_counter()
    start = {}
    for i, p in enumerate(prompts):
        rid = f"{tag}-{i}"
        eng.add_request(rid, p, sp)
        start[rid] = time.perf_counter()
    ttft, tokens = {}, {}
    while eng.has_unfinished():
        for o in eng.step():
            if o.request_id not in ttft and o.outputs[0].token_ids:
                ttft[o.request_id] = time.perf_counter() - start[o.request_id]
            if o.finished:
                tokens[o.request_id] = o.outputs[0].token_ids
    wall = time.perf_counter() - t0
    t = sorted(ttft.values())
    admitted = sched.admitted_tokens - admitted0
    cached = sched.cached_tokens - cached0
    return {"requests": len(prompts), "prompt_tokens": sum(map(len, prompts)), "admitted_tokens": admitted,
            "cached_tokens": cached, "computed_tokens": admitted - cached,
            "ttft_mean_s": statistics.fmean(t), "ttft_median_s": statistics.median(t), "ttft_max_s": t[-1],
            "wall_s": wall, "tokens": [tokens[f"{tag}-{i}"] for i in range(len(prompts))]}


def tokens_only(prompts_by_wave: list[list[list[int]]], page: int, budget: int, new_tokens: int) -> dict:
    """The prefill accounting alone (no model: the scheduler with a fake sampled token):
    tokens computed per wave with the prefix cache on and off."""
    from mixq.engine.scheduler import Scheduler, SchedulerConfig
    from mixq.engine.sequence import Sequence

    out = {}
    for name, caching in (("cache on", True), ("cache off", False)):
        n = len(prompts_by_wave[0])
        longest = max(len(p) for w in prompts_by_wave for p in w) + new_tokens
        sched = Scheduler(SchedulerConfig(num_blocks=2 * n * -(-longest // page), block_size=page,
                                          max_running_requests=n, max_model_len=longest,
                                          chunked_prefill_size=budget, enable_prefix_caching=caching))
        waves = {}
        for w, prompts in zip(("cold", "warm"), prompts_by_wave):
            a0, c0 = sched.admitted_tokens, sched.cached_tokens
            for i, p in enumerate(prompts):
                sched.add(Sequence(f"{w}{i}", p, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)))
            while sched.has_unfinished():
                b = sched.schedule()
                sched.postprocess(b, [7] * sum(1 for it in b.items if it.samples))
            waves[w] = {"admitted_tokens": sched.admitted_tokens - a0, "cached_tokens": sched.cached_tokens - c0,
                        "computed_tokens": sched.admitted_tokens - a0 - (sched.cached_tokens - c0)}
        out[name] = waves
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-path")
    ap.add_argument("--config", help="mixed-precision YAML (default: the embedded default mix)")
    ap.add_argument("--embedded-bf16", action="store_true", help="the embedded model's BF16 checkpoint")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--system-tokens", type=int, default=2048)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--chunked-prefill-size", type=int, default=2048)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--random-ids", action="store_true",
                    help="random token ids instead of text (checkpoints with random weights, e.g. bench/engine.py's)")
    ap.add_argument("--out")
    ap.add_argument("--smoke", action="store_true", help="tiny test model, 3 requests, 100-token system prompt")
    ap.add_argument("--tokens-only", action="store_true",
                    help="only the prefill accounting, through the scheduler without a model (seconds)")
    a = ap.parse_args()
    if a.smoke:
        a.model_path = str(ROOT / "tests" / "fixtures" / "tiny-llama" / "bf16")
        a.requests, a.system_tokens, a.new_tokens, a.chunked_prefill_size = 3, 100, 2, 64
    elif a.embedded_bf16:
        from mixq.assets.default_model import default_model_path

        a.model_path = str(default_model_path())
    elif not a.model_path and not a.config:
        from mixq.assets.default_model import default_config_path

        a.config = str(default_config_path())
    results = {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"), "host": platform.node(),
               "engines": {}}
    if a.tokens_only:
        from transformers import AutoTokenizer

        from mixq.engine.engine import EngineConfig, load_plan

        plan, _ = load_plan(EngineConfig(model_path=a.model_path, mixed_precision_config=a.config))
        tok = AutoTokenizer.from_pretrained(str(plan.base.path))
        waves = [workload(tok, a.system_tokens, a.requests, i, a.random_ids) for i in range(2)]
        r = tokens_only(waves, 16, a.chunked_prefill_size, a.new_tokens)
        print(f"{a.requests} requests, {a.system_tokens}-token shared system prompt, page 16 (scheduler only)")
        for name, ws in r.items():
            for w, x in ws.items():
                print(f"{name} {w}: admitted {x['admitted_tokens']}, found in cache {x['cached_tokens']}, "
                      f"computed {x['computed_tokens']}")
        if a.out:
            Path(a.out).write_text(json.dumps({**results, "tokens_only": r}, indent=1))
        return
    for name, disable in (("cache on", False), ("cache off", True)):
        llm = LLM(model_path=a.model_path, mixed_precision_config=a.config, device=a.device,
                  disable_radix_cache=disable, chunked_prefill_size=a.chunked_prefill_size,
                  max_running_requests=max(a.requests, 1), max_model_len=a.system_tokens + 128 + a.new_tokens,
                  max_total_tokens=2 * a.requests * (a.system_tokens + 64 + a.new_tokens))
        tok = llm.engine.tokenizer
        if not results.get("device"):
            import torch

            results["device"] = str(llm.engine.device) + (
                f" ({torch.cuda.get_device_name()})" if llm.engine.device.type == "cuda" else
                f" ({torch.get_num_threads()} threads)")
            results["model"] = a.model_path or a.config
        # first-call costs off the clock (kernel compiles for a long prefill, and with the cache
        # on, for a short extend over a long cached prefix), on prompts that share no block
        # with the workload: one request, then two more with its prefix
        warm = workload(tok, a.system_tokens, 3, 0, random_ids=True, seed=7)
        run_wave(llm, warm[:1], 2, "warmup0")
        run_wave(llm, warm[1:], 2, "warmup1")
        waves = {w: run_wave(llm, workload(tok, a.system_tokens, a.requests, i, a.random_ids), a.new_tokens, w)
                 for i, w in enumerate(("cold", "warm"))}
        results["engines"][name] = waves
        llm.close()
    on, off = results["engines"]["cache on"], results["engines"]["cache off"]
    for w in ("cold", "warm"):
        diff = sum(x != y for x, y in zip(on[w]["tokens"], off[w]["tokens"]))
        results[f"{w}_greedy_differ"] = diff
        if diff:
            print(f"note: {w}: {diff} of {a.requests} requests' greedy tokens differ between cache on and off")
    print(f"{results['device']}, {results['model']}: {a.requests} requests, {a.system_tokens}-token shared "
          "system prompt")
    print("| engine | wave | prompt tokens | computed | found in cache | TTFT mean s | TTFT median s | TTFT max s "
          "| wave wall s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, waves in results["engines"].items():
        for w, r in waves.items():
            print(f"| {name} | {w} | {r['prompt_tokens']} | {r['computed_tokens']} | {r['cached_tokens']} | "
                  f"{r['ttft_mean_s']:.2f} | {r['ttft_median_s']:.2f} | {r['ttft_max_s']:.2f} | {r['wall_s']:.2f} |")
    for w in ("cold", "warm"):
        print(f"{w}: prefill tokens computed {off[w]['computed_tokens']} -> {on[w]['computed_tokens']} "
              f"({1 - on[w]['computed_tokens'] / off[w]['computed_tokens']:.0%} saved), mean TTFT "
              f"{off[w]['ttft_mean_s']:.2f} -> {on[w]['ttft_mean_s']:.2f} s "
              f"({off[w]['ttft_mean_s'] / on[w]['ttft_mean_s']:.1f}x)")
    if a.out:
        for waves in results["engines"].values():
            for r in waves.values():
                r.pop("tokens")
        Path(a.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
