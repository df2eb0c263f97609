"""Where detokenization should run: host µs per decode step, by batch size, on the CPU.

For the outputs of real engine steps (bench/host_step.py's engine, the model made free, on
the tiny-Llama tokenizer) it times, per step:
- inline: what the engine thread paid before (one `step_many` over the step's sequences);
- thread: what the server's detokenizer thread does instead (`TextStage.fill`), most of it
  Python under the GIL (the Rust decode releases it);
- process: what a detokenizer process would add at least: pickling the step's new ids
  (request id, index, delta ids, ids with text, finish reason per sequence) on the engine
  thread, and unpickling them there — before any decoding there, and before the text goes
  back to the server's event loop, which lives in the engine's process here.

    python bench/detok_split.py --batches 1,16,64
"""

from __future__ import annotations

import argparse
import pickle
import sys
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--smoke", action="store_true")
    a = ap.parse_args()
    if a.smoke:
        a.batches, a.new_tokens = "1,3", 6
    import torch

    from bench.host_step import free_model_engine
    from mixq.engine.detokenizer import DetokState, TextStage
    from mixq.engine.sampling_params import SamplingParams

    torch.set_num_threads(1)
    batches = [int(b) for b in a.batches.split(",")]
    llm = free_model_engine(True, max(batches))
    eng = llm.engine
    print(f"host µs per decode step, {a.new_tokens} new tokens (tiny-Llama tokenizer)")
    print("| batch | inline (engine thread) | thread (TextStage.fill) | process (pickle on the engine thread + "
          "unpickle) |")
    print("|---|---|---|---|")
    for b in batches:
        eng.set_defer_text(True)
        sp = SamplingParams(max_new_tokens=a.new_tokens, temperature=0, ignore_eos=True)
        for i in range(b):
            eng.add_request(f"b{b}-{i}", [3 + (i * 7 + j) % 250 for j in range(16)], sp)
        steps = []
        while eng.has_unfinished():
            steps.append(eng.step())
        eng.set_defer_text(False)
        steps = [s for s in steps if s]
        n = len(steps)

        def inline_run(steps=steps):  # the engine's own batched detokenization over the same steps' ids
            states = {}
            t0 = time.perf_counter()
            for outs in steps:
                items, ends = [], []
                for o in outs:
                    for c in o.outputs:
                        items.append((states.setdefault((o.request_id, c.index), DetokState()), c._ids))
                        ends.append(c._n)  # the ids as of that step
                eng.detok.step_many(items, True, ends)
            return time.perf_counter() - t0

        def thread_run(steps=steps):
            stage = TextStage(eng.detok)
            for o in steps[0]:
                stage.open(o.request_id, True)
            t0 = time.perf_counter()
            for outs in steps:
                stage.fill(outs)
            return time.perf_counter() - t0

        def process_run(steps=steps):
            dumps = loads = 0.0
            for outs in steps:
                t0 = time.perf_counter()
                msg = pickle.dumps([(o.request_id, [(c.index, c.delta_token_ids, c._n, c.finish_reason)
                                                    for c in o.outputs]) for o in outs], pickle.HIGHEST_PROTOCOL)
                t1 = time.perf_counter()
                pickle.loads(msg)
                dumps, loads = dumps + t1 - t0, loads + time.perf_counter() - t1
            return dumps, loads

        marks = [[c.text_ids for o in outs for c in o.outputs] for outs in steps]
        inline = min(inline_run() for _ in range(3))
        thread = float("inf")
        for _ in range(3):
            for outs, tids in zip(steps, marks):  # fill() marks them done: give them back their marks
                for c, t in zip((c for o in outs for c in o.outputs), tids):
                    c.text_ids = t
            thread = min(thread, thread_run())
        dumps, loads = min(process_run() for _ in range(3))
        print(f"| {b} | {1e6 * inline / n:.0f} | {1e6 * thread / n:.0f} | "
              f"{1e6 * dumps / n:.0f} + {1e6 * loads / n:.0f} |")


if __name__ == "__main__":
    main()
