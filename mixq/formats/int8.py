"""INT8 weights stored unpacked (compressed-tensors ``int-quantized`` / ``naive-quantized``):
``X.weight`` int8 [N, K], ``X.weight_scale`` [N, 1] (per channel) or [1] (per tensor),
``X.weight_zero_point`` [N, 1] when asymmetric. Claimed by the compressed-tensors reader.
"""

from __future__ import annotations

import torch

from mixq.formats.base import FormatReader
from mixq.formats.fp8 import expand_scale
from mixq.formats.spec import QuantizedWeight


class Int8Dequant(FormatReader):
    layout = "int8"

    def dequantize(self, qw: QuantizedWeight) -> torch.Tensor:
        w = qw.tensors["weight"].float()
        z = qw.tensors.get("weight_zero_point")
        if z is not None:
            w = w - expand_scale(z, qw.spec, qw.shape)
        return w * expand_scale(qw.tensors["weight_scale"], qw.spec, qw.shape)
