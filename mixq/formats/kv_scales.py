"""Per-tensor KV-cache scales stored in checkpoints (for --kv-cache-dtype fp8_*).

FP8 checkpoints made with a KV-cache scheme (llm-compressor, ModelOpt, AutoFP8) store one
scale per layer for keys and one for values, under one of these names (X = the layer's
`self_attn` prefix):

  X.k_scale, X.v_scale                 llm-compressor / compressed-tensors, SGLang, vLLM
  X.k_proj.k_scale, X.v_proj.v_scale   ModelOpt
  X.attn.k_scale, X.attn.v_scale       vLLM-exported
  X.kv_scale                           older AutoFP8: one scale for both

These are not weights: the catalog leaves them out of its entries (`is_kv_scale`) and
`kv_cache_scales(plan)` reads them from the checkpoint that supplies the layer's k_proj
(for k) and v_proj (for v): scales calibrated on that checkpoint's projections. A layer
without them gets 1.0, as SGLang does.
"""

from __future__ import annotations

from mixq.errors import CheckpointError

_K = (".k_scale", ".k_proj.k_scale", ".attn.k_scale", ".kv_scale")
_V = (".v_scale", ".v_proj.v_scale", ".attn.v_scale", ".kv_scale")
_SUFFIXES = tuple(sorted(set(_K + _V)))


def is_kv_scale(name: str) -> bool:
    """Whether a stored tensor is a KV-cache scale (under `self_attn`)."""
    return ".self_attn." in name and name.endswith(_SUFFIXES)


def _read_scale(ckpt, name: str) -> float:
    info = ckpt.info(name)
    n = 1
    for d in info.shape:
        n *= d
    if n != 1:
        raise CheckpointError(f"checkpoint {ckpt.file_of(name)}: KV-cache scale {name!r} has shape "
                              f"{list(info.shape)}; only per-tensor (one-element) scales are supported")
    value = float(ckpt.read(name).float().reshape(()))
    if not 0.0 < value < float("inf"):
        raise CheckpointError(f"checkpoint {ckpt.file_of(name)}: KV-cache scale {name!r} is {value}; "
                              "it must be positive and finite")
    return value


def _find(ckpt, prefix: str, suffixes: tuple[str, ...]) -> float | None:
    for s in suffixes:
        if prefix + s in ckpt.tensors:
            return _read_scale(ckpt, prefix + s)
    return None


def kv_cache_scales(plan) -> dict[str, tuple[float | None, float | None]]:
    """{attention prefix (e.g. "model.layers.0.self_attn"): (k_scale, v_scale)}, None where
    the checkpoint of that projection has none. Reads one-element tensors only."""
    out = {}
    for name, t in plan.tensors.items():
        if not name.endswith(".self_attn.k_proj.weight"):
            continue
        prefix = name[: -len(".k_proj.weight")]
        k = _find(plan.catalog(t).ckpt, prefix, _K)
        v_t = plan.tensors.get(prefix + ".v_proj.weight", t)
        v = _find(plan.catalog(v_t).ckpt, prefix, _V)
        out[prefix] = (k, v)
    return out
