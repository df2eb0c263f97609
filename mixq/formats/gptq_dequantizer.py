"""`GPTQDequantizer.dequantize_gptq_weight`, the API promised in MISSION.md.

A reference for tools and tests (the engine computes on the packed weight instead).
"""

from __future__ import annotations

import torch

from mixq.formats.gptq import GPTQReader
from mixq.formats.spec import QuantizedWeight, WeightSpec


class GPTQDequantizer:
    """Dequantize GPTQ (AutoGPTQ v1 layout) tensors to a dense [out, in] weight."""

    @staticmethod
    def dequantize_gptq_weight(
        qweight: torch.Tensor,
        qzeros: torch.Tensor,
        scales: torch.Tensor,
        g_idx: torch.Tensor | None = None,
        bits: int = 4,
        group_size: int = 128,
        zero_offset: int = 1,
    ) -> torch.Tensor:
        """qweight int32 [K*bits/32, N], qzeros int32 [G, N*bits/32], scales [G, N],
        g_idx int32 [K] or None -> weight [N, K] in scales' dtype.

        E.g. qweight [256, 768], qzeros [16, 96], scales [16, 768] -> weight [768, 2048].
        zero_offset=1 is the v1 convention (stored zero = real zero - 1); 0 for gptq_v2.
        """
        if bits not in (4, 8):
            raise ValueError(f"dequantize_gptq_weight: bits must be 4 or 8, got {bits}")
        per = 32 // bits
        k, n = qweight.shape[0] * per, qweight.shape[1]
        groups = 1 if group_size in (-1, None) else -(-k // group_size)
        checks = {
            "qweight dtype": (qweight.dtype, torch.int32),
            "qzeros dtype": (qzeros.dtype, torch.int32),
            "qzeros shape": (tuple(qzeros.shape), (groups, n // per)),
            "scales shape": (tuple(scales.shape), (groups, n)),
        }
        if g_idx is not None:
            checks["g_idx shape"] = (tuple(g_idx.shape), (k,))
        for what, (got, want) in checks.items():
            if got != want:
                raise ValueError(f"dequantize_gptq_weight: {what} is {got}, expected {want}")
        spec = WeightSpec(
            layout="gptq", bits=bits, dtype=torch.int32,
            scale_layout="channel" if groups == 1 and group_size in (-1, None) else "group",
            group_size=None if group_size in (-1, None) else group_size,
            act_order=g_idx is not None, zero_offset=zero_offset,
        )
        tensors = {"qweight": qweight, "qzeros": qzeros, "scales": scales}
        if g_idx is not None:
            tensors["g_idx"] = g_idx
        qw = QuantizedWeight("gptq", spec, (n, k), tensors)
        return GPTQReader().dequantize(qw).to(scales.dtype)
