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

from mixq.formats.packing import AWQ_ORDER, pack_int32


def is_linear(name: str) -> bool:
    """Decoder Linear weights a quantizer converts (not embeddings, norms, routers, head)."""
    leaf = name.rsplit(".", 2)[-2] if name.endswith(".weight") else ""
    return ".layers." in name and leaf in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                            "down_proj", "w1", "w2", "w3")


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


def rtn_int(w: torch.Tensor, bits: int, group: int, sym: bool):
    """Round-to-nearest unsigned ints, scales and zeros per (row, group) of w [N, K]."""
    n, k = w.shape
    g = w.float().reshape(n, k // group, group)
    qmax = (1 << bits) - 1
    if sym:
        scale = g.abs().amax(-1) / (qmax / 2)
        zero = torch.full_like(scale, float(1 << (bits - 1)))
    else:
        lo, hi = g.amin(-1), g.amax(-1)
        scale = (hi - lo) / qmax
        zero = torch.round(-lo / scale)
    scale = scale.clamp(min=1e-8).half().float()
    q = torch.clamp(torch.round(g / scale[..., None]) + zero[..., None], 0, qmax)
    return q.reshape(n, k).to(torch.int32), scale.half(), zero.to(torch.int32)


def gptq_tensors(name: str, w: torch.Tensor, bits=4, group=32, sym=True, act_order=False):
    """A GPTQ v1 module from w [N, K]. With act_order, a random permutation assigns
    columns to groups (column perm[j] is in group j // G) as desc_act does."""
    mod = name.removesuffix(".weight")
    n, k = w.shape
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(k + n)) if act_order else None
    wp = w if perm is None else w[:, perm]
    q, s, z = rtn_int(wp, bits, group, sym)
    g_idx = torch.arange(k, dtype=torch.int32) // group
    if perm is not None:
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(k)
        q = q[:, inv]
        g_idx = g_idx[inv]
    return {
        f"{mod}.qweight": pack_int32(q.t().contiguous(), bits, dim=0),
        f"{mod}.qzeros": pack_int32((z - 1).t().contiguous(), bits, dim=1),
        f"{mod}.scales": s.t().contiguous(),
        f"{mod}.g_idx": g_idx,
    }


def awq_tensors(name: str, w: torch.Tensor, group=32):
    mod = name.removesuffix(".weight")
    q, s, z = rtn_int(w, 4, group, sym=False)
    return {
        f"{mod}.qweight": pack_int32(q.t().contiguous(), 4, dim=1, order=AWQ_ORDER),
        f"{mod}.qzeros": pack_int32(z.t().contiguous(), 4, dim=1, order=AWQ_ORDER),
        f"{mod}.scales": s.t().contiguous(),
    }


def ct_fp8_tensors(name: str, w: torch.Tensor):
    mod = name.removesuffix(".weight")
    scale = w.float().abs().amax(1, keepdim=True) / 448.0
    return {f"{mod}.weight": (w.float() / scale).to(torch.float8_e4m3fn), f"{mod}.weight_scale": scale}


CT_FP8_QC = {
    "quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
    "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
        "num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True, "dynamic": False},
        "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True,
                              "symmetric": True}}},
    "ignore": ["lm_head"],
}


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
    else:
        qc = CT_FP8_QC
    return out, qc
