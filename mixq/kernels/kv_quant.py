"""FP8 KV cache: the dtypes, and the per-tensor scaling every path shares.

`--kv-cache-dtype fp8_e4m3|fp8_e5m2` stores each layer's keys and values in 8 bits with one
scale per tensor (k_scale, v_scale; from the checkpoint, else 1.0 as SGLang does): the cache
holds fp8(clamp(x / scale)) and attention reads fp8 * scale. The clamp saturates at the
format's largest finite value (e4m3 has no infinity: an unclamped cast of a larger value
would be NaN; e5m2 would give inf). The attention kernels fold k_scale into the softmax
scale and v_scale into the output, so the dequantization costs nothing per key.
"""

from __future__ import annotations

import torch

KV_CACHE_DTYPES = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
FP8_DTYPES = tuple(KV_CACHE_DTYPES.values())


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in FP8_DTYPES


def fp8_max(dtype: torch.dtype) -> float:
    """Largest finite value of an fp8 dtype (448 for e4m3fn, 57344 for e5m2)."""
    return float(torch.finfo(dtype).max)


def quantize_kv(x: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """x [..] -> fp8(clamp(x / scale)) in `dtype` (the reference for the store kernel, which
    multiplies by 1 / scale as this does)."""
    m = fp8_max(dtype)
    return (x.float() * (1.0 / scale)).clamp(-m, m).to(dtype)


def dequantize_kv(x: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """A cache slice back in `dtype`: x * scale (x fp8), or x itself cast (other caches)."""
    if is_fp8(x.dtype):
        return (x.float() * scale).to(dtype)
    return x.to(dtype)


def check_kv_dtypes(op: str, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    """Caches in q's dtype or in an fp8 dtype (both alike): ValueError naming `op` otherwise."""
    if k_cache.dtype != v_cache.dtype or (k_cache.dtype != q.dtype and not is_fp8(k_cache.dtype)):
        raise ValueError(f"{op}: cache dtype {k_cache.dtype}/{v_cache.dtype} must be the query dtype {q.dtype} "
                         "or one fp8 dtype for both caches")
