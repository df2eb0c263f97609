"""Group a MoE layer's experts by format and stack each group into the fused kernel's layout.

Runs once after loading. Each expert projection gets a *kernel key* from its spec (format,
bits, group size, zero points, act-order, scale dtype / scale blocks): projections with
equal keys share one stacked tensor [E_g, ...] and one kernel launch. w13 groups are keyed
by the pair (key(gate), key(up)), w2 groups by key(down); experts are renumbered (fused
ids) so that every w13 group is a contiguous range (w2 groups follow where they can).

The caller replaces each expert's own tensors with views of the stacks (`views`), so the
bytes are held once. Refusals (`can_implement`) name the tensor and the reason.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from mixq.formats.spec import QuantizedWeight, WeightSpec, dense_spec
from mixq.kernels import fused_moe as fm
from mixq.kernels import wna16
from mixq.kernels.methods import canonical_int

INT_LAYOUTS = ("gptq", "awq", "ct-packed", "int8")


def can_implement(spec: WeightSpec, device: torch.device) -> tuple[bool, str]:
    """Whether the fused MoE kernel computes an expert weight of `spec` on `device`."""
    if wna16.triton is None:
        return False, "triton is not installed"
    if device.type != "cuda" and os.environ.get("MIXQ_TRITON_INTERPRET_METHODS") != "1":
        return False, f"needs a CUDA device (got {device.type})"
    if spec.layout == "dense":
        return True, ""
    if spec.layout == "fp8":
        if spec.scale_layout not in ("tensor", "channel", "group", "block"):
            return False, f"fp8 scale layout {spec.scale_layout!r} is not supported"
        return True, ""
    if spec.layout in INT_LAYOUTS:
        if spec.bits not in (4, 8):
            return False, f"{spec.bits}-bit integer weights are not supported (4, 8)"
        if spec.layout == "int8" and spec.scale_layout not in ("tensor", "channel", "group"):
            return False, f"int8 scale layout {spec.scale_layout!r} is not supported"
        return True, ""
    return False, f"layout {spec.layout!r} has no fused MoE kernel"


def _scale_tensor(qw: QuantizedWeight) -> torch.Tensor:
    t = qw.tensors
    return t["weight_scale"] if qw.spec.layout in ("ct-packed", "int8", "fp8") else t["scales"]


def kernel_key(qw: QuantizedWeight, dtype: torch.dtype) -> tuple:
    """Format key of one expert projection (equal keys stack together). Refuses what the
    kernel cannot do, naming the tensor."""
    ok, why = can_implement(qw.spec, next(iter(qw.tensors.values())).device)
    if not ok:
        raise ValueError(f"{qw.name}: the fused MoE kernel cannot compute {qw.spec.describe()}: {why}")
    spec, (n, k) = qw.spec, qw.shape
    if spec.layout == "dense":
        return ("dense", dtype)
    if spec.layout == "fp8":
        if spec.scale_layout == "block":
            sbn, sbk = spec.block_size
        else:
            sbn = n if spec.scale_layout == "tensor" else 1
            sbk = spec.group_size if spec.scale_layout == "group" else k
        if sbk < k and (sbk % 16 or sbk & (sbk - 1)):
            raise ValueError(f"{qw.name}: fp8 scale block of {sbk} columns: the kernel needs a power of two >= 16")
        return ("fp8", sbn, sbk)
    group = spec.group_size or k
    per = 32 // spec.bits
    if k % group or group % per or k % per:
        raise ValueError(f"{qw.name}: K={k}, group {group}: the kernel needs K % group == 0 and groups of whole "
                         f"{per}-value words")
    zeros = not spec.symmetric if spec.layout != "int8" else "weight_zero_point" in qw.tensors
    # the scale dtype is not part of the key: a group whose members differ stacks them in
    # fp32 (lossless for fp16/bf16), so GPTQ (fp16) and compressed-tensors (bf16) share a launch
    return ("int", spec.bits, group, zeros, spec.act_order)


def _int_parts(qw: QuantizedWeight, key: tuple) -> dict[str, torch.Tensor]:
    """One int expert in the wna16 layout: qweight [K/P, N], scales [G, N], zeros, perm."""
    _, bits, group, has_zeros, has_perm = key
    n, k = qw.shape
    if qw.spec.layout == "int8":
        t = qw.tensors
        q = t["weight"].to(torch.int32) + 128  # signed -> unsigned, zero point 128
        cols = k // group

        def per_group(v: torch.Tensor) -> torch.Tensor:  # [1] | [N, 1] | [N, G] -> [N, G]
            return v.reshape(-1, 1).expand(n, 1) if cols == 1 else v.reshape(n, cols)

        s = per_group(t["weight_scale"])
        zp = t.get("weight_zero_point")
        z = None if zp is None else per_group(zp.to(torch.int32)) + 128
        g_idx = None
    else:
        q, s, z, g_idx = canonical_int(qw)
    half = 1 << (bits - 1)
    if z is None and has_zeros:
        z = torch.full(s.shape, half, dtype=torch.int32, device=s.device)
    elif z is not None and not has_zeros:
        raise ValueError(f"{qw.name}: spec says symmetric but the stored zero points are not {half}")
    perm = None
    if g_idx is not None:
        perm = torch.argsort(g_idx.long(), stable=True)
        if not torch.equal(g_idx.long()[perm], torch.arange(k, device=perm.device) // group):
            raise ValueError(f"{qw.name}: g_idx does not assign exactly {group} columns per group")
        if bool((perm == torch.arange(k, device=perm.device)).all()):
            perm = None  # trivial g_idx (GPTQ without act-order stores one)
        else:
            q = q[:, perm]
    if perm is None and has_perm:
        perm = torch.arange(k, device=q.device)
    elif perm is not None and not has_perm:
        raise ValueError(f"{qw.name}: g_idx reorders columns but the spec has no act-order")
    p = wna16.pack_wna16(q.to(torch.uint8), s, z, bits, group, perm)
    return {"qweight": p.qweight, "scales": p.scales, "zeros": p.zeros, "perm": p.perm}


def _parts(qw: QuantizedWeight, key: tuple, dtype: torch.dtype) -> dict[str, torch.Tensor | None]:
    if key[0] == "dense":
        return {"weight": qw.tensors["weight"].to(dtype)}
    if key[0] == "fp8":
        n, k = qw.shape
        _, sbn, sbk = key
        s = qw.tensors["weight_scale"].float().reshape(-(-n // sbn), -(-k // sbk))
        return {"weight": qw.tensors["weight"], "weight_scale": s}
    return _int_parts(qw, key)


@dataclass
class Stacked:
    operand: fm.Operand
    views: list[QuantizedWeight]  # member i's weight as views of the stack (same bytes)


def stack_group(qws: list[QuantizedWeight], iscales: list[torch.Tensor | None], key: tuple,
                dtype: torch.dtype) -> Stacked:
    """Stack the experts of one format group into one Operand; each member is converted and
    copied into a preallocated stack, so the transient memory is one expert."""
    n, k = qws[0].shape
    stacks: dict[str, torch.Tensor | None] = {}
    scale_dtypes = {_scale_tensor(qw).dtype for qw in qws} if key[0] == "int" else set()
    for i, qw in enumerate(qws):
        if tuple(qw.shape) != (n, k):
            raise ValueError(f"{qw.name}: shape {list(qw.shape)} differs from {qws[0].name} {[n, k]} in one group")
        parts = _parts(qw, key, dtype)
        if i == 0:
            stacks = {r: None if t is None else t.new_empty((len(qws), *t.shape)) for r, t in parts.items()}
            if len(scale_dtypes) > 1:
                stacks["scales"] = stacks["scales"].float()
        for r, t in parts.items():
            if t is not None:
                stacks[r][i].copy_(t)
    iscale = None
    if any(s is not None for s in iscales):
        iscale = torch.ones(len(qws), k, dtype=dtype, device=stacks[next(iter(stacks))].device)
        for i, s in enumerate(iscales):
            if s is not None:
                iscale[i].copy_(s.reshape(k))
    if key[0] == "int":
        op = fm.Operand(key, n, k, stacks["qweight"], stacks["scales"], stacks["zeros"], stacks["perm"], iscale,
                        bits=key[1], group=key[2])
    elif key[0] == "fp8":
        op = fm.Operand(key, n, k, stacks["weight"], stacks["weight_scale"], iscale=iscale, sbn=key[1], sbk=key[2])
    else:
        op = fm.Operand(key, n, k, stacks["weight"], iscale=iscale)
    views = []
    for i, qw in enumerate(qws):
        spec = dense_spec(dtype) if key[0] == "dense" else qw.spec
        tensors = {r: t[i] for r, t in stacks.items() if t is not None}
        views.append(QuantizedWeight(qw.name, spec, qw.shape, tensors, iscales[i]))
    return Stacked(op, views)


@dataclass
class ExpertWeights:
    """One expert's loaded projections (as read, any layouts) and their smoothing scales."""

    gate: QuantizedWeight
    up: QuantizedWeight
    down: QuantizedWeight
    iscales: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None] = (None, None, None)


def build_moe_plan(experts: dict[int, ExpertWeights], num_experts: int, hidden: int, inter: int,
                   dtype: torch.dtype, foreign_ids: bool = False
                   ) -> tuple[fm.MoEPlan, dict[int, tuple[QuantizedWeight, ...]]]:
    """Group, renumber and stack a layer's experts (keys: expert ids, a subset of
    range(num_experts) under expert parallelism; foreign_ids: routing may also carry id -1
    for another rank's experts). Returns the plan and, per expert, its
    (gate, up, down) as views of the stacks. The caller drops every other reference to the
    loaded tensors so that they are freed."""
    if not experts:
        raise ValueError("fused MoE: the layer holds no experts")
    keys = {e: (kernel_key(w.gate, dtype), kernel_key(w.up, dtype), kernel_key(w.down, dtype))
            for e, w in experts.items()}
    k13 = list(dict.fromkeys((g, u) for g, u, _ in keys.values()))
    k2 = list(dict.fromkeys(d for _, _, d in keys.values()))
    order = sorted(experts, key=lambda e: (k13.index(keys[e][:2]), k2.index(keys[e][2]), e))
    fid = {e: i for i, e in enumerate(order)}
    device = experts[order[0]].gate.tensors[next(iter(experts[order[0]].gate.tensors))].device
    fids = len(order)
    fid_map = torch.full((num_experts,), -1, dtype=torch.int32)
    for e, f in fid.items():
        fid_map[e] = f
    views: dict[int, list] = {e: [None, None, None] for e in experts}

    def slots(members: list[int]) -> torch.Tensor:
        s = torch.full((fids + 1,), -1, dtype=torch.int32)
        for i, e in enumerate(members):
            s[fid[e]] = i
        return s.to(device)

    def stack(members: list[int], proj: int, key: tuple) -> fm.Operand:
        ws = [experts[e] for e in members]
        st = stack_group([(w.gate, w.up, w.down)[proj] for w in ws], [w.iscales[proj] for w in ws], key, dtype)
        for e, v in zip(members, st.views):
            views[e][proj] = v
        return st.operand

    w13, w2 = [], []
    for kg, ku in k13:
        members = [e for e in order if keys[e][:2] == (kg, ku)]
        f0, f1, s = fid[members[0]], fid[members[-1]] + 1, slots(members)
        gate, up = stack(members, 0, kg), stack(members, 1, ku)
        if kg == ku:
            w13.append(fm.Launch("w13", fm.PAIR, f0, f1, s, (gate, up), len(members)))
        else:  # gate and up in different formats: gate stored, then silu-and-mul in up's epilogue
            w13.append(fm.Launch("w13", fm.STORE, f0, f1, s, (gate,), len(members)))
            w13.append(fm.Launch("w13", fm.SILU_MUL_INTO, f0, f1, s, (up,), len(members)))
    for kd in k2:
        members = [e for e in order if keys[e][2] == kd]
        f0, f1 = fid[members[0]], fid[members[-1]] + 1  # a span: other groups' experts have slot -1
        w2.append(fm.Launch("w2", fm.COMBINE_ATOMIC, f0, f1, slots(members), (stack(members, 2, kd),), len(members)))
    plan = fm.MoEPlan(fid_map.to(device), fids, hidden, inter, w13, w2, foreign_ids)
    return plan, {e: tuple(v) for e, v in views.items()}


def fused_available(device: torch.device) -> bool:
    """Whether the fused MoE kernels run on `device` (CUDA; the CPU only under the Triton
    interpreter with MIXQ_TRITON_INTERPRET_METHODS=1, for tests)."""
    return can_implement(dense_spec(torch.bfloat16), device)[0]
