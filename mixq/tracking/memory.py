"""Mixed-precision memory statistics, from the bytes actually held (or, for a plan, the
bytes the headers say will be held), against the same model in BF16."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from mixq.formats.plan import LoadPlan, layer_of
from mixq.formats.spec import QuantizedWeight

MB = 1024 * 1024


@dataclass
class _Bucket:
    tensors: int = 0
    bytes: int = 0
    bf16_bytes: int = 0

    def add(self, nbytes: int, numel: int) -> None:
        self.tensors += 1
        self.bytes += nbytes
        self.bf16_bytes += 2 * numel

    def as_dict(self) -> dict:
        return {
            "tensors": self.tensors,
            "memory_mb": self.bytes / MB,
            "bf16_memory_mb": self.bf16_bytes / MB,
            "memory_saved_mb": (self.bf16_bytes - self.bytes) / MB,
        }


@dataclass
class MemoryStats:
    """Totals plus per-format and per-layer breakdowns. See `as_dict` for the schema."""

    total: _Bucket = field(default_factory=_Bucket)
    by_format: dict[str, _Bucket] = field(default_factory=dict)
    by_layer: dict[str, _Bucket] = field(default_factory=dict)

    @classmethod
    def from_items(cls, items: Iterable[tuple[str, str, int, int]]) -> MemoryStats:
        """items: (tensor name, format family, bytes held, logical numel)."""
        s = cls()
        for name, family, nbytes, numel in items:
            s.total.add(nbytes, numel)
            s.by_format.setdefault(family, _Bucket()).add(nbytes, numel)
            s.by_layer.setdefault(layer_of(name), _Bucket()).add(nbytes, numel)
        return s

    @classmethod
    def from_weights(cls, weights: Mapping[str, QuantizedWeight]) -> MemoryStats:
        """From loaded weights: the bytes their tensors hold now."""
        return cls.from_items((n, w.spec.family, w.nbytes, w.numel) for n, w in weights.items())

    @classmethod
    def from_plan(cls, plan: LoadPlan) -> MemoryStats:
        """Predicted from a plan's headers (no data read)."""
        return cls.from_items((n, t.spec.family, t.nbytes, t.numel) for n, t in plan.tensors.items())

    def as_dict(self) -> dict:
        t = self.total
        return {
            "memory_mb": t.bytes / MB,
            "bf16_memory_mb": t.bf16_bytes / MB,
            "memory_saved_mb": (t.bf16_bytes - t.bytes) / MB,
            "compression_ratio": t.bf16_bytes / t.bytes if t.bytes else 1.0,
            "num_tensors": t.tensors,
            "by_format": {k: v.as_dict() for k, v in sorted(self.by_format.items())},
            "by_layer": {k: v.as_dict() for k, v in self.by_layer.items()},
        }


_active: Mapping[str, QuantizedWeight] | None = None


def register_loaded_weights(weights: Mapping[str, QuantizedWeight] | None) -> None:
    """Called by whoever loads a model for this process (the engine): the weights that
    `get_mixed_precision_memory_stats()` reports on. None forgets them."""
    global _active
    _active = weights


def get_mixed_precision_memory_stats(weights: Mapping[str, QuantizedWeight] | None = None) -> dict:
    """Memory stats of `weights`, or of the model loaded in this process.

    Returns {"memory_saved_mb", "compression_ratio", "memory_mb", "bf16_memory_mb",
    "num_tensors", "by_format": {family: {...}}, "by_layer": {layer: {...}}}.
    """
    weights = weights if weights is not None else _active
    if weights is None:
        raise RuntimeError("get_mixed_precision_memory_stats: no mixed-precision model is loaded in this process")
    return MemoryStats.from_weights(weights).as_dict()


# -- the KV cache (the other half of the memory at long contexts and large batches) --------

KV_VALUE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "fp8_e4m3": 1, "fp8_e5m2": 1}


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, value_bytes: int, tp_size: int = 1) -> int:
    """KV-cache bytes one token costs a rank: layers x (K and V) x its KV heads x head dim x
    bytes a value. Under TP a rank holds Hkv / tp heads (one, replicated, when tp > Hkv)."""
    heads = num_kv_heads // tp_size if tp_size <= num_kv_heads else 1
    return num_layers * 2 * heads * head_dim * value_bytes


def kv_cache_report(model_config: dict, tp_size: int = 1) -> dict:
    """KV bytes per token for each --kv-cache-dtype (from config.json alone), and what fp8
    saves against bf16, per rank when tp_size > 1 (mixq inspect)."""
    from mixq.models.config import ModelConfig

    mc = ModelConfig.from_hf(model_config)
    per = {name: kv_bytes_per_token(mc.num_layers, mc.num_kv_heads, mc.head_dim, b, tp_size)
           for name, b in KV_VALUE_BYTES.items()}
    return {"layers": mc.num_layers, "kv_heads": mc.num_kv_heads, "head_dim": mc.head_dim, "tp_size": tp_size,
            "bytes_per_token": per, "fp8_saved_per_token": per["bfloat16"] - per["fp8_e4m3"]}


def kv_cache_stats(dtype: str, bytes_per_token: int, tokens: int, bf16_bytes_per_token: int,
                   scales_from_checkpoint: int = 0) -> dict:
    """/memory_stats' "kv_cache": the cache this process allocated against the same cache in
    bf16 (the weights' reference dtype too)."""
    return {"dtype": dtype, "bytes_per_token": bytes_per_token, "bf16_bytes_per_token": bf16_bytes_per_token,
            "capacity_tokens": tokens, "memory_mb": bytes_per_token * tokens / MB,
            "bf16_memory_mb": bf16_bytes_per_token * tokens / MB,
            "memory_saved_mb": (bf16_bytes_per_token - bytes_per_token) * tokens / MB,
            "layers_with_checkpoint_scales": scales_from_checkpoint}
