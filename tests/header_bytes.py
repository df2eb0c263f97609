"""Expected byte counts read straight from safetensors headers with the safetensors
library (no mixq code): the independent side of the memory and `inspect` tests."""

from __future__ import annotations

import math
from pathlib import Path

from safetensors import safe_open

ITEMSIZE = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I32": 4, "I64": 8, "I16": 2, "I8": 1, "U8": 1,
            "F8_E4M3": 1, "F8_E5M2": 1, "BOOL": 1}


def header_shapes(ckpt: Path) -> dict[str, tuple[str, list[int]]]:
    """name -> (dtype, shape) of every tensor of a checkpoint directory (all shards)."""
    out = {}
    for f in sorted(Path(ckpt).glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                s = st.get_slice(k)
                out[k] = (s.get_dtype(), s.get_shape())
    return out


def module_bytes(ckpt: Path, weight: str, drop: tuple[str, ...] = ()) -> int:
    """Bytes of the stored tensors of the module `weight` belongs to (`<module>.weight`,
    `<module>.qweight`, `<module>.weight_scale`, ...), except the roles in `drop`."""
    mod = weight.removesuffix(".weight") + "."
    found = {k[len(mod):]: v for k, v in header_shapes(ckpt).items() if k.startswith(mod)}
    if not found:
        raise KeyError(f"{ckpt} stores no tensor of {weight}")
    return sum(math.prod(shape) * ITEMSIZE[dt] for role, (dt, shape) in found.items() if role not in drop)
