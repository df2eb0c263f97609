"""SwiGLU's activation: silu(gate) * up, one kernel on CUDA (mixq.kernels.elementwise)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mixq.kernels import elementwise


def silu_and_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up [T, n] -> silu(gate) * up [T, n], in their dtype."""
    if elementwise.use_kernels(gate) and gate.dim() == 2 and gate.stride(1) == 1 and up.stride(1) == 1:
        return elementwise.silu_and_mul(gate, up)
    return F.silu(gate) * up
