"""Merged projections: q/k/v (or gate/up) as one GEMM when their formats agree.

Each projection still loads itself (its own checkpoint, format and method); after loading,
`merge_linears` concatenates the prepared tensors of projections that share a method, a
spec and (for tensors the kernel reads whole, such as an act-order permutation) equal
values, along the output dimension of the method's layout. Each projection's weight then
becomes views into the merged tensors: the memory is held once, and per-tensor memory
accounting (`held_weights`) still sees each projection with its own bytes. Projections
whose formats differ (a mix: q in FP8, k/v in BF16) stay separate GEMMs.
"""

from __future__ import annotations

import torch
from torch import nn

from mixq.formats.spec import QuantizedWeight
from mixq.kernels.cpu_methods import INT4_PACK_BLOCK_N
from mixq.layers.linear import MixedPrecisionLinear, takes_fp8_act

# method -> {tensor role: the dim that is N in the prepared layout, or None: must be equal
# in every part, held once}. A role not listed (or a method not listed) blocks the merge.
MERGE_DIMS: dict[str, dict[str, int | None]] = {
    "dense": {"weight": 0},
    "cuda-w4a16": {"qw": 1, "scales": 1, "zeros": 1, "perm": None},
    "triton-wna16": {"qweight": 1, "scales": 1, "zeros": 1, "offsets": 1, "perm": None},
    "triton-ggml": {"ql": 1, "qh": 1, "d": 1, "m": 1, "sc": 1, "mn": 1},
    "triton-fp8": {"weight": 0, "weight_scale": 0, "input_scale": None},
    "triton-int8": {"weight": 0, "weight_scale": 0, "weight_zero_point": 0, "input_scale": None},
    # CPU methods (mixq.kernels.cpu_methods): int4 rows are packed in blocks of 64 (merge_problem checks)
    "cpu-int4pack": {"packed": 0, "scale_zero": 1, "src": None},
    "cpu-int8pack": {"weight": 0, "scale": 0, "zero_scale": 0, "input_scale": None},
    "cpu-fp8": {"weight": 0, "weight_scale": 0, "input_scale": None},
    "cpu-q8_0": {"blocks": 0},
}


def merge_problem(parts: list[MixedPrecisionLinear]) -> str | None:
    """Why `parts` cannot run as one GEMM, or None."""
    first = parts[0]
    if any(p.weight is None for p in parts):
        return "not loaded"
    rules = MERGE_DIMS.get(first.method.name)
    if rules is None:
        return f"method {first.method.name} has no merge rule"
    for p in parts[1:]:
        if p.method.name != first.method.name or p.weight.spec != first.weight.spec:
            return f"{p.weight.name}: {p.weight.spec.describe()} ({p.method.name}) differs from {first.weight.spec.describe()}"
        if p.in_features != first.in_features or (p.bias is None) != (first.bias is None):
            return f"{p.weight.name}: input size or bias differs"
        if set(p.weight.tensors) != set(first.weight.tensors):
            return f"{p.weight.name}: tensors {sorted(p.weight.tensors)} differ from {sorted(first.weight.tensors)}"
        if (p.input_scale is None) != (first.input_scale is None) or (
                p.input_scale is not None and not torch.equal(p.input_scale, first.input_scale)):
            return f"{p.weight.name}: smoothing input scales differ"
    for role, t in first.weight.tensors.items():
        if role not in rules:
            return f"tensor {role} of {first.method.name} has no merge rule"
        if rules[role] is None and not all(torch.equal(p.weight.tensors[role], t) for p in parts[1:]):
            return f"{role} differs between the parts"
    spec = first.weight.spec
    if first.method.name == "cpu-int4pack" and any(p.out_features % INT4_PACK_BLOCK_N for p in parts[:-1]):
        return f"an output size is not a multiple of {INT4_PACK_BLOCK_N} (the CPU int4 packing's row block)"
    if first.method.name in ("triton-fp8", "cpu-fp8") and spec.scale_layout == "block":
        bn = spec.block_size[0]
        if any(p.out_features % bn for p in parts[:-1]):
            return f"output sizes are not multiples of the {bn}-row scale block"
    return None


class MergedLinear(nn.Module):
    """The merged GEMM of several projections; `forward` returns one output per part (views
    of one [.., sum N] tensor). Not a MixedPrecisionLinear: memory is accounted on the parts."""

    def __init__(self, parts: list[MixedPrecisionLinear], name: str):
        super().__init__()
        first = parts[0]
        rules = MERGE_DIMS[first.method.name]
        self.method = first.method
        self.splits = [p.out_features for p in parts]
        self.input_scale = first.input_scale
        n = sum(self.splits)
        tensors, sizes = {}, {}
        for role, t in first.weight.tensors.items():
            dim = rules[role]
            if dim is None:
                tensors[role] = t
                continue
            chunks = [p.weight.tensors[role] for p in parts]
            tensors[role] = torch.cat(chunks, dim=dim)
            sizes[role] = [c.shape[dim] for c in chunks]
        self.weight = QuantizedWeight(name, first.weight.spec, (n, first.in_features), tensors)
        self.bias_t = None if first.bias is None else torch.cat([p.bias.data for p in parts])
        # the parts keep their own QuantizedWeight, now views into the merged tensors
        offs = dict.fromkeys(sizes, 0)
        for i, p in enumerate(parts):
            views = {}
            for role, t in tensors.items():
                if rules[role] is None:
                    views[role] = t
                else:
                    views[role] = t.narrow(rules[role], offs[role], sizes[role][i])
                    offs[role] += sizes[role][i]
            p.weight = QuantizedWeight(p.weight.name, p.weight.spec, p.weight.shape, views)
            p.merged_into = name  # its views are not a kernel layout of their own any more
            if p.bias is not None:
                lo = sum(self.splits[:i])
                p.bias.data = self.bias_t[lo:lo + self.splits[i]]

    def takes_fp8_act(self, m: int, dtype: torch.dtype) -> bool:
        return takes_fp8_act(self.method, self.weight, self.input_scale, m, dtype)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.input_scale is not None:
            x = x * self.input_scale
        return self.method.apply(self.weight, x, self.bias_t).split(self.splits, dim=-1)


def merge_linears(parts: list[MixedPrecisionLinear], name: str) -> MergedLinear | None:
    """A MergedLinear of `parts`, or None when they cannot share a GEMM (merge_problem)."""
    if merge_problem(parts) is not None:
        return None
    return MergedLinear(parts, name)
