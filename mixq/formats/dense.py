"""Dense tensors (BF16/FP16/FP32): every tensor no quantized reader claimed.

Fused MoE expert tensors, as transformers v5 holds them in memory and some checkpoints
store them (``mlp.experts.gate_up_proj`` [E, 2I, H], ``mlp.experts.down_proj`` [E, H, I]),
are exposed under the per-expert names every other checkpoint uses
(``mlp.experts.{e}.gate_proj.weight`` ...), so mapping patterns and the loader see one
naming scheme. The per-expert entry reads only its slice of the fused tensor.
"""

from __future__ import annotations

import torch

from mixq.errors import CheckpointError
from mixq.formats.base import Entry, FormatReader, Role
from mixq.formats.checkpoint import Checkpoint
from mixq.formats.spec import QuantizedWeight, dense_spec

_FUSED_GATE_UP = ".experts.gate_up_proj"
_FUSED_DOWN = ".experts.down_proj"


class DenseReader(FormatReader):
    layout = "dense"

    def claim(self, ckpt: Checkpoint, unclaimed: set[str]) -> list[Entry]:
        entries = []
        for name in sorted(unclaimed):
            info = ckpt.info(name)
            if name.endswith((_FUSED_GATE_UP, _FUSED_DOWN)) and len(info.shape) == 3:
                entries.extend(self._split_fused(ckpt, name))
                continue
            axes = tuple((d, d, 1) for d in range(min(len(info.shape), 2)))
            roles = {"weight": Role(name, axes)}
            entries.append(Entry(name, dense_spec(info.dtype), info.shape, roles, info.nbytes))
        unclaimed.clear()
        return entries

    def _split_fused(self, ckpt: Checkpoint, name: str) -> list[Entry]:
        info = ckpt.info(name)
        n_exp, rows, cols = info.shape
        spec = dense_spec(info.dtype)
        axes = ((0, 1, 1), (1, 2, 1))
        roles = {"weight": Role(name, axes)}
        prefix = name[: -len(".gate_up_proj") if name.endswith(_FUSED_GATE_UP) else -len(".down_proj")]
        out = []
        if name.endswith(_FUSED_GATE_UP):
            if rows % 2:
                raise CheckpointError(
                    f"checkpoint {ckpt.file_of(name)}: fused {name!r} has odd dim 1 ({rows}); "
                    "expected [experts, 2*intermediate, hidden]"
                )
            inter = rows // 2
            hidden = ckpt.config.get("hidden_size")
            if hidden is not None and cols != hidden:
                raise CheckpointError(
                    f"checkpoint {ckpt.file_of(name)}: fused {name!r} has shape {info.shape}; "
                    f"expected [experts, 2*intermediate, hidden={hidden}]"
                )
            per = inter * cols * info.dtype.itemsize
            for e in range(n_exp):
                for half, proj in enumerate(("gate_proj", "up_proj")):
                    out.append(Entry(f"{prefix}.{e}.{proj}.weight", spec, (inter, cols), roles, per,
                                     offset=(e, half * inter)))
        else:
            per = rows * cols * info.dtype.itemsize
            for e in range(n_exp):
                out.append(Entry(f"{prefix}.{e}.down_proj.weight", spec, (rows, cols), roles, per,
                                 offset=(e, 0)))
        return out

    def dequantize(self, qw: QuantizedWeight) -> torch.Tensor:
        return qw.tensors["weight"].float()
