"""Dense y = x W^T (+ b) with the CPU's fast path for one row of 16-bit activations.

torch 2.13 on a Sapphire Rapids core (bench/cpu.py's machine), one row of bf16 x against
W [N, K]: F.linear goes through oneDNN's matmul at 46 us (576 x 576), 108 us (1536 x 576)
and 35 ms (49152 x 576, a tied LM head); torch.mv on the same tensors takes 27 us, 54 us
and 11 ms. Decode steps of one sequence are exactly that shape, so they take mv."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ w [N, K]^T (+ bias [N]) -> [..., N] in x's dtype; one bf16/fp16 row on
    the CPU runs as a matrix-vector product, everything else as F.linear."""
    if (x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16) and x.numel() == x.shape[-1]
            and w.dtype == x.dtype and w.dim() == 2 and not torch.compiler.is_compiling()):
        y = torch.mv(w, x.reshape(-1))
        if bias is not None:
            y = y + bias
        return y.reshape(*x.shape[:-1], w.shape[0])
    return F.linear(x, w, bias)
