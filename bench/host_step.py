"""Host time of an engine step with the model made free: what the engine's Python adds per
decode step, by batch size (issue 18 point 5), on the CPU.

The engine is the real one (scheduler, block tables, the decode-graph input path of
mixq.engine.cuda_graph run with capture=False, sampler, overlap schedule, stop checks,
detokenization, outputs) on the tiny-Llama fixture's tokenizer and config; only the
model is replaced by a stub whose logits are one row gather from a fixed random table
(logits of token t = table[t]), so greedy decoding walks a varied, reproducible chain of
tokens and the detokenizer sees real text. What remains per step is the host work a GPU
step also pays: the sampler's torch ops on a 256-word vocabulary cost on the CPU about what
their launches cost on a GPU; what a GPU step adds besides (host-to-device copies, the event
sync, the replay launch) is not seen here. No GPU claims rest on these figures.

A decode step's time is (a generate of N tokens - a generate of 1 token) / (N - 1), the
fastest of --repeats, as in bench/engine.py. `--baseline REV` measures the engine of git
revision REV (its mixq/ extracted to a temporary directory) in the same run, alternating
with this tree's, so before and after share the machine's load. `--profile B` prints
cProfile's top functions of one generate at batch B.

    python bench/host_step.py --batches 1,16,64 --new-tokens 64 --baseline main
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# bench/kernels.py would shadow the `kernels` package transformers probes for; a --child takes
# mixq from its PYTHONPATH (the tree being measured), the parent from this tree
if "--child" in sys.argv:
    sys.path.pop(0)
else:
    sys.path[0] = str(ROOT)
FIX = ROOT / "tests" / "fixtures" / "tiny-llama" / "bf16"


def free_model_engine(overlap: bool, max_batch: int, graphs: bool = True):
    """An LLM on the tiny-Llama fixture whose model is a free stub (see the module docstring)."""
    import torch
    from torch import nn

    from mixq.engine.cuda_graph import DecodeGraphs
    from mixq.engine.engine import LLM

    llm = LLM(model_path=str(FIX), device="cpu", dtype="float32", max_running_requests=max_batch,
              max_total_tokens=max_batch * 256, disable_overlap_schedule=not overlap, disable_radix_cache=True)
    eng = llm.engine
    vocab = eng.model_config.vocab_size
    table = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(0))
    table[:, :3] = -1e9  # never <unk>, <s>, </s>: every sequence runs its full length

    class Free(nn.Module):
        def forward(self, ids, batch):
            return ids  # "hidden" = the ids; the LM head looks them up

        def compute_logits(self, hidden):
            return table[hidden.clamp(min=0)]

    runner = eng.runner
    runner.model = Free()
    if graphs:  # the decode-graph input path a GPU step takes (padding buckets, static buffers)
        from mixq.engine.cuda_graph import graph_batch_sizes

        g = DecodeGraphs(runner, graph_batch_sizes(max_batch), -(-eng.max_model_len // runner.block_size),
                         capture=False)
        g.capture_all()
        runner.graphs = g
    return llm


def step_us(llm, batch: int, new: int, repeats: int, prompt_len: int = 16) -> float:
    """Microseconds per decode step at `batch` sequences (see the module docstring)."""
    import random

    from mixq.engine.sampling_params import SamplingParams

    rng = random.Random(batch)
    prompts = [[rng.randrange(3, 256) for _ in range(prompt_len)] for _ in range(batch)]

    def gen(n):
        t = time.perf_counter()
        llm.generate(prompts, SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True))
        return time.perf_counter() - t

    gen(4)
    best = min(gen(new) - gen(1) for _ in range(repeats))
    return 1e6 * best / (new - 1)


def measure(a) -> dict:
    """{"B": µs per step} for this process's mixq (the child side of --baseline)."""
    import torch

    torch.set_num_threads(1)
    batches = [int(b) for b in a.batches.split(",")]
    llm = free_model_engine(not a.no_overlap, max(batches))
    return {str(b): step_us(llm, b, a.new_tokens, a.repeats) for b in batches}


def profile(a) -> None:
    import cProfile
    import pstats

    from mixq.engine.sampling_params import SamplingParams

    b = a.profile
    llm = free_model_engine(not a.no_overlap, b)
    prompts = [[3 + (i * 7 + j) % 250 for j in range(16)] for i in range(b)]
    sp = SamplingParams(max_new_tokens=a.new_tokens, temperature=0, ignore_eos=True)
    llm.generate(prompts, sp)
    pr = cProfile.Profile()
    pr.enable()
    llm.generate(prompts, sp)
    pr.disable()
    st = pstats.Stats(pr)
    st.sort_stats("tottime").print_stats(30)
    st.sort_stats("cumulative").print_stats(40)


def run_child(pythonpath: str, a) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--batches", a.batches, "--new-tokens",
           str(a.new_tokens), "--repeats", str(a.repeats)] + (["--no-overlap"] if a.no_overlap else [])
    env = {**os.environ, "PYTHONPATH": pythonpath, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=pythonpath)
    if r.returncode:
        raise RuntimeError(f"measuring under {pythonpath} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2, help="alternations of baseline and this tree (--baseline)")
    ap.add_argument("--no-overlap", action="store_true", help="--disable-overlap-schedule")
    ap.add_argument("--baseline", help="a git revision to measure in the same run (its mixq/ in a temp dir)")
    ap.add_argument("--profile", type=int, metavar="B", help="cProfile one generate at batch B instead")
    ap.add_argument("--smoke", action="store_true", help="batches 1,3, 6 tokens, one repeat")
    ap.add_argument("--out")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.smoke:
        a.batches, a.new_tokens, a.repeats, a.rounds = "1,3", 6, 1, 1
    if a.child:
        print(json.dumps(measure(a)))
        return
    if a.profile:
        profile(a)
        return
    trees = {"this tree": str(ROOT)}
    tmp = None
    if a.baseline:
        tmp = tempfile.TemporaryDirectory(prefix="mixq-host-baseline-")
        rev = subprocess.run(["git", "rev-parse", "--short", a.baseline], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        archive = subprocess.run(["git", "archive", a.baseline, "mixq", "tests/fixtures/tiny-llama/bf16"], cwd=ROOT,
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp.name], input=archive, check=True)
        (Path(tmp.name) / "bench").mkdir()
        trees = {f"baseline {a.baseline} ({rev})": tmp.name, **trees}
    results: dict[str, list[dict]] = {k: [] for k in trees}
    for _ in range(a.rounds):
        for name, path in trees.items():
            results[name].append(run_child(path, a))
    batches = a.batches.split(",")
    best = {name: {b: min(r[b] for r in rs) for b in batches} for name, rs in results.items()}
    print(f"host µs per decode step, model free (tiny-Llama tokenizer, overlap {'off' if a.no_overlap else 'on'}, "
          f"{a.new_tokens} new tokens, best of {a.repeats} x {a.rounds})")
    print("| engine | " + " | ".join(f"batch {b}" for b in batches) + " |")
    print("|---|" + "---|" * len(batches))
    for name, row in best.items():
        print(f"| {name} | " + " | ".join(f"{row[b]:.0f} µs ({row[b] / int(b):.1f}/seq)" for b in batches) + " |")
    if a.out:
        Path(a.out).write_text(json.dumps({"args": vars(a), "us_per_step": best}, indent=2))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
