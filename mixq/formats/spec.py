"""Typed description of a stored weight: what a kernel needs to know to compute with it.

A `WeightSpec` is data, not a class hierarchy: the layer asks the kernels which of them
can implement a spec on a device. A `QuantizedWeight` is the weight as it was read from
the checkpoint: its packed tensors, untouched, plus its spec and logical shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

# How the bytes are laid out in the checkpoint (one reader per layout).
Layout = Literal[
    "dense",  # plain float tensor
    "fp8",  # float8_e4m3fn [N, K] + scale (tensor/channel/block)
    "int8",  # int8 [N, K] + per-channel scale (compressed-tensors int-quantized)
    "ct-packed",  # compressed-tensors pack-quantized: int32 [N, K*bits/32]
    "gptq",  # AutoGPTQ/GPTQModel: qweight int32 [K*bits/32, N], qzeros, scales, g_idx
    "awq",  # AutoAWQ GEMM: qweight int32 [K, N*bits/32] interleaved, qzeros, scales
    "gguf",  # llama.cpp GGML blocks: uint8 [N, K/B, T] (type in WeightSpec.qtype)
]
ScaleLayout = Literal["none", "tensor", "channel", "group", "block"]
# How activations are treated by the kernel for this weight.
ActivationQuant = Literal["none", "dynamic-token", "static-tensor", "dynamic-group"]


@dataclass(frozen=True)
class WeightSpec:
    """Everything about a stored weight's encoding, independent of its values.

    group_size: columns of K sharing a scale (scale_layout "group"); None otherwise.
    block_size: (rows of N, columns of K) sharing a scale (scale_layout "block").
    symmetric: no zero point stored (ints are centred at 2**(bits-1) or signed).
    act_order: columns map to groups through g_idx (GPTQ desc_act) rather than k // G.
    """

    layout: Layout
    bits: int
    dtype: torch.dtype  # storage dtype of the main tensor
    scale_layout: ScaleLayout = "none"
    group_size: int | None = None
    block_size: tuple[int, int] | None = None
    symmetric: bool = True
    act_order: bool = False
    activation: ActivationQuant = "none"
    zero_offset: int = 0  # GPTQ v1 stores zero - 1: actual zero = stored + zero_offset
    qtype: str | None = None  # layout "gguf": the GGML block type ("q4_k", "q8_0", ...)

    @property
    def is_quantized(self) -> bool:
        return self.layout != "dense"

    @property
    def family(self) -> str:
        """Coarse format name used in tables and stats: bf16, fp8, int8, int4, ..."""
        if self.layout == "dense":
            return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(
                self.dtype, str(self.dtype).removeprefix("torch.")
            )
        if self.layout == "fp8":
            return "fp8"
        if self.layout == "gguf" and self.qtype:
            return self.qtype
        return f"int{self.bits}"

    def describe(self) -> str:
        """Short human-readable description, e.g. 'gptq int4 g128 asym act-order'."""
        if self.layout == "dense":
            return self.family
        if self.layout == "gguf" and self.qtype:
            return f"gguf {self.qtype}"
        parts = [self.family] if self.layout == self.family else [self.layout, self.family]
        if self.scale_layout == "group":
            parts.append(f"g{self.group_size}")
        elif self.scale_layout == "block":
            parts.append(f"block{self.block_size[0]}x{self.block_size[1]}")
        else:
            parts.append(f"per-{self.scale_layout}")
        if not self.symmetric:
            parts.append("asym")
        if self.act_order:
            parts.append("act-order")
        if self.activation != "none":
            parts.append(f"act:{self.activation}")
        return " ".join(parts)


DENSE_SPECS = {
    dt: WeightSpec(layout="dense", bits=torch.finfo(dt).bits, dtype=dt)
    for dt in (torch.bfloat16, torch.float16, torch.float32)
}


def dense_spec(dtype: torch.dtype) -> WeightSpec:
    """The spec of a plain floating-point tensor."""
    if dtype not in DENSE_SPECS:
        return WeightSpec(layout="dense", bits=dtype.itemsize * 8, dtype=dtype)
    return DENSE_SPECS[dtype]


@dataclass
class QuantizedWeight:
    """A weight exactly as stored: packed tensors by role, spec, logical [N, K] shape.

    Roles by layout (shapes for a full, unsharded weight of out_features N, in_features K):
      dense:     weight [N, K] (or any shape for non-matmul tensors)
      fp8:       weight fp8 [N, K]; weight_scale fp32 [1] | [N, 1] | [ceil(N/bn), ceil(K/bk)];
                 input_scale fp32 [1] (static activation scale, optional)
      int8:      weight int8 [N, K]; weight_scale [N, 1]; weight_zero_point [N, 1] (asym);
                 input_scale / input_zero_point (static activations, optional)
      ct-packed: weight_packed int32 [N, K*bits/32]; weight_scale [N, K/G]; weight_zero_point
                 int32 [N*bits/32, K/G] (asym); weight_g_idx int32 [K] (act-order)
      gptq:      qweight int32 [K*bits/32, N]; qzeros int32 [K/G, N*bits/32]; scales [K/G, N];
                 g_idx int32 [K] (act-order)
      awq:       qweight int32 [K, N*bits/32]; qzeros int32 [K/G, N*bits/32]; scales [K/G, N]
      gguf:      blocks uint8 [N, K/B, T] (B values in T bytes per block; mixq.formats.gguf_quants)
    Tensor-parallel shards hold the same roles for their slice; `shape` is the shard's.
    """

    name: str
    spec: WeightSpec
    shape: tuple[int, ...]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    # float32 [K]: multiply the input by this before the weight (smoothing compensation,
    # see mixq.formats.smoothing); None almost always.
    input_scale: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        """Bytes held by this weight's tensors (what it costs in memory)."""
        extra = 0 if self.input_scale is None else self.input_scale.numel() * self.input_scale.element_size()
        return extra + sum(t.numel() * t.element_size() for t in self.tensors.values())

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Reference dequantization to a dense [N, K] tensor. For tests and tools only:
        the engine never calls this (the CPU compute path dequantizes tile by tile)."""
        from mixq.formats.registry import reader_for_layout

        return reader_for_layout(self.spec.layout).dequantize(self).to(dtype)

    def to(self, device: torch.device | str) -> QuantizedWeight:
        scale = None if self.input_scale is None else self.input_scale.to(device)
        return QuantizedWeight(
            self.name, self.spec, self.shape, {k: v.to(device) for k, v in self.tensors.items()}, scale
        )
