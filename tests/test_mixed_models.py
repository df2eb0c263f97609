"""A model assembled from several formats computes what HF transformers computes on the
reference-dequantized weights of that exact mix — including MoE layers whose experts are
each in their own format (w13 and w2 of one expert may differ too)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from mixq.config.schema import MixedPrecisionConfig
from mixq.engine.model_runner import ModelRunner, SeqChunk
from mixq.errors import CheckpointError
from mixq.formats import build_plan, load_weights
from mixq.models import build_model, load_model_weights
from tests.act_quant_ref import hook_activation_quant
from tests.ckpt_utils import quantize_checkpoint, write_checkpoint
from tests.devices import DEVICE
from tests.test_models_hf import hf_logits, make_hf

FORMATS = {"gptq": ("gptq", {"act_order": True, "group": 32}), "awq": ("awq", {"group": 32}),
           "fp8": ("ct-fp8", {}), "fp8w": ("ct-fp8", {"activations": False}),
           "gptq8": ("gptq", {"bits": 8, "group": 32, "sym": False})}
PATH_KEYS = {"gptq": "gptq_int4_path", "awq": "awq_int4_path", "fp8": "fp8_path", "gptq8": "int8_path"}


def build_variants(family, root):
    hf = make_hf(family, root / "bf16")
    import json

    cfg = json.loads((root / "bf16" / "config.json").read_text())
    dense = load_file(str(root / "bf16" / "model.safetensors"))
    for name, (fmt, kw) in FORMATS.items():
        tensors, qc = quantize_checkpoint(dense, fmt, **kw)
        write_checkpoint(root / name, tensors, cfg, qc)
    return hf, cfg


def run_mix(root, cfg_json, mapping, family_hf_cls, fp8="fp8"):
    """fp8: the FP8 checkpoint, "fp8" (FP8_DYNAMIC: per-token FP8 activations, which the
    reference model gets through hooks) or "fp8w" (weights only: HF's fused MoE experts
    have no per-expert module to hook)."""
    mp = {"fp16_path": str(root / "bf16"), **{k: str(root / n) for n, k in PATH_KEYS.items()},
          "weight_mapping": mapping}
    mp["fp8_path"] = str(root / fp8)
    plan = build_plan(MixedPrecisionConfig.from_dict({"mixed_precision": mp}))
    weights = load_weights(plan, device=DEVICE)
    model = build_model(plan.model_config, DEVICE)
    load_model_weights(model, weights.values(), torch.float32)
    weights = {n: w.to('cpu') for n, w in weights.items()}
    # reference: HF transformers on the dequantized weights of exactly this mix
    ref_dir = root / "ref"
    ref_dir.mkdir(exist_ok=True)
    save_file({n: w.dequantize().contiguous() for n, w in weights.items()}, str(ref_dir / "model.safetensors"))
    (ref_dir / "config.json").write_text((root / "bf16" / "config.json").read_text())
    ref = family_hf_cls.from_pretrained(ref_dir, dtype=torch.float32).eval()
    if DEVICE == "cpu":  # W8A8 / FP8 schemes quantize their inputs (the GPU methods skip it up to M = 64)
        hook_activation_quant(ref, weights)
    return plan, model, ref


def compare(model, ref, lengths=(9, 4)):
    runner = ModelRunner(model, num_blocks=16, block_size=8, dtype=torch.float32, device=DEVICE)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 128, (n,), generator=g).tolist() for n in lengths]
    chunks = [SeqChunk(p, 0, [2 * i, 2 * i + 1]) for i, p in enumerate(prompts)]
    logits = runner.forward(chunks).cpu()
    for i, p in enumerate(prompts):
        torch.testing.assert_close(logits[i], hf_logits(ref, p)[-1], rtol=1e-4, atol=1e-4)
    nxt = logits.argmax(-1).tolist()
    logits = runner.forward([SeqChunk([t], len(p), c.block_table) for t, p, c in zip(nxt, prompts, chunks)]).cpu()
    for i, p in enumerate(prompts):
        torch.testing.assert_close(logits[i], hf_logits(ref, p + [nxt[i]])[-1], rtol=1e-4, atol=1e-4)


def test_llama_mix_of_every_format(tmp_path):
    import transformers

    hf, _ = build_variants("llama", tmp_path)
    mapping = {
        "model.layers.*.self_attn.*_proj.weight": "fp8",
        "model.layers.0.self_attn.v_proj.weight": "bf16",
        "model.layers.*.mlp.gate_proj.weight": "gptq_int4",
        "model.layers.*.mlp.up_proj.weight": "gptq_int4",
        "model.layers.1.mlp.up_proj.weight": "awq_int4",
        "model.layers.1.mlp.down_proj.weight": "awq_int4",
        "model.layers.0.mlp.down_proj.weight": "int8",
    }
    split = {**mapping, "model.layers.1.mlp.up_proj.weight": "gptq_int4"}
    with pytest.raises(CheckpointError, match="layers.1.mlp.up_proj.weight .* and model.layers.1.mlp.down_proj.weight .* must come from one checkpoint"):
        run_mix(tmp_path, None, split, transformers.LlamaForCausalLM)
    plan, model, ref = run_mix(tmp_path, None, mapping, transformers.LlamaForCausalLM)
    layouts = {n: t.spec.layout for n, t in plan.tensors.items()}
    assert layouts["model.layers.1.mlp.down_proj.weight"] == "awq"
    assert layouts["model.layers.0.mlp.down_proj.weight"] == "gptq" and plan.tensors[
        "model.layers.0.mlp.down_proj.weight"].spec.bits == 8
    compare(model, ref)
    # the mix really differs from the dense model: quantization moved the logits
    assert not torch.allclose(hf_logits(hf, [1, 2, 3]), hf_logits(ref, [1, 2, 3]), atol=1e-3)


@pytest.mark.parametrize("family", ["qwen3-moe", "mixtral"])
def test_moe_experts_each_in_their_own_format(family, tmp_path):
    import transformers

    hf_cls = {"qwen3-moe": transformers.Qwen3MoeForCausalLM, "mixtral": transformers.MixtralForCausalLM}[family]
    build_variants(family, tmp_path)
    if family == "mixtral":
        base, (g, u, d) = "model.layers.*.block_sparse_moe.experts", ("w1", "w3", "w2")
    else:
        base, (g, u, d) = "model.layers.0.mlp.experts", ("gate_proj", "up_proj", "down_proj")
    mapping = {
        f"{base}.0.{g}.weight": "gptq_int4", f"{base}.0.{u}.weight": "gptq_int4", f"{base}.0.{d}.weight": "int8",
        f"{base}.1.{g}.weight": "fp8", f"{base}.1.{u}.weight": "fp8", f"{base}.1.{d}.weight": "gptq_int4",
        f"{base}.3.*.weight": "awq_int4",  # expert 2 stays bf16
        "model.layers.*.self_attn.o_proj.weight": "fp8",
    }
    plan, model, ref = run_mix(tmp_path, None, mapping, hf_cls, fp8="fp8w")
    moe = model.model.layers[0].get_submodule("block_sparse_moe" if family == "mixtral" else "mlp")
    kinds = [tuple(getattr(moe.experts[e], n).weight.spec.layout for n in (g, u, d)) for e in range(4)]
    assert kinds == [("gptq",) * 3, ("fp8", "fp8", "gptq"), ("dense",) * 3, ("awq",) * 3]
    assert moe.experts[0].names and getattr(moe.experts[0], d).weight.spec.bits == 8
    compare(model, ref, lengths=(11, 6))


FIX = __import__("pathlib").Path(__file__).parent / "fixtures"


def test_real_checkpoints_mix_with_smoothing_compensation(tmp_path):
    """Checkpoints from llm-compressor and GPTQModel in one model. The AWQ checkpoints fold
    their smoothing into the RMSNorm weights; with the base's norms, their Linears get the
    exact per-channel compensation, so the mix equals HF on W * diag(input_scale)."""
    import transformers

    m = FIX / "tiny-llama"
    mp = {"fp16_path": str(m / "bf16"), "fp8_path": str(m / "fp8-block-deepseek"), "int8_path": str(m / "w8a8-int8"),
          "gptq_int4_path": str(m / "gptq-legacy-4bit-desc-act"), "awq_int4_path": str(m / "awq-gemm"),
          "int4_path": str(m / "awq-w4a16"),
          "weight_mapping": {"re:model\\.layers\\.0\\.self_attn\\.[qkv]_proj\\.weight": "awq_int4",
                             "model.layers.0.self_attn.o_proj.weight": "int8",
                             "model.layers.0.mlp.*": "gptq_int4",
                             "model.layers.1.self_attn.*": "fp8",
                             "model.layers.1.mlp.*": "int4"}}
    plan = build_plan(MixedPrecisionConfig.from_dict({"mixed_precision": mp}))
    assert sorted(plan.input_scales) == sorted(
        [f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkv"]
        + [f"model.layers.1.mlp.{p}_proj.weight" for p in ("gate", "up")])
    weights = load_weights(plan, device=DEVICE)
    model = build_model(plan.model_config, DEVICE)
    load_model_weights(model, weights.values(), torch.float32)
    weights = {n: w.to('cpu') for n, w in weights.items()}
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    dense = {}
    for n, w in weights.items():
        d = w.dequantize()
        dense[n] = (d if w.input_scale is None else d * w.input_scale).contiguous()
    save_file(dense, str(ref_dir / "model.safetensors"))
    (ref_dir / "config.json").write_text((m / "bf16" / "config.json").read_text())
    ref = transformers.LlamaForCausalLM.from_pretrained(ref_dir, dtype=torch.float32).eval()
    if DEVICE == "cpu":  # the GPU methods skip activation quantization up to M = 64 tokens
        assert hook_activation_quant(ref, weights) == 5  # W8A8 o_proj, block-FP8 layer-1 attention
    compare(model, ref)

    # The compensation undoes the smoothing: per input column, W_awq * m fits the BF16
    # weight with ratio ~1 (only quantization noise), while W_awq alone is off by s_j.
    base = build_plan(model_path=str(m / "bf16"))
    for n, scale in plan.input_scales.items():
        w_base = base.catalog(base.tensors[n]).read(n).tensors["weight"].float()
        q = weights[n].dequantize()

        def col_ratio(w, w_base=w_base):
            return ((w * w_base).sum(0) / (w_base * w_base).sum(0) - 1).abs().median()

        assert col_ratio(q * scale) < 0.5 * col_ratio(q), n
