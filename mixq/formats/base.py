"""What every format reader shares: catalogue entries, roles with their axis maps, shards.

A reader turns a checkpoint's stored tensors into *entries*: one per logical tensor (for
a quantized Linear, ``X.weight`` stands for ``X.qweight``, ``X.scales``, ...). Reading an
entry returns a `QuantizedWeight` holding the stored tensors unchanged. Each role knows
how the logical [N, K] dims map onto its physical dims, so one generic routine slices any
format for a tensor-parallel shard without touching the rest of the file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from mixq.errors import CheckpointError
from mixq.formats.checkpoint import Checkpoint
from mixq.formats.spec import QuantizedWeight, WeightSpec

# Units along an axis: logical elements per physical element. GROUP means the spec's
# group size; WHOLE means "never sliced" (e.g. act-order scales when K is sharded, since
# g_idx points at any group).
GROUP = -1
WHOLE = 0


@dataclass(frozen=True)
class Shard:
    """Take part `rank` of `world` equal parts of logical dim `dim` (0: N/out, 1: K/in)."""

    dim: int
    rank: int
    world: int

    def __post_init__(self):
        if self.dim not in (0, 1):
            raise ValueError(f"Shard.dim must be 0 (output) or 1 (input), got {self.dim}")
        if not 0 <= self.rank < self.world:
            raise ValueError(f"Shard.rank {self.rank} not in [0, {self.world})")


@dataclass(frozen=True)
class Role:
    """One stored tensor of an entry.

    axes maps a logical dim (0 = N, 1 = K) to (physical dim, unit), unit being how many
    logical elements one physical element covers along it (8 for int4 packed into int32),
    GROUP for the group size, or WHOLE for "keep whole when sharding".
    """

    tensor: str  # physical tensor name
    axes: tuple[tuple[int, int, int], ...] = ()  # (logical dim, physical dim, unit)
    held: bool = True  # False: read to be checked, then dropped (never counted as memory)


@dataclass(frozen=True)
class Entry:
    """A logical tensor of a checkpoint: its spec, logical shape and stored tensors.

    offset: (physical leading index, row offset) when the logical tensor is a slice of a
    fused stored tensor (e.g. expert e's gate_proj inside experts.gate_up_proj [E, 2I, H]).
    """

    name: str
    spec: WeightSpec
    shape: tuple[int, ...]
    roles: dict[str, Role]
    nbytes: int
    offset: tuple[int, int] | None = None
    meta: dict = field(default_factory=dict, compare=False)


def split_range(size: int, shard: Shard, unit: int, what: str) -> tuple[int, int]:
    """The [start, stop) of logical elements this shard owns; errors name the tensor."""
    if size % shard.world:
        raise CheckpointError(
            f"{what}: dim {shard.dim} of size {size} does not divide into {shard.world} shards"
        )
    part = size // shard.world
    if unit > 1 and part % unit:
        raise CheckpointError(
            f"{what}: shard of {part} along dim {shard.dim} is not a multiple of {unit} "
            "(the format's packing/group/block unit); use fewer shards"
        )
    return shard.rank * part, (shard.rank + 1) * part


class FormatReader:
    """Base class of the per-format readers. Subclasses define `layout`, `claim` (which
    stored tensors are theirs, as entries) and `dequantize` (reference, tests only)."""

    layout: str = ""

    def claim(self, ckpt: Checkpoint, unclaimed: set[str]) -> list[Entry]:
        """Build entries for the tensors of this format among `unclaimed`; remove them."""
        raise NotImplementedError

    def dequantize(self, qw: QuantizedWeight) -> torch.Tensor:
        """Dense [N, K] float32 from the stored tensors (reference only)."""
        raise NotImplementedError

    def check(self, qw: QuantizedWeight, ckpt: Checkpoint) -> None:
        """Cheap checks on read tensors (e.g. trivial g_idx); raise CheckpointError."""

    def read(self, ckpt: Checkpoint, entry: Entry, shard: Shard | None = None) -> QuantizedWeight:
        """Read an entry's stored tensors (only the shard's slices when given)."""
        shape, index = shard_slices(ckpt, entry, shard)
        tensors = {role: ckpt.read(entry.roles[role].tensor, idx) for role, idx in index.items()}
        qw = QuantizedWeight(entry.name, entry.spec, shape, tensors)
        self.check(qw, ckpt)
        return qw


def shard_unit(entry: Entry, dim: int) -> int:
    """The coarsest unit any role needs along a logical dim (shards must align to it):
    the packing factor, the group size or the scale block, whichever is coarsest."""
    unit = 1
    for r in entry.roles.values():
        for ldim, _, u in r.axes:
            if ldim != dim or u == WHOLE:
                continue
            u = entry.spec.group_size if u == GROUP else u
            # Blocks/groups may be partial at the tensor's end; shards still align to them.
            unit = math.lcm(unit, u)
    return unit


def check_shard(entry: Entry, shard: Shard) -> tuple[int, int]:
    """The logical [start, stop) a shard owns along its dim; CheckpointError naming the
    tensor when the dim does not split evenly or a part breaks a packing unit/group/block."""
    if shard.dim >= len(entry.shape):
        raise CheckpointError(f"{entry.name}: cannot shard a {len(entry.shape)}-d tensor on dim {shard.dim}")
    return split_range(entry.shape[shard.dim], shard, shard_unit(entry, shard.dim), entry.name)


def shard_slices(ckpt: Checkpoint, entry: Entry, shard: Shard | None) -> tuple[tuple[int, ...], dict]:
    """(logical shape of the shard, {role: index into its stored tensor, None = whole}).

    One routine for reading and for predicting bytes, so the two cannot disagree."""
    shape = list(entry.shape)
    bounds: dict[int, tuple[int, int]] = {}
    if shard is not None:
        bounds[shard.dim] = check_shard(entry, shard)
        shape[shard.dim] = bounds[shard.dim][1] - bounds[shard.dim][0]
    out = {}
    for role, r in entry.roles.items():
        info = ckpt.info(r.tensor)
        index: list = [slice(None)] * len(info.shape)
        for ldim, pdim, unit in r.axes:
            if ldim not in bounds or unit == WHOLE:
                continue
            u = entry.spec.group_size if unit == GROUP else unit
            start, stop = bounds[ldim]
            index[pdim] = slice(start // u, math.ceil(stop / u))
        if entry.offset is not None:
            # a slice of a fused [E, rows, cols] tensor: pick the expert, offset the rows
            lead, row0 = entry.offset
            rows = index[1]
            r0 = row0 + (rows.start or 0)
            r1 = row0 + (rows.stop if rows.stop is not None else entry.shape[0])
            index[0], index[1] = lead, slice(r0, r1)
        full = all(isinstance(s, slice) and s == slice(None) for s in index)
        out[role] = None if full else tuple(index)
    return tuple(shape), out


def shard_nbytes(ckpt: Checkpoint, entry: Entry, shard: Shard | None) -> int:
    """Bytes a shard's read would return, from headers only (no tensor data)."""
    _, index = shard_slices(ckpt, entry, shard)
    total = 0
    for role, idx in index.items():
        if not entry.roles[role].held:
            continue
        info = ckpt.info(entry.roles[role].tensor)
        n = info.dtype.itemsize
        for d, size in enumerate(info.shape):
            if idx is None:
                n *= size
            elif isinstance(idx[d], int):
                continue  # an indexed (dropped) leading dim
            else:
                n *= len(range(*idx[d].indices(size)))
        total += n
    return total


def module_of(name: str, suffix: str) -> str | None:
    """'a.b.qweight', '.qweight' -> 'a.b'; None when name does not end with suffix."""
    return name[: -len(suffix)] if name.endswith(suffix) else None


def stored_bytes(ckpt: Checkpoint, roles: dict[str, Role]) -> int:
    """Bytes of the roles that stay in memory once read."""
    return sum(ckpt.info(r.tensor).nbytes for r in roles.values() if r.held)


def expand_groups(scale_cols: int, k: int, group_size: int | None, g_idx: torch.Tensor | None) -> torch.Tensor:
    """Group index of every input column k: g_idx when stored, else k // group_size."""
    if g_idx is not None:
        return g_idx.long()
    if group_size is None:
        return torch.zeros(k, dtype=torch.long)
    return torch.arange(k) // group_size
