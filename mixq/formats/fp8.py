"""FP8 E4M3 weights: per-tensor, per-channel, group and 128x128 block scales.

Two checkpoint families store them:
- compressed-tensors ``float-quantized`` (llm-compressor FP8, FP8_DYNAMIC, FP8_BLOCK):
  ``X.weight`` fp8 [N, K], ``X.weight_scale``, optional static ``X.input_scale``
  (claimed by mixq.formats.compressed_tensors, dequantized here);
- ``quant_method: fp8`` with ``weight_block_size`` (DeepSeek-V3, Qwen3-FP8 releases):
  ``X.weight`` fp8 [N, K], ``X.weight_scale_inv`` fp32 [ceil(N/bn), ceil(K/bk)]. Despite
  its name the stored value *multiplies* the fp8 weight: w = fp8 * weight_scale_inv.
Both are held as layout "fp8" with the scale under role "weight_scale".
"""

from __future__ import annotations

import torch

from mixq.errors import UnsupportedFormatError
from mixq.formats.base import Entry, FormatReader, Role, module_of, stored_bytes
from mixq.formats.checkpoint import Checkpoint
from mixq.formats.spec import QuantizedWeight, WeightSpec

FP8_DTYPES = (torch.float8_e4m3fn,)


def expand_scale(scale: torch.Tensor, spec: WeightSpec, shape: tuple[int, int]) -> torch.Tensor:
    """Broadcast a stored scale to the [N, K] weight it applies to (reference use)."""
    n, k = shape
    s = scale.float()
    if spec.scale_layout == "tensor":
        return s.reshape(1, 1).expand(n, k)
    if spec.scale_layout == "channel":
        return s.reshape(n, 1).expand(n, k)
    if spec.scale_layout == "group":
        return s.repeat_interleave(spec.group_size, dim=1)[:, :k]
    if spec.scale_layout == "block":
        bn, bk = spec.block_size
        return s.repeat_interleave(bn, dim=0)[:n].repeat_interleave(bk, dim=1)[:, :k]
    raise ValueError(f"no scale to expand for scale_layout {spec.scale_layout!r}")


def scale_axes(spec: WeightSpec) -> tuple[tuple[int, int, int], ...]:
    """How a scale tensor follows the weight's logical dims when sharded."""
    if spec.scale_layout == "channel":
        return ((0, 0, 1),)
    if spec.scale_layout == "group":
        return ((0, 0, 1), (1, 1, spec.group_size))
    if spec.scale_layout == "block":
        return ((0, 0, spec.block_size[0]), (1, 1, spec.block_size[1]))
    return ()


class FP8Dequant(FormatReader):
    """Dequantization shared by both FP8 families."""

    layout = "fp8"

    def dequantize(self, qw: QuantizedWeight) -> torch.Tensor:
        w = qw.tensors["weight"].float()
        return w * expand_scale(qw.tensors["weight_scale"], qw.spec, qw.shape)


class FP8BlockReader(FP8Dequant):
    """``quant_method: fp8`` checkpoints (block-scaled, DeepSeek-V3 style)."""

    def __init__(self, qc: dict, source: str):
        block = qc.get("weight_block_size")
        if block is None:
            raise UnsupportedFormatError(
                f"{source}: quant_method 'fp8' without weight_block_size (per-tensor FP8 of this "
                "family) is not supported; use a compressed-tensors FP8 checkpoint"
            )
        fmt = qc.get("fmt", "e4m3")
        if fmt != "e4m3":
            raise UnsupportedFormatError(f"{source}: fp8 fmt {fmt!r} not supported (only e4m3)")
        scheme = qc.get("activation_scheme", "dynamic")
        if scheme != "dynamic":
            raise UnsupportedFormatError(
                f"{source}: fp8 activation_scheme {scheme!r} not supported with block scales"
            )
        self.spec = WeightSpec(
            layout="fp8", bits=8, dtype=torch.float8_e4m3fn, scale_layout="block",
            block_size=(int(block[0]), int(block[1])), activation="dynamic-group",
        )

    def claim(self, ckpt: Checkpoint, unclaimed: set[str]) -> list[Entry]:
        entries = []
        for name in sorted(unclaimed):
            mod = module_of(name, ".weight_scale_inv")
            if mod is None:
                continue
            w = ckpt.info(f"{mod}.weight")
            if w.dtype not in FP8_DTYPES:
                raise UnsupportedFormatError(
                    f"checkpoint {ckpt.file_of(w.name)}: {w.name} is {w.dtype}, expected float8_e4m3fn"
                )
            roles = {
                "weight": Role(w.name, ((0, 0, 1), (1, 1, 1))),
                "weight_scale": Role(name, scale_axes(self.spec)),
            }
            entries.append(Entry(w.name, self.spec, w.shape, roles, stored_bytes(ckpt, roles)))
            unclaimed -= {name, w.name}
        return entries
