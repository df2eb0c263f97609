"""Checkpoint readers (one per format), the load plan, and the streaming loader."""

from mixq.formats.base import Shard
from mixq.formats.gptq_dequantizer import GPTQDequantizer
from mixq.formats.loader import iter_weights, load_weights
from mixq.formats.plan import LoadPlan, PlannedTensor, build_plan
from mixq.formats.registry import CheckpointCatalog
from mixq.formats.spec import QuantizedWeight, WeightSpec

__all__ = [
    "CheckpointCatalog",
    "GPTQDequantizer",
    "LoadPlan",
    "PlannedTensor",
    "QuantizedWeight",
    "Shard",
    "WeightSpec",
    "build_plan",
    "iter_weights",
    "load_weights",
]
