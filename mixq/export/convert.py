"""Lossless conversion of one stored weight into compressed-tensors tensors.

Every function takes a `QuantizedWeight` exactly as read from its checkpoint and returns
the tensors compressed-tensors stores for that module, by full name. The integer codes,
zero points and scales are moved, never recomputed: dequantizing the result gives the
same numbers as dequantizing the source (tests check this bit for bit, and against
compressed-tensors' own decompression).

Layout facts this relies on (compressed-tensors 0.17-0.20, `pack_to_int32`):
- pack-quantized stores value + 2**(bits-1) (an unsigned code), element i of a row at bits
  [i*bits, (i+1)*bits) of the little-endian int32 stream, packed along K; rows whose
  length is not a multiple of 32/bits are zero-padded;
- asymmetric zero points are packed the same way along N (dim 0), also offset by
  2**(bits-1), so an unsigned GPTQ/AWQ zero is stored as is;
- symmetric schemes store no zero point: the zero is 2**(bits-1) by definition.
GPTQ v1 stores zero - 1 (`spec.zero_offset`); AWQ interleaves its nibbles (AWQ_ORDER).
"""

from __future__ import annotations

import torch

from mixq.errors import CheckpointError
from mixq.export.schemes import CtScheme
from mixq.formats.base import expand_groups
from mixq.formats.packing import AWQ_ORDER, pack_int32, unpack_int32
from mixq.formats.spec import QuantizedWeight


def g_idx_of(qw: QuantizedWeight) -> torch.Tensor | None:
    """The stored act-order group index of a weight, if it holds one."""
    return qw.tensors.get("g_idx", qw.tensors.get("weight_g_idx"))


def is_trivial_g_idx(g_idx: torch.Tensor, k: int, group_size: int | None) -> bool:
    """Whether g_idx is k // group_size (what every reader assumes without one)."""
    return torch.equal(g_idx.long(), expand_groups(0, k, group_size, None))


def _pack(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Unsigned codes packed 32/bits to an int32 along dim, zero-padded to whole words
    (compressed-tensors pads the same way)."""
    per = 32 // bits
    pad = -values.shape[dim] % per
    if pad:
        widths = [0, 0, 0, pad] if dim == 0 else [0, pad]
        values = torch.nn.functional.pad(values, widths)
    return pack_int32(values.contiguous(), bits, dim=dim)


def _check_zeros(qw: QuantizedWeight, zeros: torch.Tensor, symmetric: bool) -> None:
    bits = qw.spec.bits
    mid, top = 1 << (bits - 1), (1 << bits) - 1
    if symmetric:
        bad = zeros != mid
        if bad.any():
            raise CheckpointError(
                f"{qw.name}: {qw.spec.describe()} is declared symmetric but {int(bad.sum())} of its zero "
                f"points are not {mid} (e.g. {int(zeros[bad][0])}); it cannot be written as a symmetric "
                "compressed-tensors scheme without changing its values"
            )
        return
    bad = (zeros < 0) | (zeros > top)
    if bad.any():
        raise CheckpointError(
            f"{qw.name}: {qw.spec.describe()} has {int(bad.sum())} zero points outside [0, {top}] "
            f"(e.g. {int(zeros[bad][0])}: a GPTQ v1 stored zero of {top} means {top + 1}); "
            f"{bits}-bit compressed-tensors zero points cannot hold it, so this weight has no lossless "
            "compressed-tensors form"
        )


def _packed_module(mod: str, q: torch.Tensor, zeros: torch.Tensor | None, scale: torch.Tensor,
                   g_idx: torch.Tensor | None, bits: int, shape: tuple[int, int]) -> dict[str, torch.Tensor]:
    """pack-quantized tensors from unsigned codes q [N, K], unsigned zeros [N, G] (None:
    symmetric), scale [N, G] and an optional g_idx [K]."""
    out = {f"{mod}.weight_packed": _pack(q, bits, dim=1), f"{mod}.weight_scale": scale.contiguous(),
           f"{mod}.weight_shape": torch.tensor(list(shape), dtype=torch.int64)}
    if zeros is not None:
        out[f"{mod}.weight_zero_point"] = _pack(zeros, bits, dim=0)
    if g_idx is not None:
        out[f"{mod}.weight_g_idx"] = g_idx.to(torch.int32).contiguous()
    return out


def _gptq(qw: QuantizedWeight, mod: str, scheme: CtScheme) -> dict[str, torch.Tensor]:
    spec, (n, k) = qw.spec, qw.shape
    q = unpack_int32(qw.tensors["qweight"], spec.bits, dim=0)[:k].t()  # [N, K]
    zeros = unpack_int32(qw.tensors["qzeros"], spec.bits, dim=1)[:, :n] + spec.zero_offset  # [G, N]
    symmetric = scheme.weights["symmetric"]
    _check_zeros(qw, zeros, symmetric)
    g_idx = g_idx_of(qw) if scheme.act_order else None
    return _packed_module(mod, q, None if symmetric else zeros.t(), qw.tensors["scales"].t(), g_idx,
                          spec.bits, (n, k))


def _awq(qw: QuantizedWeight, mod: str, scheme: CtScheme) -> dict[str, torch.Tensor]:
    n, k = qw.shape
    q = unpack_int32(qw.tensors["qweight"], 4, dim=1, order=AWQ_ORDER)[:, :n].t()  # [N, K]
    zeros = unpack_int32(qw.tensors["qzeros"], 4, dim=1, order=AWQ_ORDER)[:, :n]  # [G, N]
    symmetric = scheme.weights["symmetric"]
    _check_zeros(qw, zeros, symmetric)
    return _packed_module(mod, q, None if symmetric else zeros.t(), qw.tensors["scales"].t(), None, 4, (n, k))


def _ct_packed(qw: QuantizedWeight, mod: str, scheme: CtScheme) -> dict[str, torch.Tensor]:
    t = qw.tensors
    out = {f"{mod}.weight_packed": t["weight_packed"].contiguous(), f"{mod}.weight_scale": t["weight_scale"].contiguous(),
           f"{mod}.weight_shape": torch.tensor(list(qw.shape), dtype=torch.int64)}
    if not scheme.weights["symmetric"]:
        out[f"{mod}.weight_zero_point"] = t["weight_zero_point"].contiguous()
    if scheme.act_order:
        out[f"{mod}.weight_g_idx"] = t["weight_g_idx"].to(torch.int32).contiguous()
    return out


def _int8(qw: QuantizedWeight, mod: str, scheme: CtScheme) -> dict[str, torch.Tensor]:
    t, (n, k) = qw.tensors, qw.shape
    if scheme.format == "int-quantized":  # W8A8: stored as is
        return {f"{mod}.{role}": v.contiguous() for role, v in t.items()}
    # weight-only: signed int8 codes -> unsigned (+128), four to an int32 along K
    scale, zp = t["weight_scale"], t.get("weight_zero_point")
    if qw.spec.scale_layout == "tensor":  # one scale -> the same scale on every row
        scale = scale.reshape(1, 1).expand(n, 1)
        zp = None if zp is None else zp.reshape(1, 1).expand(n, 1)
    q = t["weight"].to(torch.int32) + 128
    zeros = None if zp is None else zp.to(torch.int32) + 128
    if zeros is not None and scheme.weights["symmetric"]:
        raise CheckpointError(f"{qw.name}: symmetric scheme but a weight_zero_point is stored")
    return _packed_module(mod, q, zeros, scale, None, 8, (n, k))


def _fp8(qw: QuantizedWeight, mod: str, scheme: CtScheme) -> dict[str, torch.Tensor]:
    t = qw.tensors
    out = {f"{mod}.weight": t["weight"].contiguous(), f"{mod}.weight_scale": t["weight_scale"].contiguous()}
    a = scheme.input_activations
    if a is not None and not a["dynamic"]:
        if "input_scale" not in t:
            raise CheckpointError(f"{qw.name}: static activation scheme but no input_scale is stored")
        out[f"{mod}.input_scale"] = t["input_scale"].contiguous()
    return out


_CONVERTERS = {"gptq": _gptq, "awq": _awq, "ct-packed": _ct_packed, "int8": _int8, "fp8": _fp8}


def to_compressed_tensors(qw: QuantizedWeight, scheme: CtScheme | None) -> dict[str, torch.Tensor]:
    """The compressed-tensors tensors of one weight (dense: the tensor itself)."""
    if qw.input_scale is not None:
        raise CheckpointError(f"{qw.name}: carries a smoothing input scale, which compressed-tensors cannot express")
    if scheme is None:
        if qw.spec.is_quantized:
            raise CheckpointError(f"{qw.name}: quantized ({qw.spec.describe()}) but given no scheme")
        return {qw.name: qw.tensors["weight"].contiguous()}
    if not qw.name.endswith(".weight"):
        raise CheckpointError(f"{qw.name}: a quantized tensor must be a module's '.weight'")
    convert = _CONVERTERS.get(qw.spec.layout)
    if convert is None:  # schemes.scheme_for refuses these first; this is the backstop
        raise CheckpointError(f"{qw.name}: no compressed-tensors converter for layout {qw.spec.layout!r}")
    return convert(qw, qw.name.removesuffix(".weight"), scheme)
