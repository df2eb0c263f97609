"""GPTQ checkpoints in the AutoGPTQ / GPTQModel layout (``quant_method: gptq``).

Per quantized Linear X (out N, in K, G groups, b bits, p = 32/b values per word):
  X.qweight int32 [K/p, N]   packed along K: word row r holds k = r*p + j at bits j*b
  X.qzeros  int32 [G, N/p]   packed along N the same way
  X.scales  fp16  [G, N]
  X.g_idx   int32 [K]        group of each input column (desc_act / act-order)
Dequant: w[n, k] = (q[k, n] - zero[g(k), n]) * scale[g(k), n]. In the original ("v1",
``checkpoint_format: gptq``) convention the stored zero is the real zero minus one, so
zero = qzeros + 1; GPTQModel's internal "gptq_v2" stores it as is. group_size -1 means one
group spanning K (per-channel).
"""

from __future__ import annotations

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
from mixq.formats.packing import unpack_int32
from mixq.formats.spec import QuantizedWeight, WeightSpec


class GPTQReader(FormatReader):
    layout = "gptq"

    def __init__(self, qc: dict | None = None, source: str = ""):
        if qc is None:  # dequantize-only instance (registry)
            return
        bits = int(qc.get("bits", 4))
        if bits not in (4, 8):
            raise UnsupportedFormatError(f"{source}: GPTQ with {bits} bits is not supported (4 or 8)")
        fmt = qc.get("checkpoint_format", qc.get("format", "gptq"))
        if fmt not in ("gptq", "gptq_v2"):
            raise UnsupportedFormatError(
                f"{source}: GPTQ checkpoint_format {fmt!r} is not supported (gptq, gptq_v2)"
            )
        group = int(qc.get("group_size", 128))
        self.spec = WeightSpec(
            layout="gptq",
            bits=bits,
            dtype=torch.int32,
            scale_layout="channel" if group == -1 else "group",
            group_size=None if group == -1 else group,
            symmetric=bool(qc.get("sym", True)),
            act_order=bool(qc.get("desc_act", False)),
            zero_offset=1 if fmt == "gptq" else 0,
        )

    def claim(self, ckpt: Checkpoint, unclaimed: set[str]) -> list[Entry]:
        spec = self.spec
        per = 32 // spec.bits
        entries = []
        for name in sorted(unclaimed):
            mod = module_of(name, ".qweight")
            if mod is None:
                continue
            qweight = ckpt.info(name)
            scales = ckpt.info(f"{mod}.scales")
            k, n = qweight.shape[0] * per, qweight.shape[1]
            groups_k = WHOLE if spec.act_order or spec.group_size is None else GROUP
            roles = {
                "qweight": Role(name, ((0, 1, 1), (1, 0, per))),
                "qzeros": Role(f"{mod}.qzeros", ((0, 1, per), (1, 0, groups_k))),
                "scales": Role(scales.name, ((0, 1, 1), (1, 0, groups_k))),
            }
            if f"{mod}.g_idx" in ckpt.tensors:
                # without desc_act g_idx is trivial: read to check it, then dropped (check)
                roles["g_idx"] = Role(f"{mod}.g_idx", ((1, 0, 1),), held=spec.act_order)
            elif spec.act_order:
                raise CheckpointError(f"checkpoint {ckpt.path}: desc_act is set but {mod}.g_idx is missing")
            for r in roles.values():
                ckpt.info(r.tensor)
            want_groups = 1 if spec.group_size is None else -(-k // spec.group_size)
            if scales.shape != (want_groups, n):
                raise CheckpointError(
                    f"checkpoint {ckpt.file_of(scales.name)}: {scales.name} has shape {scales.shape}, "
                    f"expected {(want_groups, n)} for K={k}, group_size={spec.group_size}"
                )
            unclaimed -= {r.tensor for r in roles.values()}
            # without desc_act a stored g_idx is only checked, then dropped (see `check`):
            # the weight costs what its other roles hold
            held = {r: v for r, v in roles.items() if spec.act_order or r != "g_idx"}
            entries.append(Entry(f"{mod}.weight", spec, (n, k), roles, stored_bytes(ckpt, held)))
        return entries

    def check(self, qw: QuantizedWeight, ckpt: Checkpoint) -> None:
        g_idx = qw.tensors.get("g_idx")
        if g_idx is None or qw.spec.act_order:
            return
        # Without desc_act, g_idx must be the trivial k // G (kernels will not read it).
        k = qw.shape[1]
        trivial = expand_groups(0, k, qw.spec.group_size, None)
        # A tensor-parallel shard of K starts at a group boundary: compare relative to it.
        rel = g_idx.long() - g_idx.long().min()
        if qw.spec.group_size is not None and not torch.equal(rel, trivial):
            raise CheckpointError(
                f"checkpoint {ckpt.path}: {qw.name}: g_idx is not k // group_size but desc_act is false"
            )
        del qw.tensors["g_idx"]

    def dequantize(self, qw: QuantizedWeight) -> torch.Tensor:
        spec, (n, k) = qw.spec, qw.shape
        q = unpack_int32(qw.tensors["qweight"], spec.bits, dim=0)[:k]  # [K, N]
        z = unpack_int32(qw.tensors["qzeros"], spec.bits, dim=1)[:, :n] + spec.zero_offset  # [G, N]
        scales = qw.tensors["scales"].float()
        groups = expand_groups(scales.shape[0], k, spec.group_size, qw.tensors.get("g_idx"))
        w = (q - z[groups]).float() * scales[groups]
        return w.t()
