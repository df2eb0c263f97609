"""Small synthetic checkpoints for config/plan/loader tests (error paths, sharding).

Format *semantics* are tested against checkpoints made by the real quantizers
(tests/fixtures, see scripts/fixtures); these writers only need to be structurally right,
and each is checked against an independent float64 computation where it matters.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from mixq.formats import writers

is_linear = writers.is_decoder_linear


def llama_config(hidden=64, inter=128, layers=2, vocab=96) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": vocab, "rms_norm_eps": 1e-5,
        "max_position_embeddings": 256, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    }


def linear_shapes(cfg: dict) -> dict[str, tuple[int, int]]:
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    hd = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * hd
    shapes = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
              "self_attn.o_proj": (h, h), "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h),
              "mlp.down_proj": (h, i)}
    return {f"model.layers.{n}.{k}.weight": v for n in range(cfg["num_hidden_layers"]) for k, v in shapes.items()}


def dense_tensors(cfg: dict, seed=0, dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h, v = cfg["hidden_size"], cfg["vocab_size"]
    out = {"model.embed_tokens.weight": torch.randn(v, h, generator=g), "lm_head.weight": torch.randn(v, h, generator=g),
           "model.norm.weight": torch.ones(h)}
    for n in range(cfg["num_hidden_layers"]):
        out[f"model.layers.{n}.input_layernorm.weight"] = torch.ones(h)
        out[f"model.layers.{n}.post_attention_layernorm.weight"] = torch.ones(h)
    for name, shape in linear_shapes(cfg).items():
        out[name] = torch.randn(*shape, generator=g) * 0.05
    return {k: t.to(dtype).contiguous() for k, t in out.items()}


def write_checkpoint(path: Path, tensors: dict[str, torch.Tensor], cfg: dict, qc: dict | None = None,
                     shards: int = 1) -> Path:
    """Write config.json and safetensors (an index when shards > 1)."""
    path.mkdir(parents=True, exist_ok=True)
    cfg = dict(cfg)
    if qc is not None:
        cfg["quantization_config"] = qc
    (path / "config.json").write_text(json.dumps(cfg))
    names = sorted(tensors)
    if shards == 1:
        save_file({k: tensors[k] for k in names}, str(path / "model.safetensors"))
        return path
    weight_map = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = names[s::shards]
        save_file({k: tensors[k] for k in part}, str(path / fname))
        weight_map.update({k: fname for k in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def gptq_tensors(name: str, w: torch.Tensor, bits=4, group=32, sym=True, act_order=False):
    """A GPTQ v1 module from w [N, K]; with act_order, a random column order (desc_act)."""
    n, k = w.shape
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(k + n)) if act_order else None
    return writers.gptq_tensors(name.removesuffix(".weight"), w, bits=bits, group=group, sym=sym, perm=perm)


def awq_tensors(name: str, w: torch.Tensor, group=32):
    return writers.awq_tensors(name.removesuffix(".weight"), w, group=group)


def ct_fp8_tensors(name: str, w: torch.Tensor):
    return writers.fp8_tensors(name.removesuffix(".weight"), w)


CT_FP8_QC = writers.quantization_config("fp8")


def quantize_checkpoint(dense: dict[str, torch.Tensor], fmt: str, **kw) -> tuple[dict, dict]:
    """(tensors, quantization_config) for a whole model in one format."""
    out = {k: v for k, v in dense.items()}
    quantized = [k for k in dense if is_linear(k)]
    for name in quantized:
        w = out.pop(name)
        if fmt == "gptq":
            out.update(gptq_tensors(name, w, **kw))
        elif fmt == "awq":
            out.update(awq_tensors(name, w, **kw))
        elif fmt == "ct-fp8":
            out.update(ct_fp8_tensors(name, w))
    if fmt == "gptq":
        qc = {"quant_method": "gptq", "bits": kw.get("bits", 4), "group_size": kw.get("group", 32),
              "sym": kw.get("sym", True), "desc_act": kw.get("act_order", False), "checkpoint_format": "gptq"}
    elif fmt == "awq":
        qc = {"quant_method": "awq", "bits": 4, "group_size": kw.get("group", 32), "zero_point": True,
              "version": "gemm"}
    elif kw.get("activations", True):
        qc = CT_FP8_QC  # FP8_DYNAMIC: per-token FP8 activations
    else:  # FP8 weights only (W8A16)
        group = dict(CT_FP8_QC["config_groups"]["group_0"], input_activations=None)
        qc = dict(CT_FP8_QC, config_groups={"group_0": group})
    return out, qc


def weight_only_copy(src: Path, dst: Path) -> Path:
    """`src` (a compressed-tensors checkpoint) as weights-only: the same files (symlinked),
    config.json without input activation quantization. For references that cannot quantize
    activations inside a module (HF's fused MoE experts)."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.name != "config.json":
            (dst / f.name).symlink_to(f.resolve())
    cfg = json.loads((src / "config.json").read_text())
    for group in cfg["quantization_config"]["config_groups"].values():
        group["input_activations"] = None
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst
