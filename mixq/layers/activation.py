"""SwiGLU's activation: silu(gate) * up, one kernel on CUDA (mixq.kernels.elementwise)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mixq.kernels import elementwise
from mixq.kernels.quant_fused import FP8Act, silu_and_mul_fp8


def silu_and_mul(gate: torch.Tensor, up: torch.Tensor, quant_fp8: bool = False) -> torch.Tensor | FP8Act:
    """gate, up [T, n] -> silu(gate) * up [T, n], in their dtype; with quant_fp8 (the next
    GEMM is FP8 W8A8, `takes_fp8_act`) quantized per token in the same kernel: an FP8Act."""
    if quant_fp8 and elementwise.use_kernels(gate) and gate.dim() == 2 and gate.stride(1) == 1 and up.stride(1) == 1:
        return FP8Act(*silu_and_mul_fp8(gate, up), gate.dtype)
    if elementwise.use_kernels(gate) and gate.dim() == 2 and gate.stride(1) == 1 and up.stride(1) == 1:
        return elementwise.silu_and_mul(gate, up)
    return F.silu(gate) * up
