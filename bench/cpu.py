"""CPU decode and prefill at batch 1: mixq in every format, the default mix, HF transformers
and llama.cpp, on the embedded default model (SmolLM2-135M-Instruct), all in one run.

Configs (each measured in its own process, so its peak RSS is its own):

  hf-fp32, hf-bf16     transformers `generate` (greedy, its default cache) on the BF16 checkpoint
  mixq-bf16            the BF16 checkpoint through the engine at the CPU default dtype
  mixq-bf16@fp32       the same with --dtype float32 (the old CPU default)
  mixq-<fmt>           every decoder Linear in <fmt>: fp8, int8 (W8A8), gptq-int4, awq-int4, and
                       gguf (the GGUF as published: Q4_1 Linears, the Q8_0 embedding as the tied head)
  mixq-default-mix     the default mix (GGUF Q4_1 projections, BF16 where the plan spends its
                       budget, the GGUF's Q8_0 embedding and tied head)
  llama.cpp            llama-cpp-python on the GGUF the default model comes from (Q4_1)

Each process loads, warms up, then times `--reps` times: the prompt (`--prompt-tokens` of
The Tempest) to its first new token (prefill tok/s = prompt tokens / that time) and
`--new-tokens` greedy tokens after it (decode tok/s). Rounds run every config in turn,
the order rotated each round, so a load spike on a shared machine hits them alike; the
table gives the median over all rounds and reps and the min-max spread. Threads are
pinned: `--threads` intra-op threads for torch and llama.cpp alike, and with `--cpus` the
processes' CPU affinity.

    python bench/cpu.py [--threads 2] [--cpus 0,1] [--rounds 3] [--reps 3] [--out cpu.json]
    python bench/cpu.py --smoke      # tiny fixture model, one round: checks the script runs
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# run as a script, bench/ is sys.path[0], and its kernels.py would shadow the `kernels`
# package transformers imports; the checkout's mixq comes first, installed or not
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
FIX = ROOT / "tests" / "fixtures" / "tiny-llama"
FORMATS = ("fp8", "int8", "gptq-int4", "awq-int4", "gguf")


def configs(smoke: bool) -> dict[str, dict]:
    """name -> how to run it."""
    if smoke:
        return {"hf-fp32": {"kind": "hf", "path": str(FIX / "bf16"), "dtype": "float32"},
                "mixq-bf16": {"kind": "mixq", "model_path": str(FIX / "bf16")},
                "mixq-gptq-int4": {"kind": "mixq", "model_path": str(FIX / "gptq-w4a16")},
                "mixq-fp8": {"kind": "mixq", "model_path": str(FIX / "fp8-dynamic")},
                "llama.cpp": {"kind": "llamacpp", "gguf": None}}
    from mixq.assets.default_model import default_eval_configs, gguf_path, prepare_default_model

    root = prepare_default_model()
    evals = default_eval_configs()
    out = {"hf-fp32": {"kind": "hf", "path": str(root / "bf16"), "dtype": "float32"},
           "hf-bf16": {"kind": "hf", "path": str(root / "bf16"), "dtype": "bfloat16"},
           "mixq-bf16": {"kind": "mixq", "model_path": str(root / "bf16")},
           "mixq-bf16@fp32": {"kind": "mixq", "model_path": str(root / "bf16"), "dtype": "float32"}}
    for f in FORMATS:
        out[f"mixq-{f}"] = {"kind": "mixq", "mixed_precision_config": evals[f]}
    out["mixq-default-mix"] = {"kind": "mixq", "mixed_precision_config": evals["default-mix"]}
    out["llama.cpp"] = {"kind": "llamacpp", "gguf": str(gguf_path())}
    return out


def prompt_ids(tokenizer_path: str, n: int) -> list[int]:
    from transformers import AutoTokenizer

    from mixq.assets.text import load_eval_text

    return AutoTokenizer.from_pretrained(tokenizer_path).encode(load_eval_text())[:n]


def timed_runs(gen, new: int, reps: int) -> list[tuple[float, float, float]]:
    """(prefill s, decode s, decode CPU s) per rep: gen(1) runs the prompt to its first token,
    gen(new) the prompt and `new` tokens; decode = the difference (wall clock, and this
    process's CPU time: at one thread a load-independent figure, as other processes' turns
    on the core do not count)."""
    gen(4)  # warm-up
    out = []
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        gen(1)
        t1, c1 = time.perf_counter(), time.process_time()
        gen(new)
        t2, c2 = time.perf_counter(), time.process_time()
        out.append((t1 - t0, (t2 - t1) - (t1 - t0), (c2 - c1) - (c1 - c0)))
    return out


def run_hf(cfg: dict, ids: list[int], new: int, reps: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(cfg["path"], dtype=getattr(torch, cfg["dtype"])).eval()
    x = torch.tensor([ids])

    @torch.no_grad()
    def gen(n):
        return model.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

    times = timed_runs(gen, new, reps)
    weight = sum(p.numel() * p.element_size() for p in {p.data_ptr(): p for p in model.parameters()}.values())
    return {"times": times, "weight_bytes": weight}


def run_mixq(cfg: dict, ids: list[int], new: int, reps: int) -> dict:
    from mixq.engine.engine import LLM
    from mixq.engine.sampling_params import SamplingParams
    from mixq.tracking.memory import get_mixed_precision_memory_stats

    kw = {k: v for k, v in cfg.items() if k != "kind"}
    llm = LLM(device="cpu", max_total_tokens=len(ids) + new + 32, max_running_requests=1, **kw)
    one = SamplingParams(max_new_tokens=1, temperature=0)
    full = SamplingParams(max_new_tokens=new, temperature=0, ignore_eos=True)
    def gen(n):
        llm.generate([ids], one if n == 1 else full if n == new else
                     SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True))

    times = timed_runs(gen, new, reps)
    methods = sorted({m.method.name for m in llm.engine.model.modules() if getattr(m, "method", None) is not None})
    return {"times": times, "weight_bytes": round(get_mixed_precision_memory_stats()["memory_mb"] * 2**20),
            "dtype": str(llm.engine.dtype).removeprefix("torch."), "methods": methods,
            "kv_cache_bytes": llm.engine.kv_cache_bytes}


def run_llamacpp(cfg: dict, ids: list[int], new: int, reps: int, threads: int) -> dict:
    import llama_cpp
    import llama_cpp.llama as llama_module

    # llama.cpp's AMX matmul (ggml_backend_amx_mul_mat, taken for Q4_1 on AMX CPUs) segfaults
    # on this model with llama-cpp-python 0.3.36 on the Sapphire Rapids VM: load the weights
    # into plain CPU buffers (use_extra_bufts=False: no AMX or repacked copies; ggml repacks
    # no Q4_1 layout anyway), which llama-cpp-python's constructor does not expose
    defaults = llama_module.llama_cpp.llama_model_default_params

    def params():
        p = defaults()
        p.use_extra_bufts = False
        return p

    llama_module.llama_cpp.llama_model_default_params = params
    try:
        llm = llama_cpp.Llama(model_path=cfg["gguf"], n_ctx=len(ids) + new + 32, n_threads=threads,
                              n_threads_batch=threads, n_batch=512, verbose=False)
    finally:
        llama_module.llama_cpp.llama_model_default_params = defaults

    def gen(n):
        out = []
        llm.reset()  # no prefix reuse: every run evaluates the whole prompt
        for t in llm.generate(ids, top_k=1, temp=0.0, reset=True):
            out.append(t)
            if len(out) == n:
                return out

    times = timed_runs(gen, new, reps)
    return {"times": times, "weight_bytes": os.path.getsize(cfg["gguf"]),
            "version": llama_cpp.__version__, "note": "use_extra_bufts=False (the AMX matmul crashes)"}


def child(args: argparse.Namespace) -> None:
    """One config in this process; prints one JSON line."""
    if args.cpus:
        os.sched_setaffinity(0, {int(c) for c in args.cpus.split(",")})
    import torch

    torch.set_num_threads(args.threads)
    cfg = configs(args.smoke)[args.one]
    tok_path = str(FIX / "bf16") if args.smoke else str(Path(configs(False)["hf-fp32"]["path"]))
    ids = prompt_ids(tok_path, args.prompt_tokens)
    if cfg["kind"] == "hf":
        out = run_hf(cfg, ids, args.new_tokens, args.reps)
    elif cfg["kind"] == "mixq":
        out = run_mixq(cfg, ids, args.new_tokens, args.reps)
    else:
        out = run_llamacpp(cfg, ids, args.new_tokens, args.reps, args.threads)
    out["prefill_tok_s"] = [len(ids) / p for p, _, _ in out["times"]]
    out["decode_tok_s"] = [(args.new_tokens - 1) / d for _, d, _ in out["times"]]
    out["decode_tok_cpu_s"] = [(args.new_tokens - 1) / c for _, _, c in out["times"]]
    out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    out["prompt_tokens"] = len(ids)
    print("RESULT " + json.dumps(out), flush=True)


def _skip_reason(name: str, cfg: dict) -> str | None:
    if cfg["kind"] != "llamacpp":
        return None
    if cfg["gguf"] is None:
        return "no GGUF for the fixture model"
    try:
        import llama_cpp  # noqa: F401
    except ImportError as e:
        return f"llama-cpp-python is not installed ({e}); pip install llama-cpp-python builds llama.cpp"
    return None


def _fmt_range(v: list[float]) -> str:
    return f"{statistics.median(v):.1f} ({min(v):.1f}-{max(v):.1f})"


def table(results: dict) -> str:
    hf_best = max((statistics.median(r["decode_tok_s"]) for n, r in results.items() if n.startswith("hf-")),
                  default=None)
    ref = {k: statistics.median(results[k]["decode_tok_s"]) for k in ("mixq-bf16", "llama.cpp")
           if "decode_tok_s" in results.get(k, {})}
    head = ["config", "dtype", "decode tok/s median (min-max)", "decode tok per CPU-s", "prefill tok/s median (min-max)",
            "weights MiB", "peak RSS MiB", "decode / HF best", "decode / mixq-bf16", "decode / llama.cpp"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results.items():
        if "skipped" in r:
            rows.append(f"| {name} | - | skipped: {r['skipped']} |" + " |" * (len(head) - 3))
            continue
        d = statistics.median(r["decode_tok_s"])
        ratio = [f"{d / x:.2f}" if x else "-" for x in (hf_best, ref.get("mixq-bf16"), ref.get("llama.cpp"))]
        rows.append(f"| {name} | {r.get('dtype', 'Q4_1 GGUF')} | {_fmt_range(r['decode_tok_s'])} | "
                    f"{_fmt_range(r['decode_tok_cpu_s'])} | "
                    f"{_fmt_range(r['prefill_tok_s'])} | {r['weight_bytes'] / 2**20:.1f} | "
                    f"{statistics.median(r['peak_rss']) / 2**20:.0f} | " + " | ".join(ratio) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: usable cores)")
    p.add_argument("--cpus", help="comma-separated CPU ids to pin every process to (sched_setaffinity)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--reps", type=int, default=3, help="timed runs per config and round")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--only", help="comma-separated config names")
    p.add_argument("--out", help="write the raw results as JSON here")
    p.add_argument("--smoke", action="store_true", help="tiny fixture model, one round, a few tokens")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.rounds, args.reps, args.new_tokens, args.prompt_tokens = 1, 1, 4, 8
    if args.threads is None:
        from mixq.engine.engine_config import usable_cpus

        args.threads = len(args.cpus.split(",")) if args.cpus else usable_cpus()
    if args.one:
        child(args)
        return 0
    cfgs = configs(args.smoke)
    names = [n for n in cfgs if not args.only or n in args.only.split(",")]
    results: dict[str, dict] = {n: {"skipped": why} for n in names if (why := _skip_reason(n, cfgs[n]))}
    run = [n for n in names if n not in results]
    for r in range(args.rounds):
        for name in run[r % len(run):] + run[: r % len(run)]:
            cmd = [sys.executable, __file__, "--one", name, "--threads", str(args.threads), "--reps", str(args.reps),
                   "--new-tokens", str(args.new_tokens), "--prompt-tokens", str(args.prompt_tokens)]
            cmd += ["--smoke"] if args.smoke else []
            cmd += ["--cpus", args.cpus] if args.cpus else []
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                raise SystemExit(f"{name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
            out = json.loads(line.removeprefix("RESULT "))
            lists = ("decode_tok_s", "decode_tok_cpu_s", "prefill_tok_s")
            acc = results.setdefault(name, {**{k: [] for k in lists}, "peak_rss": []})
            for k in lists:
                acc[k] += out[k]
            acc["peak_rss"].append(out["peak_rss_bytes"])
            acc.update({k: v for k, v in out.items() if k not in (*lists, "times")})
            if cfgs[name].get("dtype") and "dtype" not in out:
                acc["dtype"] = cfgs[name]["dtype"]
            print(f"round {r + 1}/{args.rounds} {name}: decode {statistics.median(out['decode_tok_s']):.1f} tok/s, "
                  f"prefill {statistics.median(out['prefill_tok_s']):.1f} tok/s, "
                  f"peak RSS {out['peak_rss_bytes'] / 2**20:.0f} MiB", flush=True)
    results = {n: results[n] for n in names}
    import torch

    meta = {"date": str(date.today()), "machine": f"{platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f} at the end", "torch": torch.__version__,
            "threads": args.threads, "cpus": args.cpus, "rounds": args.rounds, "reps": args.reps,
            "new_tokens": args.new_tokens, "prompt_tokens": args.prompt_tokens,
            "command": "python bench/cpu.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    print(json.dumps(meta))
    print(table(results))
    if args.out:
        Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
