"""Activation smoothing across checkpoints (AWQ, SmoothQuant).

Smoothing quantizers move a per-channel scale s from a Linear's weight into whatever feeds
it: the RMSNorm before it (norm weight / s, Linear columns * s) or, for AWQ, the Linear
before it (v_proj -> o_proj, up_proj -> down_proj). Inside one checkpoint this cancels.
A mix breaks it when a smoothed Linear is fed by a norm or Linear from another source.

- Norm-fed Linears: the source's own norm weight is stored, so the exact fix is known:
  feed the Linear x * (norm_source / norm_used). The plan computes that per-channel
  `input_scale` once; the Linear applies it to its input.
- Linear-fed Linears: the scale is not stored anywhere, so the pair (v_proj, o_proj) or
  (up_proj, down_proj) of a checkpoint that smooths pairs must come from one source; the
  plan refuses a mix that splits them, naming both tensors.
"""

from __future__ import annotations

import re

import torch

from mixq.errors import CheckpointError

# Linears fed by each norm, by the leaf names of the supported families.
_NORM_CONSUMERS = {
    "input_layernorm": re.compile(r"\.self_attn\.(q_proj|k_proj|v_proj)\.weight$"),
    "post_attention_layernorm": re.compile(
        r"\.(mlp|block_sparse_moe)\.(.*\.)?(gate_proj|up_proj|w1|w3|gate|shared_expert_gate)\.weight$"
    ),
}
_LAYER = re.compile(r"^(.*\.layers\.\d+)\.")
# (producer, consumer) pairs AWQ smooths, as (suffix pattern, replacement).
_PAIRS = (("self_attn.v_proj.weight", "self_attn.o_proj.weight"), ("up_proj.weight", "down_proj.weight"),
          ("w3.weight", "w2.weight"))


def feeding_norm(name: str) -> str | None:
    """The norm whose output is this Linear's input, or None."""
    m = _LAYER.match(name)
    if not m:
        return None
    for norm, rx in _NORM_CONSUMERS.items():
        if rx.search(name):
            return f"{m.group(1)}.{norm}.weight"
    return None


def smooths_pairs(catalog) -> bool:
    """Whether a checkpoint's Linears may carry Linear-to-Linear smoothing (AWQ)."""
    if catalog.quant_method == "awq":
        return True
    recipe = catalog.path / "recipe.yaml"
    return recipe.is_file() and "AWQModifier" in recipe.read_text(errors="replace")


def input_scales(plan) -> dict[str, torch.Tensor]:
    """name -> float32 [K] multiplier for Linears whose source smoothed the norm feeding
    them differently from the norm the model will use. Reads only norm vectors."""
    out: dict[str, torch.Tensor] = {}
    cache: dict[tuple[str, str], torch.Tensor] = {}

    def norm_of(path_key: str, norm: str) -> torch.Tensor:
        if (path_key, norm) not in cache:
            cache[(path_key, norm)] = plan.catalogs[path_key].read(norm).tensors["weight"].float()
        return cache[(path_key, norm)]

    for name, t in plan.tensors.items():
        norm = feeding_norm(name)
        if norm is None or norm not in plan.tensors:
            continue
        used = plan.tensors[norm]
        if used.path_key == t.path_key or norm not in plan.catalogs[t.path_key].entries:
            continue
        if getattr(plan.catalogs[t.path_key], "gguf", False):
            # llama.cpp folds no scales into norms; its F32 norms differ from a BF16 base's
            # only by rounding, which is no smoothing to compensate
            continue
        src, ref = norm_of(t.path_key, norm), norm_of(used.path_key, norm)
        if torch.equal(src, ref):
            continue
        bad = (ref == 0) & (src != 0)
        if bad.any():
            raise CheckpointError(
                f"{name}: its source {plan.catalogs[t.path_key].path} smooths {norm} but the norm used "
                f"(from {plan.catalogs[used.path_key].path}) is zero in {int(bad.sum())} channels; "
                "take the norm from the same checkpoint"
            )
        out[name] = torch.where(ref == 0, torch.ones_like(src), src / ref)
    return out


def linked_pairs(shapes: dict[str, tuple[int, ...]]) -> list[tuple[str, str]]:
    """(producer, consumer) tensor names among `shapes` (name -> shape) that an AWQ-style
    checkpoint may have smoothed together, so a mix must take both from one source when
    either source smooths pairs."""
    out = []
    for name in shapes:
        for producer, consumer in _PAIRS:
            if not name.endswith("." + consumer) and name != consumer:
                continue
            other = name[: -len(consumer)] + producer
            if other not in shapes:
                continue
            if producer.startswith("self_attn.v_proj") and shapes[other][0] != shapes[name][1]:
                continue  # v -> o smoothing needs matching shapes (no GQA); tools skip it
            out.append((other, name))
    return out


def check_pairs(plan) -> None:
    """Refuse mixes that split a Linear-to-Linear smoothed pair across sources."""
    smoothing = {k: smooths_pairs(c) for k, c in plan.catalogs.items() if k != "fp16_path"}
    for other, name in linked_pairs({n: tuple(t.entry.shape) for n, t in plan.tensors.items()}):
        t, o = plan.tensors[name], plan.tensors[other]
        if o.path_key != t.path_key:
            for key in (t.path_key, o.path_key):
                if smoothing.get(key):
                    raise CheckpointError(
                        f"{other} ({o.precision}, from {plan.catalogs[o.path_key].path}) and {name} "
                        f"({t.precision}, from {plan.catalogs[t.path_key].path}) must come from one "
                        f"checkpoint: {plan.catalogs[key].path} is AWQ-smoothed, which scales one by s and "
                        "the other by 1/s; map both to the same precision"
                    )
