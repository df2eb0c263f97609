"""AWQ checkpoints in the AutoAWQ GEMM layout (``quant_method: awq``, ``version: gemm``).

Per quantized Linear X (out N, in K, G groups, 4 bits):
  X.qweight int32 [K, N/8]   packed along N; slot j of a word holds column 8c + AWQ_ORDER[j]
  X.qzeros  int32 [G, N/8]   same packing
  X.scales  fp16  [G, N]
Dequant: w[n, k] = (q[k, n] - zero[k // G, n]) * scale[k // G, n] (no zero offset).
Other AWQ layouts (GEMV, Marlin, ExLlama) are refused.
"""

from __future__ import annotations

import torch

from mixq.errors import CheckpointError, UnsupportedFormatError
from mixq.formats.base import (
    GROUP,
    Entry,
    FormatReader,
    Role,
    expand_groups,
    module_of,
    stored_bytes,
)
from mixq.formats.checkpoint import Checkpoint
from mixq.formats.packing import AWQ_ORDER, unpack_int32
from mixq.formats.spec import QuantizedWeight, WeightSpec


class AWQReader(FormatReader):
    layout = "awq"

    def __init__(self, qc: dict | None = None, source: str = ""):
        if qc is None:  # dequantize-only instance (registry)
            return
        version = str(qc.get("version", qc.get("format", "gemm"))).lower()
        if version != "gemm":
            raise UnsupportedFormatError(f"{source}: AWQ version {version!r} is not supported (gemm)")
        bits = int(qc.get("bits", qc.get("w_bit", 4)))
        if bits != 4:
            raise UnsupportedFormatError(f"{source}: AWQ with {bits} bits is not supported (4)")
        group = int(qc.get("group_size", qc.get("q_group_size", 128)))
        if group <= 0:
            raise UnsupportedFormatError(f"{source}: AWQ group_size {group} is not supported")
        self.spec = WeightSpec(
            layout="awq", bits=4, dtype=torch.int32, scale_layout="group", group_size=group,
            symmetric=not bool(qc.get("zero_point", True)),
        )

    def claim(self, ckpt: Checkpoint, unclaimed: set[str]) -> list[Entry]:
        spec = self.spec
        entries = []
        for name in sorted(unclaimed):
            mod = module_of(name, ".qweight")
            if mod is None:
                continue
            qweight = ckpt.info(name)
            k, n = qweight.shape[0], qweight.shape[1] * 8
            roles = {
                "qweight": Role(name, ((0, 1, 8), (1, 0, 1))),
                "qzeros": Role(f"{mod}.qzeros", ((0, 1, 8), (1, 0, GROUP))),
                "scales": Role(f"{mod}.scales", ((0, 1, 1), (1, 0, GROUP))),
            }
            for r in roles.values():
                ckpt.info(r.tensor)
            scales = ckpt.info(f"{mod}.scales")
            if scales.shape != (-(-k // spec.group_size), n):
                raise CheckpointError(
                    f"checkpoint {ckpt.file_of(scales.name)}: {scales.name} has shape {scales.shape}; "
                    f"expected [{-(-k // spec.group_size)}, {n}] for an AWQ GEMM weight [{k}, {n}/8]"
                )
            unclaimed -= {r.tensor for r in roles.values()}
            entries.append(Entry(f"{mod}.weight", spec, (n, k), roles, stored_bytes(ckpt, roles)))
        return entries

    def dequantize(self, qw: QuantizedWeight) -> torch.Tensor:
        spec, k = qw.spec, qw.shape[1]
        q = unpack_int32(qw.tensors["qweight"], 4, dim=1, order=AWQ_ORDER)  # [K, N]
        z = unpack_int32(qw.tensors["qzeros"], 4, dim=1, order=AWQ_ORDER)  # [G, N]
        scales = qw.tensors["scales"].float()
        groups = expand_groups(scales.shape[0], k, spec.group_size, None)
        return ((q - z[groups]).float() * scales[groups]).t()
