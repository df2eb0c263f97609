"""compressed-tensors checkpoints (what llm-compressor writes).

``quantization_config = {"quant_method": "compressed-tensors", "format": ...,
"config_groups": {name: {"targets": [...], "weights": {...}, "input_activations": {...},
"format": ...}}, "ignore": [...]}``. A module's scheme is the config group whose targets
match it (module-name regex ``re:...`` or exact name first, then class names such as
"Linear", which every quantized Linear matches). What is stored decides the layout:
- ``float-quantized``: ``X.weight`` fp8 + ``X.weight_scale`` -> layout "fp8";
- ``int-quantized`` / ``naive-quantized``: ``X.weight`` int8 + scale -> layout "int8";
- ``pack-quantized``: ``X.weight_packed`` int32 [N, K*bits/32] (values + 2**(bits-1),
  element i at bits i*bits of the little-endian stream), ``X.weight_scale`` [N, K/G],
  ``X.weight_shape``, ``X.weight_zero_point`` int32 [N*bits/32, K/G] packed along N when
  asymmetric, ``X.weight_g_idx`` [K] for activation order -> layout "ct-packed".
"""

from __future__ import annotations

import re

import torch

from mixq.errors import CheckpointError, UnsupportedFormatError
from mixq.formats.base import (
    GROUP,
    WHOLE,
    Entry,
    FormatReader,
    Role,
    expand_groups,
    module_of,
    stored_bytes,
)
from mixq.formats.checkpoint import Checkpoint
from mixq.formats.fp8 import FP8_DTYPES, scale_axes
from mixq.formats.packing import unpack_int32
from mixq.formats.spec import QuantizedWeight, WeightSpec

SUPPORTED_FORMATS = ("float-quantized", "int-quantized", "naive-quantized", "pack-quantized")
_STRATEGY_LAYOUT = {"tensor": "tensor", "channel": "channel", "group": "group", "block": "block"}


def _activation(args: dict | None) -> str:
    if not args:
        return "none"
    strategy = args.get("strategy")
    if args.get("dynamic") in (True, "local"):
        return "dynamic-group" if strategy == "group" else "dynamic-token"
    if strategy == "tensor":
        return "static-tensor"
    raise UnsupportedFormatError(f"input activation scheme {args} is not supported")


class CompressedTensorsReader(FormatReader):
    """Claims every quantized module of a compressed-tensors checkpoint."""

    def __init__(self, qc: dict, source: str):
        self.source = source
        self.global_format = qc.get("format")
        self.groups = qc.get("config_groups") or {}
        if not self.groups:
            raise CheckpointError(f"{source}: compressed-tensors quantization_config has no config_groups")
        for gname, g in self.groups.items():
            fmt = g.get("format") or self.global_format
            if fmt not in SUPPORTED_FORMATS and fmt != "mixed-precision":
                raise UnsupportedFormatError(
                    f"{source}: config group {gname!r} uses compressed-tensors format {fmt!r}; "
                    f"supported: {', '.join(SUPPORTED_FORMATS)}"
                )
            if not g.get("weights"):
                raise UnsupportedFormatError(f"{source}: config group {gname!r} has no weight quantization")
        # Targets indexed once: a mixed export names every module exactly (tens of
        # thousands of targets for a large MoE), so a per-module scan would be quadratic.
        self._exact: dict[str, list[str]] = {}
        self._regex: list[tuple[re.Pattern, str]] = []
        self._by_class: list[str] = []
        for gname, g in self.groups.items():
            for t in g.get("targets", []):
                if t.startswith("re:"):
                    self._regex.append((re.compile(t[3:]), gname))
                elif t[:1].isupper() and "." not in t:  # a class name such as "Linear"
                    self._by_class.append(gname)
                else:
                    self._exact.setdefault(t, []).append(gname)

    def _group_for(self, module: str) -> tuple[str, dict]:
        by_name = self._exact.get(module, []) + [g for rx, g in self._regex if rx.match(module)]
        cands = list(dict.fromkeys(by_name or self._by_class))
        if len(cands) != 1:
            if not cands and len(self.groups) == 1:
                cands = list(self.groups)
            else:
                raise CheckpointError(
                    f"{self.source}: module {module!r} matches config groups {cands or 'none'}; "
                    "cannot tell its quantization scheme"
                )
        return cands[0], self.groups[cands[0]]

    def _spec(self, module: str, layout: str, dtype: torch.dtype, has_g_idx: bool) -> WeightSpec:
        gname, g = self._group_for(module)
        w = g["weights"]
        strategy = w.get("strategy") or ("group" if w.get("group_size") else "tensor")
        if strategy not in _STRATEGY_LAYOUT:
            raise UnsupportedFormatError(f"{self.source}: group {gname!r}: weight strategy {strategy!r}")
        bits = int(w.get("num_bits", 8))
        want_type = "float" if layout == "fp8" else "int"
        if w.get("type", "int") != want_type:
            raise CheckpointError(
                f"{self.source}: module {module!r} is stored as {layout} but config group "
                f"{gname!r} says type {w.get('type')!r}"
            )
        if layout == "ct-packed" and bits not in (4, 8):
            raise UnsupportedFormatError(
                f"{self.source}: module {module!r}: {bits}-bit pack-quantized is not supported (4 or 8)"
            )
        block = w.get("block_structure")
        return WeightSpec(
            layout=layout,
            bits=bits,
            dtype=dtype,
            scale_layout=_STRATEGY_LAYOUT[strategy],
            group_size=int(w["group_size"]) if strategy == "group" else None,
            block_size=(int(block[0]), int(block[1])) if strategy == "block" else None,
            symmetric=bool(w.get("symmetric", True)),
            act_order=has_g_idx,
            activation=_activation(g.get("input_activations")),
        )

    def claim(self, ckpt: Checkpoint, unclaimed: set[str]) -> list[Entry]:
        entries = []
        for name in sorted(unclaimed):
            if (mod := module_of(name, ".weight_packed")) is not None:
                entries.append(self._packed_entry(ckpt, mod, unclaimed))
            elif (mod := module_of(name, ".weight_scale")) is not None and f"{mod}.weight" in ckpt.tensors:
                entries.append(self._unpacked_entry(ckpt, mod, unclaimed))
        return entries

    def _unpacked_entry(self, ckpt: Checkpoint, mod: str, unclaimed: set[str]) -> Entry:
        w = ckpt.info(f"{mod}.weight")
        if w.dtype in FP8_DTYPES:
            layout = "fp8"
        elif w.dtype == torch.int8:
            layout = "int8"
        else:
            raise UnsupportedFormatError(
                f"checkpoint {ckpt.file_of(w.name)}: {w.name} has a weight_scale but dtype {w.dtype}"
            )
        spec = self._spec(mod, layout, w.dtype, has_g_idx=False)
        roles = {"weight": Role(w.name, ((0, 0, 1), (1, 1, 1))),
                 "weight_scale": Role(f"{mod}.weight_scale", scale_axes(spec))}
        for extra in ("weight_zero_point", "input_scale", "input_zero_point"):
            if f"{mod}.{extra}" in ckpt.tensors:
                axes = scale_axes(spec) if extra == "weight_zero_point" else ()
                roles[extra] = Role(f"{mod}.{extra}", axes)
        if not spec.symmetric and "weight_zero_point" not in roles:
            raise CheckpointError(f"checkpoint {ckpt.path}: asymmetric {mod} has no weight_zero_point")
        unclaimed -= {r.tensor for r in roles.values()}
        return Entry(w.name, spec, w.shape, roles, stored_bytes(ckpt, roles))

    def _packed_entry(self, ckpt: Checkpoint, mod: str, unclaimed: set[str]) -> Entry:
        packed = ckpt.info(f"{mod}.weight_packed")
        has_g_idx = f"{mod}.weight_g_idx" in ckpt.tensors
        spec = self._spec(mod, "ct-packed", packed.dtype, has_g_idx)
        if spec.scale_layout not in ("group", "channel"):
            raise UnsupportedFormatError(
                f"{self.source}: {mod}: pack-quantized with {spec.scale_layout} scales is not supported"
            )
        shape = tuple(int(v) for v in ckpt.read(f"{mod}.weight_shape").tolist())
        per = 32 // spec.bits
        k_unit_scale = WHOLE if spec.act_order else GROUP
        if spec.scale_layout == "channel":
            k_unit_scale = WHOLE
        roles = {
            "weight_packed": Role(packed.name, ((0, 0, 1), (1, 1, per))),
            "weight_scale": Role(f"{mod}.weight_scale", ((0, 0, 1), (1, 1, k_unit_scale))),
        }
        if not spec.symmetric:
            roles["weight_zero_point"] = Role(f"{mod}.weight_zero_point", ((0, 0, per), (1, 1, k_unit_scale)))
        if has_g_idx:
            roles["weight_g_idx"] = Role(f"{mod}.weight_g_idx", ((1, 0, 1),))
        for r in roles.values():
            ckpt.info(r.tensor)  # a missing companion tensor is an error naming it
        unclaimed -= {r.tensor for r in roles.values()} | {f"{mod}.weight_shape"}
        return Entry(f"{mod}.weight", spec, shape, roles, stored_bytes(ckpt, roles))


class CtPackedDequant(FormatReader):
    layout = "ct-packed"

    def dequantize(self, qw: QuantizedWeight) -> torch.Tensor:
        spec, (n, k) = qw.spec, qw.shape
        offset = 1 << (spec.bits - 1)
        q = unpack_int32(qw.tensors["weight_packed"], spec.bits, dim=1)[:, :k] - offset
        scale = qw.tensors["weight_scale"].float()
        groups = expand_groups(scale.shape[1], k, spec.group_size, qw.tensors.get("weight_g_idx"))
        w = q.float()
        if "weight_zero_point" in qw.tensors:
            z = unpack_int32(qw.tensors["weight_zero_point"], spec.bits, dim=0)[:n] - offset
            w = w - z.float()[:, groups]
        return w * scale[:, groups]
