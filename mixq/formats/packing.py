"""Bit packing of sub-byte integers into int32 words, as the checkpoint formats store them.

All formats here pack 32/bits values per int32 word, value j of a word at bits
[j*bits, (j+1)*bits). They differ in the axis packed along and, for AWQ, in which
column each slot holds. These functions are used at load/repack time and by the
reference dequantizers; never in a forward pass.
"""

from __future__ import annotations

import torch

# AutoAWQ GEMM: slot j of a word holds column 8*c + AWQ_ORDER[j] of its 8-column chunk.
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def unpack_int32(packed: torch.Tensor, bits: int, dim: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """Unpack int32 words along `dim` into unsigned values (int32 tensor).

    The output is 32/bits times longer along `dim`. With `order`, slot j of each word
    lands at position order[j] of its chunk (AWQ); otherwise slot j at position j.
    """
    if packed.dtype != torch.int32:
        raise ValueError(f"unpack_int32: expected int32, got {packed.dtype}")
    if bits not in (2, 4, 8):
        raise ValueError(f"unpack_int32: bits must be 2, 4 or 8, got {bits}")
    per = 32 // bits
    dim = dim % packed.dim()
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
    x = packed.unsqueeze(dim + 1)
    view = [1] * x.dim()
    view[dim + 1] = per
    vals = (x >> shifts.view(view)) & ((1 << bits) - 1)  # [..., words, per, ...]
    if order is not None:
        inv = [0] * per
        for slot, pos in enumerate(order):
            inv[pos] = slot
        vals = vals.index_select(dim + 1, torch.tensor(inv, device=packed.device))
    shape = list(packed.shape)
    shape[dim] *= per
    return vals.reshape(shape)


def pack_int32(values: torch.Tensor, bits: int, dim: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """Inverse of unpack_int32: unsigned values (< 2**bits) packed along `dim`."""
    if bits not in (2, 4, 8):
        raise ValueError(f"pack_int32: bits must be 2, 4 or 8, got {bits}")
    per = 32 // bits
    dim = dim % values.dim()
    if values.shape[dim] % per:
        raise ValueError(f"pack_int32: dim {dim} of size {values.shape[dim]} is not a multiple of {per}")
    if values.min() < 0 or values.max() >= (1 << bits):
        raise ValueError(f"pack_int32: values out of range for {bits} bits")
    shape = list(values.shape)
    shape[dim : dim + 1] = [shape[dim] // per, per]
    v = values.to(torch.int64).reshape(shape)
    if order is not None:
        v = v.index_select(dim + 1, torch.tensor(order, device=values.device))
    shifts = torch.arange(0, 32, bits, dtype=torch.int64, device=values.device)
    view = [1] * v.dim()
    view[dim + 1] = per
    words = (v << shifts.view(view)).sum(dim + 1)
    # Reinterpret the low 32 bits as a signed int32 (the top slot may set the sign bit).
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)
