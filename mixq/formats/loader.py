"""Stream the tensors a plan picks, each in its stored format.

Only the picked tensors are read, through safetensors' memory-mapped slices: never a whole
file, never a dense copy of a quantized weight. `select` lets an expert-parallel rank read
only its experts, `shard_for` lets a tensor-parallel rank read only its slice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from mixq.formats.base import Shard
from mixq.formats.plan import LoadPlan
from mixq.formats.spec import QuantizedWeight

ShardFn = Callable[[str], Shard | None]


def iter_weights(
    plan: LoadPlan,
    select: Callable[[str], bool] | None = None,
    shard_for: ShardFn | None = None,
    device: torch.device | str | None = None,
) -> Iterator[QuantizedWeight]:
    """Yield every selected tensor of the plan as a QuantizedWeight, in plan order."""
    for name, t in plan.tensors.items():
        if select is not None and not select(name):
            continue
        shard = shard_for(name) if shard_for is not None else None
        qw = plan.catalog(t).read(name, shard)
        scale = plan.input_scales.get(name)
        if scale is not None:
            if shard is not None and shard.dim == 1:
                part = scale.shape[0] // shard.world
                scale = scale[shard.rank * part : (shard.rank + 1) * part]
            qw.input_scale = scale
        yield qw if device is None else qw.to(device)


def load_weights(
    plan: LoadPlan,
    select: Callable[[str], bool] | None = None,
    shard_for: ShardFn | None = None,
    device: torch.device | str | None = None,
) -> dict[str, QuantizedWeight]:
    """All selected tensors of the plan, by name (see iter_weights)."""
    return {qw.name: qw for qw in iter_weights(plan, select, shard_for, device)}
