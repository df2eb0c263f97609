"""RMSNorm (computed in float32, as the reference implementations do); one fused kernel with
the residual add on CUDA (mixq.kernels.elementwise), one C call on the CPU
(mixq.kernels.cpu_elementwise), this torch code elsewhere."""

from __future__ import annotations

import torch
from torch import nn

from mixq.kernels import cpu_elementwise, elementwise
from mixq.kernels.quant_fused import FP8Act, add_rms_norm_fp8


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, quant_fp8: bool = False):
        """Normalize x; with `residual`, first add it and also return the new residual.
        quant_fp8 (the consumer is an FP8 W8A8 GEMM, `takes_fp8_act`): the normed output
        comes back quantized per token, an FP8Act, from one fused kernel."""
        if quant_fp8 and elementwise.use_kernels(x) and x.is_contiguous() and (residual is None or residual.is_contiguous()):
            shape = x.shape
            r = None if residual is None else residual.view(-1, shape[-1])
            q, s, new_res = add_rms_norm_fp8(x.view(-1, shape[-1]), r, self.weight, self.eps)
            act = FP8Act(q, s, torch.promote_types(self.weight.dtype, x.dtype))
            return act if residual is None else (act, new_res.view(shape))
        if elementwise.use_kernels(x) and x.is_contiguous() and (residual is None or residual.is_contiguous()):
            shape = x.shape
            r = None if residual is None else residual.view(-1, shape[-1])
            out, new_res = elementwise.add_rms_norm(x.view(-1, shape[-1]), r, self.weight, self.eps)
            return out.view(shape) if residual is None else (out.view(shape), new_res.view(shape))
        if cpu_elementwise.takes_norm(x, residual, self.weight):  # one C call for the ops below
            out, new_res = cpu_elementwise.add_rms_norm(x, residual, self.weight, self.eps)
            return out if residual is None else (out, new_res)
        out, new_res = rms_norm_torch(x, residual, self.weight, self.eps)
        return out if residual is None else (out, new_res)


def rms_norm_torch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                   eps: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The torch code of RMSNorm.forward: (weight * normalized (x + residual) in x's dtype,
    x + residual or None)."""
    if residual is not None:
        x = x + residual
        residual = x
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype), residual
