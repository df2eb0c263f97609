"""Observability attached from outside the model: memory stats, expert activation tracking."""

from mixq.tracking.memory import get_mixed_precision_memory_stats

__all__ = ["get_mixed_precision_memory_stats"]
