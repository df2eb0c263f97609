"""Expert tracking on the GPU: no host sync per step, CUDA-graph capture, and its cost.

1. Counts of the route hooks equal a bincount of the same routing, with
   torch.cuda.set_sync_debug_mode("error") on around every hook and begin_pass call (any
   host sync raises), padding rows included.
2. The hooks of all layers captured in one CUDA graph and replayed give the same counts.
3. Cost: microseconds per MoE layer hook (CUDA events around all layers' hooks of a step,
   divided by the layer count) and per begin_pass, at several token counts, next to the
   router GEMM of the same layer for scale ([T, hidden] x [hidden, E] in bf16).

Shapes: Qwen3-235B-A22B (94 MoE layers, 128 experts, top-8, hidden 4096) by default.

    python bench/expert_tracking.py [--out results.json]
"""

from __future__ import annotations

import argparse
import json
from types import SimpleNamespace

import torch
from timing import eager_us

from mixq.tracking.counters import ExpertCounters

L, E, K, HIDDEN = 94, 128, 8, 4096
TOKENS = (1, 16, 256, 4096)


def routing(t: int, gen: torch.Generator) -> torch.Tensor:
    """[t, K] distinct experts per row, skewed toward low ids (a hot set)."""
    w = torch.rand(t, E, generator=gen, device="cuda") * torch.linspace(2.0, 1.0, E, device="cuda")
    return w.topk(K, dim=-1).indices


def reference(ids_per_layer, valid: int) -> torch.Tensor:
    out = torch.zeros(L, K, E, dtype=torch.int64, device="cuda")
    for r, ids in enumerate(ids_per_layer):
        for s in range(K):
            out[r, s] = torch.bincount(ids[:valid, s], minlength=E)
    return out


def check_no_sync(report: dict) -> None:
    c = ExpertCounters(list(range(L)), E, K, "cuda")
    hooks = [c.hook(r) for r in range(L)]
    gen = torch.Generator(device="cuda").manual_seed(0)
    want = torch.zeros(L, K, E, dtype=torch.int64, device="cuda")
    want_active = torch.zeros(L, E, dtype=torch.int64, device="cuda")
    c.reserve(max(TOKENS))  # growth allocates; it is not a sync, but keep the loop allocation-free
    for t in TOKENS + (33,):
        ids = [routing(t, gen) for _ in range(L)]
        valid = t - 3 if t > 3 else t  # the last rows play padding
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            c.begin_pass(valid)
            for r in range(L):
                hooks[r](SimpleNamespace(topk_ids=ids[r]))
        finally:
            torch.cuda.set_sync_debug_mode("default")
        ref = reference(ids, valid)
        want += ref
        want_active += ref.sum(1) > 0  # each loop is one pass
    snap = c.snapshot()
    assert torch.equal(snap.slot_tokens, want.cpu()), "hook counts differ from bincount"
    assert torch.equal(snap.activations, want_active.cpu()), "activation counts differ"
    assert snap.num_passes == len(TOKENS) + 1
    report["no_sync"] = "ok: every hook and begin_pass ran under sync_debug_mode=error, counts equal bincount"


def check_graph(report: dict) -> None:
    c = ExpertCounters(list(range(L)), E, K, "cuda")
    hooks = [c.hook(r) for r in range(L)]
    t = 64
    c.reserve(t)
    static = [torch.zeros(t, K, dtype=torch.int64, device="cuda") for _ in range(L)]
    c.begin_pass(t)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm up on a side stream, as graph capture requires
        for r in range(L):
            hooks[r](SimpleNamespace(topk_ids=static[r]))
    torch.cuda.current_stream().wait_stream(s)
    c.reset()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for r in range(L):
            hooks[r](SimpleNamespace(topk_ids=static[r]))
    c.reset()
    gen = torch.Generator(device="cuda").manual_seed(1)
    want = torch.zeros(L, K, E, dtype=torch.int64, device="cuda")
    for step in range(5):
        valid = t - step  # padding rows grow each step: the mask is read at replay
        ids = [routing(t, gen) for _ in range(L)]
        for r in range(L):
            static[r].copy_(ids[r])
        c.begin_pass(valid)
        g.replay()
        want += reference(ids, valid)
    snap = c.snapshot()
    assert torch.equal(snap.slot_tokens, want.cpu()), "graph replay counts differ from bincount"
    assert snap.num_passes == 5
    report["cuda_graph"] = "ok: 5 replays of all layers' hooks equal bincount, padding masks honoured"


def timings(report: dict) -> None:
    c = ExpertCounters(list(range(L)), E, K, "cuda")
    hooks = [c.hook(r) for r in range(L)]
    c.reserve(max(TOKENS))
    gen = torch.Generator(device="cuda").manual_seed(2)
    rows = []
    for t in TOKENS:
        routes = [SimpleNamespace(topk_ids=routing(t, gen)) for _ in range(L)]

        def step(routes=routes):
            for r in range(L):
                hooks[r](routes[r])

        x = torch.randn(t, HIDDEN, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(E, HIDDEN, device="cuda", dtype=torch.bfloat16)
        hook_us = eager_us(step, warmup=5) / L
        gemm_us = eager_us(lambda x=x, w=w: torch.nn.functional.linear(x, w), warmup=5)
        pass_us = eager_us(lambda t=t: c.begin_pass(t), warmup=5)
        rows.append({"tokens": t, "hook_us_per_layer": round(hook_us, 2), "router_gemm_us": round(gemm_us, 2),
                     "begin_pass_us_per_step": round(pass_us, 2)})
        print(f"T={t:5d}: hook {hook_us:6.2f} us/layer (router GEMM {gemm_us:6.2f} us), "
              f"begin_pass {pass_us:6.2f} us/step", flush=True)
    report["timings"] = rows
    report["snapshot_ms"] = round(eager_us(c.snapshot, reps=10, warmup=5) / 1000, 3)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out")
    args = p.parse_args()
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "shape": {"moe_layers": L, "experts": E, "top_k": K, "hidden": HIDDEN}}
    check_no_sync(report)
    print(report["no_sync"], flush=True)
    check_graph(report)
    print(report["cuda_graph"], flush=True)
    timings(report)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
