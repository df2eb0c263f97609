"""config.json -> model object, and streaming a plan's weights into it.

Module paths mirror checkpoint names (model.layers.0.self_attn.q_proj), so placing a
weight is a lookup of its module: each module's `load` knows how to take it.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from mixq.formats.spec import QuantizedWeight
from mixq.models.config import ModelConfig
from mixq.models.llama import LlamaForCausalLM
from mixq.models.mixtral import MixtralForCausalLM
from mixq.models.qwen3 import Qwen3ForCausalLM
from mixq.models.qwen_moe import QwenMoeForCausalLM

_FAMILIES: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Qwen2MoeForCausalLM": QwenMoeForCausalLM,
    "Qwen3MoeForCausalLM": QwenMoeForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
}
SUPPORTED_ARCHITECTURES = tuple(_FAMILIES)


def build_model(hf_config: dict, device: torch.device | str = "cpu") -> nn.Module:
    """An unloaded model for a config.json; unsupported architectures are refused."""
    c = ModelConfig.from_hf(hf_config)
    cls = _FAMILIES.get(c.architecture)
    if cls is None:
        raise ValueError(
            f"architecture {c.architecture or '(none)'!r} is not supported; supported: "
            + ", ".join(SUPPORTED_ARCHITECTURES)
        )
    with torch.device(device):
        return cls(c)


def load_model_weights(model: nn.Module, weights: Iterable[QuantizedWeight], dtype: torch.dtype,
                       merge_projections: bool = True) -> None:
    """Place each weight on its module (by name); every module weight must be filled. Then
    call `process_weights_after_loading()` on every module that has one, and (unless
    `merge_projections` is False: tools that hook or swap single projections) let modules
    merge sibling projections into one GEMM (`merge_projections()`, mixq.layers.merged)."""
    modules = dict(model.named_modules())
    seen = set()
    for qw in weights:
        mod_name, _, leaf = qw.name.rpartition(".")
        mod = modules.get(mod_name)
        if mod is None:
            raise ValueError(f"{qw.name}: the model has no module {mod_name!r}")
        if leaf == "weight" and hasattr(mod, "load"):
            mod.load(qw, dtype)
        elif leaf in ("weight", "bias") and isinstance(getattr(mod, leaf, None), nn.Parameter):
            t = qw.tensors["weight"]
            param = getattr(mod, leaf)
            if tuple(t.shape) != tuple(param.shape):
                raise ValueError(f"{qw.name}: shape {list(t.shape)}, expected {list(param.shape)}")
            param.data = t.to(device=param.device, dtype=dtype)
        else:
            raise ValueError(f"{qw.name}: the model has no parameter {leaf!r} on {mod_name!r}")
        seen.add(qw.name)
    missing = [n for n, m in modules.items() if hasattr(m, "load") and getattr(m, "weight", 0) is None
               and getattr(m, "qweight", None) is None]
    if missing:
        raise ValueError(f"no weight loaded for {len(missing)} module(s), e.g. {missing[:3]}")
    # post-load repacks that need several weights at once (MoE experts stacked per format)
    for mod in list(model.modules()):
        if hasattr(mod, "process_weights_after_loading"):
            mod.process_weights_after_loading()
    if merge_projections:
        for mod in list(model.modules()):  # (merging q/k/v adds modules)
            if hasattr(mod, "merge_projections"):
                mod.merge_projections()



def load_kv_scales(model: nn.Module, plan) -> tuple[int, int]:
    """Give each attention layer its checkpoint's per-tensor KV-cache scales (1.0 where
    there are none; used only by an fp8 cache). Returns (layers with scales, layers)."""
    from mixq.formats.kv_scales import kv_cache_scales
    from mixq.layers.attention import PagedAttention

    scales = kv_cache_scales(plan)
    found = total = 0
    for name, m in model.named_modules():
        if isinstance(m, PagedAttention):
            k, v = scales.get(name.rpartition(".")[0], (None, None))
            m.k_scale, m.v_scale = k or 1.0, v or 1.0
            total += 1
            found += k is not None or v is not None
    return found, total


def held_weights(model: nn.Module) -> dict[str, QuantizedWeight]:
    """What the model holds after loading (post-repack, in the model dtype), by name:
    the input to memory stats, which must count bytes actually held."""
    from mixq.formats.spec import dense_spec
    from mixq.layers.embedding import Embedding
    from mixq.layers.linear import MixedPrecisionLinear

    out: dict[str, QuantizedWeight] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, MixedPrecisionLinear) and mod.weight is not None:
            w = mod.weight
            out[f"{name}.weight"] = QuantizedWeight(f"{name}.weight", w.spec, w.shape, w.tensors, mod.input_scale)
        elif isinstance(mod, Embedding) and mod.qweight is not None:
            out[f"{name}.weight"] = mod.qweight
            if mod.head is not None and mod.head.weight.tensors is not mod.qweight.tensors:
                # a kernel's repacked copy for the tied LM head (GPU): bytes held too
                out[f"{name}.weight[lm_head]"] = mod.head.weight
        elif isinstance(mod, Embedding) and mod.weight is not None:
            out[f"{name}.weight"] = QuantizedWeight(f"{name}.weight", dense_spec(mod.weight.dtype),
                                                    tuple(mod.weight.shape), {"weight": mod.weight})
    for name, p in model.named_parameters():
        out[name] = QuantizedWeight(name, dense_spec(p.dtype), tuple(p.shape), {"weight": p.data})
    return out
