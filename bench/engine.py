"""End-to-end decode benchmark: mixq's engine against HF transformers on the same weights.

Builds a random Llama-3.2-1B-shaped model (or --layers/--hidden/--inter for another size)
with transformers, saves it in BF16, writes GPTQ-INT4 and FP8 checkpoints of it with
mixq's RTN writers, then measures, for batch sizes B:

  HF transformers  `generate` on the BF16 model (greedy, static cache off: its default)
  mixq bf16        the same BF16 checkpoint through the engine, without and with CUDA graphs
  mixq int4        every decoder Linear GPTQ-INT4 (W4A16 kernels)
  mixq mix         attention BF16, MLP gate/up INT4, down FP8 (the README's kind of mix)

Each engine is started once and serves every batch size. Reports output tokens/s of the
decode phase (prefill timed separately), weight memory, the HBM roofline for those weight
bytes (batch x measured copy bandwidth / weight bytes per step), and checks that greedy tokens of mixq bf16 equal HF's for one
prompt (same weights, same math; a differing argmax on a near-tie is reported, not hidden).

    python bench/engine.py [--out results.json] [--batches 1,16,64] [--new-tokens 128]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import yaml
from timing import copy_bandwidth


def build_model(root: Path, layers: int, hidden: int, inter: int, heads: int, kv_heads: int, vocab: int) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                      max_position_embeddings=4096, rope_theta=500000.0, tie_word_embeddings=True,
                      bos_token_id=1, eos_token_id=2)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(root / "bf16")
    # the engine loads a tokenizer: one word per id, so every id decodes
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", bos_token="w1", eos_token="w2").save_pretrained(
        root / "bf16")
    return root / "bf16"


def timed_generate(generate, prompts: list[list[int]], new: int, repeats: int = 2) -> tuple[float, float, list[int]]:
    """(prefill s, decode s, first sequence's tokens): a 1-token run times the prefill, a
    `new`-token run minus it the decode; the fastest of `repeats` of each. Warmed up on the
    timed shapes first (Triton compiles one kernel per launch configuration)."""
    generate(prompts, 3)
    ones, fulls = [], []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        generate(prompts, 1)
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        first = generate(prompts, new)
        torch.cuda.synchronize()
        ones.append(t1 - t0)
        fulls.append(time.perf_counter() - t1)
    prefill = min(ones)
    return prefill, min(fulls) - prefill, first


def hf_engine(path: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()

    @torch.no_grad()
    def generate(prompts, n):
        ids = torch.tensor(prompts, device="cuda")
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
                             eos_token_id=None)
        return out[0, ids.shape[1]:].tolist()

    held = sum(p.numel() * p.element_size() for p in model.parameters())
    return generate, held, lambda: None


def mixq_engine(model_path: str | None, cfg: str | None, max_batch: int, max_tokens: int, graphs: bool):
    from mixq.engine.engine import LLM
    from mixq.engine.sampling_params import SamplingParams

    t = time.perf_counter()
    llm = LLM(model_path=model_path, mixed_precision_config=cfg, max_running_requests=max_batch,
              max_total_tokens=max_tokens, dtype="bfloat16", disable_cuda_graph=not graphs)
    print(f"  engine up in {time.perf_counter() - t:.1f}s (CUDA graphs: {llm.engine.runner.graphs is not None})",
          flush=True)

    def generate(prompts, n):
        outs = llm.generate(prompts, SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True))
        return outs[0].outputs[0].token_ids

    held = sum(w.nbytes for w in llm.engine.weights.values())
    return generate, held, llm.close


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--inter", type=int, default=8192)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--out")
    a = ap.parse_args()

    from mixq.formats.writers import quantize_checkpoint

    root = Path(tempfile.mkdtemp(prefix="mixq-bench-"))
    t = time.perf_counter()
    bf16 = build_model(root, a.layers, a.hidden, a.inter, a.heads, a.kv_heads, a.vocab)
    quantize_checkpoint(bf16, root / "int4", "gptq", group_size=128)
    quantize_checkpoint(bf16, root / "fp8", "fp8", scheme="channel")
    print(f"model + checkpoints written in {time.perf_counter() - t:.0f}s", flush=True)
    configs = {
        "int4": {"mixed_precision": {"fp16_path": str(bf16), "int4_path": str(root / "int4"),
                                     "weight_mapping": {"re:model\\.layers\\.\\d+\\..*_proj\\.weight": "int4"}}},
        "mix": {"mixed_precision": {"fp16_path": str(bf16), "int4_path": str(root / "int4"),
                                    "fp8_path": str(root / "fp8"),
                                    "weight_mapping": {"model.layers.*.mlp.gate_proj.weight": "int4",
                                                       "model.layers.*.mlp.up_proj.weight": "int4",
                                                       "model.layers.*.mlp.down_proj.weight": "fp8"}}},
    }
    paths = {}
    for name, c in configs.items():
        paths[name] = root / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump(c))

    g = torch.Generator().manual_seed(1)
    batches = [int(x) for x in a.batches.split(",")]
    prompts = {b: torch.randint(3, a.vocab, (b, a.prompt_len), generator=g).tolist() for b in batches}
    max_tokens = max(batches) * (a.prompt_len + a.new_tokens + 32)
    engines = {
        "HF transformers bf16": lambda: hf_engine(bf16),
        "mixq bf16, no CUDA graphs": lambda: mixq_engine(str(bf16), None, max(batches), max_tokens, False),
        "mixq bf16": lambda: mixq_engine(str(bf16), None, max(batches), max_tokens, True),
        "mixq int4": lambda: mixq_engine(None, str(paths["int4"]), max(batches), max_tokens, True),
        "mixq mix": lambda: mixq_engine(None, str(paths["mix"]), max(batches), max_tokens, True),
    }
    rows, hf_first = [], {}
    dev = torch.cuda.get_device_name()
    copy_bw = copy_bandwidth()
    for name, make in engines.items():
        print(name, flush=True)
        generate, held, close = make()
        for b in batches:
            p, d, first = timed_generate(generate, prompts[b], a.new_tokens)
            row = {"engine": name, "batch": b, "prefill_s": p, "decode_s": d, "weights_gb": held / 2**30}
            if name.startswith("HF"):
                hf_first[b] = first
            elif name.startswith("mixq bf16"):
                row["greedy_match_hf"] = f"{sum(x == y for x, y in zip(first, hf_first[b]))}/{len(first)}"
            rows.append(row)
            print(f"  batch {b}: {b * (a.new_tokens - 1) / d:.0f} decode tok/s", flush=True)
        close()
        del generate, close
        torch.cuda.empty_cache()
    print(f"\ndevice {dev}; torch {torch.__version__}; model {a.layers}L h{a.hidden} i{a.inter} "
          f"heads {a.heads}/{a.kv_heads} vocab {a.vocab}; prompt {a.prompt_len}, {a.new_tokens} new tokens")
    print(f"measured copy bandwidth {copy_bw / 1e12:.2f} TB/s; roofline = batch x copy bandwidth / weight bytes "
          "(KV reads ignored)")
    print("\n| engine | batch | decode tok/s | roofline tok/s | prefill tok/s | weights GiB | greedy = HF |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        tps = r["batch"] * (a.new_tokens - 1) / r["decode_s"]
        pps = r["batch"] * a.prompt_len / r["prefill_s"]
        roof = r["batch"] * copy_bw / (r["weights_gb"] * 2**30)
        print(f"| {r['engine']} | {r['batch']} | {tps:.0f} | {roof:.0f} | {pps:.0f} | {r['weights_gb']:.2f} | "
              f"{r.get('greedy_match_hf', '')} |")
    if a.out:
        Path(a.out).write_text(json.dumps({"device": dev, "args": vars(a), "copy_bandwidth": copy_bw, "rows": rows},
                                          indent=2))


if __name__ == "__main__":
    main()
