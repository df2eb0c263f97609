"""Which compressed-tensors scheme each stored format becomes (from the spec: no data).

A `CtScheme` is what one config group of the exported ``quantization_config`` says: the
compressed-tensors format plus the weight and input-activation quantization arguments.
Tensors with equal schemes share a group. Layouts are mapped explicitly; any other
layout (a format added later, e.g. GGUF block types) is refused by default, naming the
tensor and its format, so a new format is never silently mis-written.

  gptq / awq / ct-packed       -> pack-quantized (int, group or channel scales,
                                  zero points when asymmetric, g_idx for act-order)
  int8, weight-only            -> pack-quantized 8-bit (what vLLM/SGLang run as W8A16)
  int8 with int8 activations   -> int-quantized
  fp8 (tensor/channel/block/group scales) -> float-quantized
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

import torch

from mixq.errors import UnsupportedFormatError
from mixq.formats.spec import WeightSpec

PACK, FLOAT, INT = "pack-quantized", "float-quantized", "int-quantized"
# compressed-tensors' pack-quantized stores 32/bits values per int32 word; mixq's packing
# (mixq.formats.packing) writes the same stream for these widths.
PACK_BITS = (4, 8)


def qargs(num_bits: int, type_: str, strategy: str, *, symmetric: bool = True, group_size: int | None = None,
          block: tuple[int, int] | None = None, dynamic: bool = False, actorder: str | None = None) -> dict:
    """One QuantizationArgs as compressed-tensors writes it into config.json."""
    return {"num_bits": num_bits, "type": type_, "symmetric": symmetric, "group_size": group_size,
            "strategy": strategy, "block_structure": list(block) if block else None, "dynamic": dynamic,
            "actorder": actorder, "observer": None, "observer_kwargs": {}}


@dataclass(frozen=True)
class CtScheme:
    """A config group's scheme. weights/input_activations are kept as canonical JSON so
    schemes hash and compare by value."""

    format: str
    weights_json: str
    input_json: str = "null"

    @property
    def weights(self) -> dict:
        return json.loads(self.weights_json)

    @property
    def input_activations(self) -> dict | None:
        return json.loads(self.input_json)

    @property
    def act_order(self) -> bool:
        return self.weights.get("actorder") == "group"

    def describe(self) -> str:
        """Short label, e.g. 'pack-quantized int4 g128 asym' or 'float-quantized fp8 block128x128 a:dynamic-group'."""
        w, a = self.weights, self.input_activations
        kind = f"{'fp' if w['type'] == 'float' else 'int'}{w['num_bits']}"
        parts = [self.format, kind]
        if w["strategy"] == "group":
            parts.append(f"g{w['group_size']}")
        elif w["strategy"] == "block":
            parts.append("block{}x{}".format(*w["block_structure"]))
        else:
            parts.append(f"per-{w['strategy']}")
        if not w["symmetric"]:
            parts.append("asym")
        if self.act_order:
            parts.append("act-order")
        if a is not None:
            parts.append(f"a:{'dynamic' if a['dynamic'] else 'static'}-{a['strategy']}")
        return " ".join(parts)


def _scheme(fmt: str, weights: dict, inputs: dict | None = None) -> CtScheme:
    return CtScheme(fmt, json.dumps(weights, sort_keys=True), json.dumps(inputs, sort_keys=True))


def refuse(name: str, spec: WeightSpec, why: str) -> UnsupportedFormatError:
    return UnsupportedFormatError(
        f"{name}: {spec.describe()} (layout {spec.layout!r}) has no compressed-tensors equivalent: {why}"
    )


def _activation_args(name: str, spec: WeightSpec, type_: str) -> dict | None:
    if spec.activation == "none":
        return None
    if spec.activation == "dynamic-token":
        return qargs(8, type_, "token", dynamic=True)
    if spec.activation == "static-tensor":
        return qargs(8, type_, "tensor")
    if spec.activation == "dynamic-group":
        # block-FP8 checkpoints quantize activations per token in groups of the block width
        width = spec.block_size[1] if spec.block_size else 128
        return qargs(8, type_, "group", group_size=width, dynamic=True)
    raise refuse(name, spec, f"activation scheme {spec.activation!r}")


def _int_weight_args(name: str, spec: WeightSpec, act_order: bool) -> dict:
    if spec.scale_layout == "group":
        strategy, group = "group", spec.group_size
    elif spec.scale_layout == "channel":
        strategy, group = "channel", None
    else:
        raise refuse(name, spec, f"pack-quantized needs group or channel scales, not {spec.scale_layout}")
    if spec.bits not in PACK_BITS:
        raise refuse(name, spec, f"{spec.bits}-bit integers (exported: {PACK_BITS})")
    return qargs(spec.bits, "int", strategy, symmetric=spec.symmetric, group_size=group,
                 actorder="group" if act_order else None)


def scheme_for(name: str, spec: WeightSpec, act_order: bool | None = None) -> CtScheme | None:
    """The scheme a tensor of this spec is exported with; None for a dense tensor.

    act_order: whether the stored g_idx is non-trivial (a trivial one is dropped, so the
    tensor exports as plain group quantization); defaults to spec.act_order."""
    act_order = spec.act_order if act_order is None else act_order
    if spec.layout == "dense":
        return None
    if spec.layout in ("gptq", "awq", "ct-packed"):
        if spec.activation != "none":  # W4A8-style int activations: no engine here runs them
            raise refuse(name, spec, "packed integer weights with quantized activations are not exported")
        return _scheme(PACK, _int_weight_args(name, spec, act_order))
    if spec.layout == "int8":
        if spec.bits != 8:
            raise refuse(name, spec, f"{spec.bits}-bit int-quantized")
        if spec.activation == "none":
            # weight-only INT8: int-quantized without activations is refused by vLLM and
            # SGLang; the same codes packed four to an int32 are their W8A16 path.
            # A per-tensor scale is written per channel (repeated), losslessly.
            base = spec if spec.scale_layout != "tensor" else _with_channel(spec)
            return _scheme(PACK, _int_weight_args(name, base, False))
        if spec.scale_layout not in ("tensor", "channel", "group"):
            raise refuse(name, spec, f"{spec.scale_layout} scales for int-quantized")
        w = qargs(8, "int", spec.scale_layout, symmetric=spec.symmetric,
                  group_size=spec.group_size if spec.scale_layout == "group" else None)
        return _scheme(INT, w, _activation_args(name, spec, "int"))
    if spec.layout == "fp8":
        if spec.dtype != torch.float8_e4m3fn:
            raise refuse(name, spec, f"fp8 storage {spec.dtype} (exported: float8_e4m3fn)")
        if spec.scale_layout not in ("tensor", "channel", "block", "group"):
            raise refuse(name, spec, f"{spec.scale_layout} scales")
        w = qargs(8, "float", spec.scale_layout, group_size=spec.group_size if spec.scale_layout == "group" else None,
                  block=spec.block_size if spec.scale_layout == "block" else None)
        return _scheme(FLOAT, w, _activation_args(name, spec, "float"))
    raise refuse(name, spec, "no converter for this layout")


def _with_channel(spec: WeightSpec) -> WeightSpec:
    return replace(spec, scale_layout="channel")
