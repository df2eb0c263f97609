"""mixq: LLM inference in true mixed precision.

Every weight tensor comes from the checkpoint the user chose for it (BF16, FP8, INT8,
GPTQ-INT4, AWQ-INT4), stays in that compressed format in memory, and is computed by a
kernel made for that format.

This package's top level stays import-light (no torch): the scheduler and the config
are usable without it.
"""

__version__ = "0.1.0"
