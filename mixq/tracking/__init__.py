"""Observability attached from outside the model: memory stats, expert activation tracking."""

from mixq.tracking.experts import (
    ExpertActivationTracker,
    export_expert_activation_stats,
    get_expert_activation_stats,
    reset_expert_activation_stats,
)
from mixq.tracking.memory import get_mixed_precision_memory_stats

__all__ = [
    "ExpertActivationTracker",
    "export_expert_activation_stats",
    "get_expert_activation_stats",
    "get_mixed_precision_memory_stats",
    "reset_expert_activation_stats",
]
