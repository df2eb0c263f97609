"""End-to-end decode benchmark: mixq's engine against HF transformers on the same weights.

Builds a random model of a named shape with transformers (--shape: llama-1b, llama-8b, the
Llama-3.2-1B / Llama-3-8B shapes; qwen3-30b-a3b, the Qwen3-30B-A3B shape: 48 layers, 128
experts, top-8), saves it in BF16, writes GPTQ-INT4 (RTN, group 128) and FP8 (per
channel) checkpoints of it with mixq's writers, then measures decode tokens/s for batch
sizes B with each engine started once:

  dense (llama-*):  HF transformers bf16; mixq bf16 (without CUDA graphs, without the
                    overlap schedule, and with both); mixq fp8 (every decoder Linear);
                    mixq int4 (every decoder Linear); mixq mix (attention BF16, MLP gate/up
                    INT4, down FP8)
  MoE (qwen3-*):    HF transformers bf16; mixq bf16 (with and without the overlap
                    schedule); mixq int4 experts (attention BF16); mixq mix: experts INT4
                    but each layer's --hot-experts most routed ones (counted by HF's router
                    on the benchmark prompts) in FP8

The roofline is batch x measured copy bandwidth / weight bytes one decode step reads: all
weights but an untied embedding for dense models; for MoE, the non-expert weights plus,
per layer, the bytes of the experts a batch of B tokens touches (expert e of a layer with
E experts and top-k routing is touched with probability 1 - (1 - k/E)^B: random weights
route near-uniformly). For mixq engines with CUDA graphs the bench also replays the
decode graph of each batch's bucket alone and reports how much a whole step adds to it
(the host's share; issue 18's target: <= 10% at batch 64 with the overlap schedule).

Checkpoints go to --workdir (kept and reused when given, so a large shape can be measured
over several runs with --engines), else a temporary directory. --load-format dummy writes
none (config.json and the tokenizer only): each mixq engine makes random weights in its
formats (mixq.models.dummy; INT4 is GPTQ group 128, per channel where K is not a multiple)
and HF runs on its own random init, so "greedy = HF" is not compared and the MoE mix's
FP8 experts are each layer's lowest ids. That fits the Qwen3-30B-A3B shape on a 64 GiB
disk and skips writing and quantizing tens of GB. --smoke runs tiny shapes of
both families on the CPU (no timing claims; tests/test_bench_engine_smoke.py).

    python bench/engine.py --shape llama-1b --batches 1,16,64 --new-tokens 64 --out e.json
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

BENCH = Path(__file__).resolve().parent
# bench/kernels.py would shadow the `kernels` package transformers probes for: run from the root
sys.path[0] = str(BENCH.parent)

SHAPES = {
    "llama-1b": dict(family="llama", layers=16, hidden=2048, inter=8192, heads=32, kv_heads=8, vocab=128256,
                     tie=True),
    "llama-8b": dict(family="llama", layers=32, hidden=4096, inter=14336, heads=32, kv_heads=8, vocab=128256,
                     tie=False),
    "qwen3-30b-a3b": dict(family="moe", layers=48, hidden=2048, inter=6144, moe_inter=768, heads=32, kv_heads=4,
                          head_dim=128, experts=128, top_k=8, vocab=151936, tie=False),
    # --smoke
    "tiny-llama": dict(family="llama", layers=2, hidden=64, inter=128, heads=4, kv_heads=2, vocab=512, tie=True,
                       group=32),
    "tiny-moe": dict(family="moe", layers=2, hidden=64, inter=128, moe_inter=32, heads=4, kv_heads=2, head_dim=16,
                     experts=8, top_k=2, vocab=512, tie=False, group=32),
}
ENGINES = {
    "llama": ["hf", "bf16-eager", "bf16-no-overlap", "bf16", "fp8", "int4", "mix"],
    "moe": ["hf", "bf16-no-overlap", "bf16", "int4-experts", "mix-hot-fp8"],
}
LINEAR = r"re:model\.layers\.\d+\..*_proj\.weight"
EXPERT = r"re:model\.layers\.\d+\.mlp\.experts\.\d+\..*_proj\.weight"


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def hf_config(s: dict):
    """(transformers config, model class) of shape `s`."""
    import transformers

    common = dict(hidden_size=s["hidden"], intermediate_size=s["inter"], num_hidden_layers=s["layers"],
                  num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"], vocab_size=s["vocab"],
                  max_position_embeddings=4096, tie_word_embeddings=s["tie"], bos_token_id=1, eos_token_id=2)
    if s["family"] == "llama":
        cfg = transformers.LlamaConfig(rope_theta=500000.0, **common)
        cls = transformers.LlamaForCausalLM
    else:
        cfg = transformers.Qwen3MoeConfig(moe_intermediate_size=s["moe_inter"], num_experts=s["experts"],
                                          num_experts_per_tok=s["top_k"], head_dim=s["head_dim"], norm_topk_prob=True,
                                          decoder_sparse_step=1, mlp_only_layers=[], rope_theta=1000000.0, **common)
        cls = transformers.Qwen3MoeForCausalLM
    return cfg, cls


def hf_model(s: dict, dev: torch.device):
    """A random HF model of shape `s` in BF16 on dev (seed 0)."""
    cfg, cls = hf_config(s)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in BF16: 30B parameters in fp32 would not fit the GPU
    try:
        with torch.device(dev):
            return cls(cfg).eval()
    finally:
        torch.set_default_dtype(default)


def build_model(dst: Path, s: dict, dev: torch.device, weights: bool = True) -> Path:
    """A random HF model of shape `s` saved in BF16 at dst (only its config.json without
    `weights`: --load-format dummy), with a tokenizer of one word per id."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    if weights:
        model = hf_model(s, dev)
        model.save_pretrained(dst)
        del model
    else:
        dst.mkdir(parents=True, exist_ok=True)
        cfg, cls = hf_config(s)
        cfg.architectures = [cls.__name__]  # what save_pretrained of a model records
        cfg.save_pretrained(dst)
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(s["vocab"])}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", bos_token="w1",
                                         eos_token="w2").save_pretrained(dst)
    return dst


def checkpoints(root: Path, s: dict, dev: torch.device, dummy: bool = False) -> dict[str, Path]:
    """bf16, int4 (GPTQ RTN, group 128; 32 for the tiny shapes) and fp8 (per channel) checkpoints under root, reused if there.
    dummy: config.json and the tokenizer only (the engines make random weights in each format)."""
    from mixq.formats.writers import quantize_checkpoint

    paths = {"bf16": root / "bf16", "int4": root / "int4", "fp8": root / "fp8"}
    if dummy:
        build_model(paths["bf16"], s, dev, weights=False)
        return paths
    t = time.perf_counter()
    if not (paths["bf16"] / "config.json").exists():
        build_model(paths["bf16"], s, dev)
    for fmt, opts in (("int4", dict(fmt="gptq", group_size=s.get("group", 128))), ("fp8", dict(fmt="fp8", scheme="channel"))):
        if not (paths[fmt] / "config.json").exists():
            shutil.rmtree(paths[fmt], ignore_errors=True)
            quantize_checkpoint(paths["bf16"], paths[fmt], **opts)
    print(f"checkpoints ready in {time.perf_counter() - t:.0f}s under {root}", flush=True)
    return paths


def hot_experts(root: Path, bf16: Path, prompts: list[list[int]], n: int, dev: torch.device,
                dummy: bool = False) -> dict[int, list[int]]:
    """Per layer, the n experts HF's router sends most of the prompts' tokens to (cached in root).
    dummy: the n lowest ids (HF's random weights are not the engines'; random weights route
    near uniformly, so any n experts take about n / E of the pairs)."""
    if dummy:
        layers = json.loads((bf16 / "config.json").read_text())["num_hidden_layers"]
        return {layer: list(range(n)) for layer in range(layers)}
    cache = root / f"hot-{n}.json"
    if cache.exists():
        return {int(k): v for k, v in json.loads(cache.read_text()).items()}
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(bf16, dtype=torch.bfloat16).to(dev).eval()
    k = model.config.num_experts_per_tok
    with torch.no_grad():
        logits = model(torch.tensor(prompts, device=dev), output_router_logits=True).router_logits
    hot = {}
    for layer, lg in enumerate(logits):
        counts = torch.bincount(lg.float().topk(k, dim=-1).indices.flatten(), minlength=lg.shape[-1])
        hot[layer] = counts.topk(n).indices.tolist()
    del model
    cache.write_text(json.dumps(hot))
    return hot


def configs(root: Path, paths: dict[str, Path], hot: dict[int, list[int]] | None) -> dict[str, Path]:
    """The YAML configs of the quantized engines."""
    base = {"fp16_path": str(paths["bf16"]), "int4_path": str(paths["int4"]), "fp8_path": str(paths["fp8"])}
    maps = {
        "fp8": {LINEAR: "fp8"},
        "int4": {LINEAR: "int4"},
        "mix": {"model.layers.*.mlp.gate_proj.weight": "int4", "model.layers.*.mlp.up_proj.weight": "int4",
                "model.layers.*.mlp.down_proj.weight": "fp8"},
        "int4-experts": {EXPERT: "int4"},
    }
    if hot is not None:
        maps["mix-hot-fp8"] = {EXPERT: "int4", **{f"model.layers.{layer}.mlp.experts.{e}.{p}.weight": "fp8"
                                                  for layer, es in hot.items() for e in es
                                                  for p in ("gate_proj", "up_proj", "down_proj")}}
    out = {}
    for name, m in maps.items():
        out[name] = root / f"{name}.yaml"
        out[name].write_text(yaml.safe_dump({"mixed_precision": {**base, "weight_mapping": m}}))
    return out


def timed_generate(generate, prompts, new: int, dev: torch.device, repeats: int) -> tuple[float, float, list]:
    """(prefill s, decode s, every sequence's tokens), the fastest of `repeats` each. A 1-token
    run times the prefill. The decode is timed inside the `new`-token run where the engine
    reports it (mixq: from the last first token to the end, so prefill noise stays out),
    else (HF) as the `new`-token run minus the 1-token run. Warmed up on the timed shapes
    first (Triton compiles one kernel per launch configuration)."""
    generate(prompts, 3)
    generate(prompts, 1)
    ones, decodes = [], []
    for _ in range(repeats):
        sync(dev)
        t0 = time.perf_counter()
        generate(prompts, 1)
        sync(dev)
        t1 = time.perf_counter()
        toks, inner = generate(prompts, new, timed=True)
        sync(dev)
        ones.append(t1 - t0)
        decodes.append(inner if inner is not None else time.perf_counter() - t1 - ones[-1])
    return min(ones), max(min(decodes), 1e-9), toks


def profile(generate, prompts, new: int) -> None:
    """Where a generate call's host time goes: torch.profiler's top ops by self CPU time
    (--profile; for the host share of a decode step)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with prof(activities=acts) as p:
        generate(prompts, new)
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=25), flush=True)


def hf_engine(path: Path, dev: torch.device, shape: dict | None = None):
    """HF transformers on the checkpoint at path, or (shape given: --load-format dummy) on
    its own random weights of that shape, built in memory."""
    from transformers import AutoModelForCausalLM

    if shape is not None:
        model = hf_model(shape, dev)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(dev).eval()

    @torch.no_grad()
    def generate(prompts, n, timed=False):
        ids = torch.tensor(prompts, device=dev)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=0, eos_token_id=None)
        toks = out[:, ids.shape[1]:].tolist()
        return (toks, None) if timed else toks

    return generate, dict(model.named_parameters()), None


def mixq_engine(kind: str, paths: dict, cfgs: dict, max_batch: int, max_tokens: int, dev: torch.device,
                dummy: bool = False):
    from mixq.engine.engine import LLM
    from mixq.engine.sampling_params import SamplingParams

    graphs = dev.type == "cuda" and kind != "bf16-eager"
    src = dict(model_path=str(paths["bf16"])) if kind.startswith("bf16") else dict(mixed_precision_config=str(cfgs[kind]))
    if dummy:  # random weights in each mapped format, from config.json (mixq.models.dummy)
        src = dict(src, model_path=str(paths["bf16"]), load_format="dummy")
    t = time.perf_counter()
    llm = LLM(**src, max_running_requests=max_batch, max_total_tokens=max_tokens, dtype="bfloat16", device=str(dev),
              disable_cuda_graph=not graphs, disable_overlap_schedule=kind == "bf16-no-overlap",
              # every timed run prefills its whole prompt: with the prefix cache, the runs after the
              # warm-up would hit it (and compile the extend kernel's prefix configs while timed)
              disable_radix_cache=True)
    print(f"  engine up in {time.perf_counter() - t:.1f}s (CUDA graphs: {llm.engine.runner.graphs is not None}, "
          f"overlap schedule: {llm.engine.overlap})", flush=True)

    def generate(prompts, n, timed=False):
        outs = llm.generate(prompts, SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True))
        end = time.monotonic()  # the engine stamps first tokens with time.monotonic
        toks = [o.outputs[0].token_ids for o in outs]
        if not timed:
            return toks
        # decode: from the step that gave the last prompt its first token to the end
        return toks, end - max(o.metrics["first_token_time"] for o in outs)

    return generate, dict(llm.engine.weights), llm


def replay_s(llm, batch: int, dev: torch.device, reps: int = 20) -> float | None:
    """Seconds of one replay of the decode graph that serves `batch` sequences (its inputs
    are the last step's: the graph's work does not depend on them)."""
    g = llm.engine.runner.graphs
    bs = g.bucket(batch) if g is not None else None
    if bs is None or bs not in g.graphs:
        return None
    g.graphs[bs].replay()
    sync(dev)
    t = time.perf_counter()
    for _ in range(reps):
        g.graphs[bs].replay()
    sync(dev)
    return (time.perf_counter() - t) / reps


def step_bytes(weights: dict, s: dict, batch: int) -> float:
    """Weight bytes one decode step of `batch` sequences reads (see the module docstring)."""
    def nbytes(w):
        return w.nbytes if hasattr(w, "nbytes") and not isinstance(w, torch.Tensor) else w.numel() * w.element_size()

    total, experts = 0.0, 0.0
    pat = re.compile(r"\.experts\.")  # mixq: experts.<e>.<proj>; HF: fused experts.gate_up_proj
    for name, w in weights.items():
        if "embed_tokens" in name and not s["tie"]:
            continue  # a decode step reads B rows of it
        (experts := experts + nbytes(w)) if pat.search(name) else (total := total + nbytes(w))
    if experts:
        touched = 1 - (1 - s["top_k"] / s["experts"]) ** batch
        total += experts * touched
    return total


def copy_bw(dev: torch.device) -> float:
    """Bytes/s of a large copy on dev (read + write)."""
    if dev.type == "cuda":
        from bench.timing import copy_bandwidth

        return copy_bandwidth()
    x = torch.empty(2**26, dtype=torch.uint8)
    y = torch.empty_like(x)
    t = time.perf_counter()
    for _ in range(5):
        y.copy_(x)
    return 2 * 5 * x.numel() / (time.perf_counter() - t)


def run_shape(shape: str, a, dev: torch.device) -> dict:
    s = SHAPES[shape]
    root = Path(a.workdir) / shape if a.workdir else Path(tempfile.mkdtemp(prefix=f"mixq-bench-{shape}-"))
    root.mkdir(parents=True, exist_ok=True)
    dummy = a.load_format == "dummy"
    paths = checkpoints(root, s, dev, dummy)
    batches = [int(x) for x in a.batches.split(",")]
    g = torch.Generator().manual_seed(1)
    prompts = {b: torch.randint(3, s["vocab"], (b, a.prompt_len), generator=g).tolist() for b in batches}
    kinds = [k for k in ENGINES[s["family"]] if not a.engines or k in a.engines.split(",")]
    hot = None
    if "mix-hot-fp8" in kinds:
        hot = hot_experts(root, paths["bf16"], prompts[max(batches)], min(a.hot_experts, s["experts"]), dev, dummy)
    cfgs = configs(root, paths, hot)
    max_tokens = max(batches) * (a.prompt_len + a.new_tokens + 32)
    rows, tokens = [], {}
    for kind in kinds:
        print(f"{shape}: {kind}", flush=True)
        generate, weights, llm = hf_engine(paths["bf16"], dev, s if dummy else None) if kind == "hf" else \
            mixq_engine(kind, paths, cfgs, max(batches), max_tokens, dev, dummy)
        for b in batches:
            p, d, toks = timed_generate(generate, prompts[b], a.new_tokens, dev, a.repeats)
            tokens[kind, b] = toks
            step = d / (a.new_tokens - 1)
            row = {"engine": kind, "batch": b, "prefill_s": p, "decode_s": d, "step_ms": step * 1e3,
                   "decode_tok_s": b * (a.new_tokens - 1) / d, "prefill_tok_s": b * a.prompt_len / p,
                   "step_bytes": step_bytes(weights, s, b)}
            r = replay_s(llm, b, dev) if llm is not None else None
            if r is not None:
                row["replay_ms"], row["host_share"] = r * 1e3, step / r - 1
            rows.append(row)
            if d <= 1e-9:  # HF: the 1-token run took as long as the full one (timer noise, CPU smoke)
                row["decode_tok_s"] = float("nan")
            print(f"  batch {b}: {row['decode_tok_s']:.0f} decode tok/s"
                  + (f", step {step * 1e3:.2f} ms vs graph replay {r * 1e3:.2f} ms" if r else ""), flush=True)
            if a.profile and kind != "hf" and b == max(batches):
                profile(generate, prompts[b], a.new_tokens)
        if llm is not None:
            llm.close()
        del generate, weights, llm
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    for row in rows:  # greedy agreement of the first sequence: vs HF, and overlap on vs off
        b, k = row["batch"], row["engine"]
        for ref in ("bf16-no-overlap",) if dummy else ("hf", "bf16-no-overlap"):  # dummy: HF has other weights
            if k != ref and (ref, b) in tokens and k.startswith("bf16"):
                same = sum(x == y for x, y in zip(tokens[k, b][0], tokens[ref, b][0]))
                row[f"greedy_match_{ref}"] = f"{same}/{len(tokens[k, b][0])}"
        if k == "bf16" and ("bf16-no-overlap", b) in tokens:
            row["identical_to_no_overlap"] = tokens[k, b] == tokens["bf16-no-overlap", b]
    if not a.workdir:
        shutil.rmtree(root, ignore_errors=True)
    return {"shape": {k: v for k, v in s.items()}, "hot_experts_per_layer": a.hot_experts if hot else None,
            "load_format": a.load_format, "rows": rows}


def report(shape: str, res: dict, bw: float, a) -> None:
    print(f"\n{shape}: prompt {a.prompt_len}, {a.new_tokens} new tokens; roofline = batch x {bw / 1e12:.2f} TB/s "
          "/ weight bytes per step")
    print("| engine | batch | decode tok/s | roofline tok/s | % roofline | step ms | graph replay ms | host adds "
          "| prefill tok/s | greedy = HF | greedy = no overlap |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in res["rows"]:
        roof = r["batch"] * bw / r["step_bytes"]
        replay = f"{r['replay_ms']:.2f}" if "replay_ms" in r else ""
        host = f"{100 * r['host_share']:.0f}%" if "host_share" in r else ""
        print(f"| {r['engine']} | {r['batch']} | {r['decode_tok_s']:.0f} | {roof:.0f} | "
              f"{100 * r['decode_tok_s'] / roof:.0f}% | {r['step_ms']:.2f} | {replay} | {host} | "
              f"{r['prefill_tok_s']:.0f} | {r.get('greedy_match_hf', '')} | {r.get('greedy_match_bf16-no-overlap', '')} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="llama-1b", help=f"comma-separated: {', '.join(SHAPES)}")
    ap.add_argument("--engines", help="comma-separated subset of: " + "; ".join(
        f"{f}: {', '.join(e)}" for f, e in ENGINES.items()))
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--hot-experts", type=int, default=16, help="experts per layer in FP8 in the MoE mix")
    ap.add_argument("--workdir", help="keep checkpoints here and reuse them (else a temporary directory)")
    ap.add_argument("--load-format", choices=("auto", "dummy"), default="auto",
                    help="dummy: write no checkpoints; every mixq engine makes random weights in its formats "
                         "(mixq.models.dummy) and HF runs its own random init")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--profile", action="store_true",
                    help="print torch.profiler's top ops of one generate at the largest batch, per mixq engine")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes of both families on the CPU, seconds")
    ap.add_argument("--out")
    a = ap.parse_args()
    if a.smoke:
        a.shape, a.device, a.batches, a.prompt_len, a.new_tokens, a.repeats = "tiny-llama,tiny-moe", "cpu", "1,3", 8, 5, 1
        a.hot_experts = 2
    dev = torch.device(a.device)
    bad = [s for s in a.shape.split(",") if s not in SHAPES]
    if bad:
        ap.error(f"--shape {','.join(bad)}: expected {', '.join(SHAPES)}")
    bw = copy_bw(dev)
    results = {}
    for shape in a.shape.split(","):
        results[shape] = run_shape(shape, a, dev)
        report(shape, results[shape], bw, a)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"\ndevice {name}; torch {torch.__version__}; copy bandwidth {bw / 1e12:.3f} TB/s")
    if a.out:
        Path(a.out).write_text(json.dumps({"device": name, "args": vars(a), "copy_bandwidth": bw, "shapes": results},
                                          indent=2))


if __name__ == "__main__":
    main()
