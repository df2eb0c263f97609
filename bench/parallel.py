"""Tensor / expert parallelism on GPUs: correctness against one GPU, decode speed, memory.

The model is Qwen3-30B-A3B-shaped (hidden 2048, 32 query / 4 KV heads of 128, 128
experts of 768 with top-8, vocab 151936) with --layers of its 48 layers and random
weights, written once under --workdir as BF16 + FP8 (per-channel) + GPTQ-INT4 (g64)
checkpoints and served as a mix: attention in FP8, experts 0-15 of every layer in FP8
(the "hot" ones), experts 16-127 in GPTQ-INT4, embeddings, router and LM head in BF16.

Every layout (tp1, tp2, tp4, tp4ep4 by default; tp4ep4a2a for the all-to-all dispatch)
runs in a fresh process that
  1. in float32, generates 32 greedy tokens for 4 prompts and scores one prompt, and
     compares with tp1: tokens must be identical and logits within 1e-4 of the largest
     (an all-reduce only reorders fp32 sums; bf16 would let random-weight near-ties flip);
  2. in bfloat16, after a warmup, times decode at batch 1 and 32 (--tokens new tokens,
     prefill timed separately and subtracted), and reads each GPU's memory in use.
Prints a markdown table for bench/RESULTS.md (and JSON with --out).

    python bench/parallel.py                          # tp1, tp2, tp4, tp4ep4
    python bench/parallel.py --layouts tp1,tp4ep4a2a  # a subset (tp1 is the reference)
    python bench/parallel.py --shape tiny --device cpu --layers 2 --layouts tp1,tp2 --tokens 8 --batches 1,4
                                                      # a smoke test of this script (gloo)
The checkpoints and tp1's reference stay in --workdir, so a later call reuses them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = {  # name: (tp, ep, moe dispatch)
    "tp1": (1, 1, "all-reduce"), "tp2": (2, 1, "all-reduce"), "tp4": (4, 1, "all-reduce"),
    "tp4ep4": (4, 4, "all-reduce"), "tp4ep4a2a": (4, 4, "all-to-all"), "tp2ep2": (2, 2, "all-reduce"),
    "tp2ep2a2a": (2, 2, "all-to-all"),
}
HOT = 16  # experts 0..HOT-1 in FP8
SHAPES = {
    "qwen3-30b-a3b": dict(hidden_size=2048, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                          moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8, vocab_size=151936),
    # a smoke test of this script on the CPU (gloo): --shape tiny --device cpu
    "tiny": dict(hidden_size=256, num_attention_heads=8, num_key_value_heads=4, head_dim=32,
                 moe_intermediate_size=128, num_experts=32, num_experts_per_tok=4, vocab_size=4096),
}
SHAPE = SHAPES["qwen3-30b-a3b"]


def model_config(layers: int) -> dict:
    return {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", **SHAPE,
            "intermediate_size": 6144, "num_hidden_layers": layers, "norm_topk_prob": True,
            "decoder_sparse_step": 1, "mlp_only_layers": [], "rms_norm_eps": 1e-6, "rope_theta": 1e6,
            "max_position_embeddings": 4096, "tie_word_embeddings": False, "bos_token_id": 1,
            "eos_token_id": 2, "torch_dtype": "bfloat16"}


class ShardWriter:
    """Streams tensors into ~2 GiB safetensors files plus an index."""

    def __init__(self, path: Path):
        self.path, self.part, self.size, self.files, self.map = path, {}, 0, [], {}
        path.mkdir(parents=True, exist_ok=True)

    def add(self, tensors: dict) -> None:
        self.part.update({k: v.contiguous() for k, v in tensors.items()})
        self.size += sum(v.numel() * v.element_size() for v in tensors.values())
        if self.size > 2 * 2**30:
            self.flush()

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.part:
            return
        name = f"model-{len(self.files):05d}.safetensors"
        save_file(self.part, str(self.path / name), metadata={"format": "pt"})
        self.files.append(name)
        self.map.update(dict.fromkeys(self.part, name))
        self.part, self.size = {}, 0

    def close(self, config: dict) -> None:
        self.flush()
        (self.path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": self.map}))
        (self.path / "config.json").write_text(json.dumps(config, indent=1))
        for f in ("tokenizer.json", "tokenizer_config.json"):  # any tokenizer: prompts are token ids
            shutil.copy(ROOT / "tests/fixtures/tiny-llama/bf16" / f, self.path / f)


def write_checkpoints(work: Path, layers: int, device: str) -> Path:
    """BF16 base + FP8 (attention, hot experts) + GPTQ-INT4 (other experts); the mix YAML."""
    from mixq.formats import writers

    mix = work / "mix.yaml"
    done = {"layers": layers, "shape": SHAPE}
    if (work / "DONE").is_file() and json.loads((work / "DONE").read_text()) == done:
        return mix
    shutil.rmtree(work, ignore_errors=True)
    t0 = time.time()
    cfg = model_config(layers)
    h, hd, e, inter, v = SHAPE["hidden_size"], SHAPE["head_dim"], SHAPE["num_experts"], SHAPE["moe_intermediate_size"], SHAPE["vocab_size"]
    qh, kvh = SHAPE["num_attention_heads"] * hd, SHAPE["num_key_value_heads"] * hd
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(*shape, std):  # on the GPU (fast), bf16 on the host for the writers
        return (torch.randn(*shape, generator=gen, device=device) * std).to(torch.bfloat16).cpu()

    base, fp8, gptq = ShardWriter(work / "bf16"), ShardWriter(work / "fp8"), ShardWriter(work / "gptq")
    base.add({"model.embed_tokens.weight": rand(v, h, std=1.0), "model.norm.weight": torch.ones(h, dtype=torch.bfloat16),
              "lm_head.weight": rand(v, h, std=h**-0.5)})
    hot = []
    for i in range(layers):
        p = f"model.layers.{i}"
        base.add({f"{p}.input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
                  f"{p}.post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
                  f"{p}.self_attn.q_norm.weight": torch.ones(hd, dtype=torch.bfloat16),
                  f"{p}.self_attn.k_norm.weight": torch.ones(hd, dtype=torch.bfloat16),
                  f"{p}.mlp.gate.weight": rand(e, h, std=h**-0.5)})
        linears = {f"{p}.self_attn.q_proj": (qh, h), f"{p}.self_attn.k_proj": (kvh, h),
                   f"{p}.self_attn.v_proj": (kvh, h), f"{p}.self_attn.o_proj": (h, qh)}
        for x in range(e):
            for proj, shape in (("gate_proj", (inter, h)), ("up_proj", (inter, h)), ("down_proj", (h, inter))):
                linears[f"{p}.mlp.experts.{x}.{proj}"] = shape
        for mod, (n, k) in linears.items():
            w = rand(n, k, std=k**-0.5)
            base.add({f"{mod}.weight": w})
            expert = int(mod.split(".experts.")[1].split(".")[0]) if ".experts." in mod else None
            if expert is None or expert < HOT:
                fp8.add(writers.fp8_tensors(mod, w, "channel"))
                if expert is not None:
                    hot.append(f"{mod}.weight")
            else:
                gptq.add(writers.gptq_tensors(mod, w, 4, 64, True))
        print(f"  layer {i + 1}/{layers} written ({time.time() - t0:.0f} s)", flush=True)
    base.close(cfg)
    fp8.close({**cfg, "quantization_config": writers.fp8_config("channel", ["lm_head"])})
    gptq.close({**cfg, "quantization_config": writers.gptq_config(4, 64, True)})
    import yaml

    mapping = {"model.layers.*.self_attn.*_proj.weight": "fp8", "model.layers.*.mlp.experts.*.*_proj.weight": "gptq_int4",
               **dict.fromkeys(hot, "fp8")}  # exact names beat patterns
    mix.write_text(yaml.safe_dump({"mixed_precision": {
        "fp16_path": str(work / "bf16"), "fp8_path": str(work / "fp8"), "gptq_int4_path": str(work / "gptq"),
        "weight_mapping": mapping}}))
    (work / "DONE").write_text(json.dumps(done))
    print(f"checkpoints written in {time.time() - t0:.0f} s under {work}", flush=True)
    return mix


def prompts(n: int, length: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, SHAPE["vocab_size"], (n, length), generator=g).tolist()


def child(args) -> dict:
    """One layout, in its own process (its GPUs start empty)."""
    from mixq.engine.engine import LLM
    from mixq.engine.sampling_params import SamplingParams

    tp, ep, dispatch = LAYOUTS[args.child]
    work = Path(args.workdir)
    mix = str(work / "mix.yaml")
    common = dict(mixed_precision_config=mix, device=args.device, tp_size=tp, ep_size=ep, moe_dispatch=dispatch,
                  page_size=16, chunked_prefill_size=8192)
    res: dict = {"layout": args.child, "tp": tp, "ep": ep, "dispatch": dispatch}

    # 1. correctness, float32
    check = prompts(4, 24, 1)
    with LLM(**common, dtype="float32", max_total_tokens=4096) as llm:
        outs = llm.generate(check, SamplingParams(max_new_tokens=32, temperature=0, ignore_eos=True))
        tokens = [o.outputs[0].token_ids for o in outs]
        logits = llm.engine.runner.score(check[0], list(range(4))).float().cpu()
    ref = work / "tp1-reference.pt"
    if args.child == "tp1":
        torch.save({"tokens": tokens, "logits": logits}, ref)
    want = torch.load(ref)
    res["greedy_match"] = tokens == want["tokens"]
    res["first_divergence"] = next((j for a, b in zip(tokens, want["tokens"]) for j in range(len(a)) if a[j] != b[j]),
                                   None)
    res["logit_rel_diff"] = float((logits - want["logits"]).abs().max() / want["logits"].abs().max())

    # 2. speed and memory, bfloat16
    with LLM(**common, dtype="bfloat16", max_total_tokens=args.kv_tokens, max_running_requests=max(args.batches)) as llm:
        eng = llm.engine
        llm.generate(prompts(2, 32, 2), SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True))  # warmup
        for bs in args.batches:
            ps = prompts(bs, 32, 3 + bs)
            t0 = time.perf_counter()
            llm.generate(ps, SamplingParams(max_new_tokens=1, temperature=0, ignore_eos=True))
            t_prefill = time.perf_counter() - t0
            t0 = time.perf_counter()
            llm.generate(ps, SamplingParams(max_new_tokens=args.tokens, temperature=0, ignore_eos=True))
            t_all = time.perf_counter() - t0
            res[f"decode_tok_s_bs{bs}"] = bs * (args.tokens - 1) / max(t_all - t_prefill, 1e-9)
        if eng.dist is not None:
            res["weights_gib_per_rank"] = [s["bytes"] / 2**30 for s in eng.dist.rank_stats]
        else:
            res["weights_gib_per_rank"] = [sum(t.nbytes for t in eng.plan.tensors.values()) / 2**30]
        used = []
        for i in range(tp if args.device == "cuda" else 0):  # every process's use of the GPU
            free, total = torch.cuda.mem_get_info(i)
            used.append((total - free) / 2**30)
        res["gpu_used_gib"] = used or [float("nan")]
        res["kv_blocks"] = eng.scheduler.blocks.num_blocks
    return res


def table(results: list[dict], args) -> str:
    bs = args.batches
    head = ["layout", "GPUs", "greedy = tp1", "max logit diff", "weights GiB/rank", "GPU used GiB (max)",
            *[f"decode tok/s bs={b}" for b in bs]]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        if "error" in r:
            rows.append(f"| {r['layout']} | - | error: {r['error'][:80]} |")
            continue
        match = "yes" if r["greedy_match"] else f"no (token {r['first_divergence']})"
        rows.append("| " + " | ".join([
            f"{r['layout']}" + (f" ({r['dispatch']})" if r["ep"] > 1 else ""), str(r["tp"]), match,
            f"{r['logit_rel_diff']:.1e}", f"{max(r['weights_gib_per_rank']):.3g}", f"{max(r['gpu_used_gib']):.1f}",
            *[f"{r[f'decode_tok_s_bs{b}']:.1f}" for b in bs]]) + " |")
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layouts", default="tp1,tp2,tp4,tp4ep4", help=f"comma list of {', '.join(LAYOUTS)}")
    ap.add_argument("--layers", type=int, default=4, help="decoder layers (the real model has 48)")
    ap.add_argument("--tokens", type=int, default=128, help="new tokens per timed request")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--kv-tokens", type=int, default=65536, help="KV cache size (tokens), the same for every layout")
    ap.add_argument("--shape", default="qwen3-30b-a3b", choices=list(SHAPES))
    ap.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke test of this script")
    ap.add_argument("--workdir", default=os.environ.get("MIXQ_BENCH_DIR", "/tmp/mixq-bench-parallel"))
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.batches = [int(b) for b in str(args.batches).split(",")]
    SHAPE.clear()
    SHAPE.update(SHAPES[args.shape])
    if args.child:
        Path(args.result).write_text(json.dumps(child(args)))
        return 0
    layouts = args.layouts.split(",")
    if not (Path(args.workdir) / "tp1-reference.pt").is_file() and layouts[0] != "tp1":
        layouts.insert(0, "tp1")  # the reference every other layout is checked against
    if args.device == "cuda":
        gpus = torch.cuda.device_count()
        print(f"{gpus} x {torch.cuda.get_device_name(0)}; torch {torch.__version__}", flush=True)
    else:
        gpus = 1 << 10  # gloo ranks on the CPU
    write_checkpoints(Path(args.workdir), args.layers, args.device)
    results = []
    for name in layouts:
        tp = LAYOUTS[name][0]
        if tp > gpus:
            results.append({"layout": name, "error": f"needs {tp} GPUs, {gpus} present"})
            continue
        out = Path(args.workdir) / f"result-{name}.json"
        t0 = time.time()
        cmd = [sys.executable, __file__, "--child", name, "--result", str(out), "--workdir", args.workdir,
               "--tokens", str(args.tokens), "--batches", ",".join(map(str, args.batches)),
               "--kv-tokens", str(args.kv_tokens), "--shape", args.shape, "--device", args.device]
        env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            results.append({"layout": name, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"})
            print(proc.stderr[-4000:], file=sys.stderr)
        else:
            results.append(json.loads(out.read_text()))
        print(f"{name}: {time.time() - t0:.0f} s: {json.dumps(results[-1])}", flush=True)
    print(f"\n{args.shape}-shaped, {args.layers} layers, random weights; attention + experts 0-{HOT - 1} FP8, "
          f"other experts GPTQ-INT4 g64; {args.tokens} new tokens after a 32-token prompt\n")
    print(table(results, args))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0 if all("error" not in r and r["greedy_match"] and r["logit_rel_diff"] < 1e-4 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
