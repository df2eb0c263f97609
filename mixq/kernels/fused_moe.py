"""Fused mixture-of-experts in Triton: experts of one layer in several weight formats.

One forward of a layer is
  1. `moe_align`: ONE launch sorts the T*k token-expert pairs by *fused expert id* (fid:
     the layer's loaded experts renumbered so that each format group is a contiguous fid
     range) and pads every expert's list to the block size BM. Block b of the padded list
     belongs to expert block_fid[b]; expert f owns blocks [block_start[f], block_start[f+1]).
     No host sync: every grid below is a static bound, programs past the real end exit.
  2. per w13 group: ONE grouped GEMM over the group's blocks computing gate and up of the
     block's expert and writing silu(gate) * up into the intermediate [rows, I] (rows in the
     padded order). A group whose gate and up formats differ runs gate then up (the second
     launch applies silu-and-mul in its epilogue): 2 launches.
  3. per w2 group: ONE grouped GEMM from the intermediate rows, scaled by the routing weight
     and combined per token: fp32 atomic add into [T, hidden] at small T (no extra buffer,
     split-K possible), or a store into [T*k, hidden] then a sum over k at large T
     (deterministic, no atomic contention when thousands of pairs hit one output row).
A layer whose experts come in three formats therefore costs 1 + 3 + 3 (+1 cast or sum)
launches, never E.

Operand (stacked weight of one format group, made once by mixq.kernels.moe_pack):
  int   qweight int32 [E_g, K/P, N] (the wna16 layout per expert), scales [E_g, G, N],
        zeros uint8 [E_g, G, N] | None, perm int32 [E_g, K] | None (act-order: kernel column
        j reads activation column perm[j])
  float weight [E_g, N, K] bf16/fp16/fp32 or fp8 e4m3 with scales fp32 [E_g, ceil(N/SBN),
        ceil(K/SBK)] (tensor: SBN=N, SBK=K; channel: SBN=1, SBK=K; block: the block)
  every operand may carry iscale [E_g, K] (AWQ smoothing compensation, x *= iscale).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch

from mixq.kernels.fused_moe_kernels import _align_kernel, _moe_gemm_kernel
from mixq.kernels.wna16 import interpreting, triton

# modes of the grouped GEMM epilogue
PAIR, STORE, SILU_MUL_INTO, COMBINE_ATOMIC, COMBINE_STORE = range(5)


@dataclass
class Operand:
    """One format group's stacked weight (see module docstring); `key` names the format."""

    key: tuple
    n: int
    k: int
    w: torch.Tensor
    scales: torch.Tensor | None = None
    zeros: torch.Tensor | None = None
    perm: torch.Tensor | None = None
    iscale: torch.Tensor | None = None
    bits: int = 0  # int only
    group: int = 0  # int only
    sbn: int = 0  # float scaled only
    sbk: int = 0

    @property
    def is_int(self) -> bool:
        return self.key[0] == "int"

    @property
    def nbytes(self) -> int:
        ts = (self.w, self.scales, self.zeros, self.perm, self.iscale)
        return sum(t.numel() * t.element_size() for t in ts if t is not None)


@dataclass
class Launch:
    """One grouped GEMM of a layer: experts with fid in [f0, f1) whose slot >= 0 in `slots`
    (int32 [F + 1], index into the operand stacks; -1 = not this launch's expert)."""

    kind: str  # "w13" or "w2"
    mode: int
    f0: int
    f1: int
    slots: torch.Tensor
    ops: tuple[Operand, ...]  # PAIR: (gate, up); otherwise one operand
    experts: int  # experts in this launch (for the config heuristic)


# ------------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class GemmConfig:
    """Tile of one grouped GEMM launch (BM is per layer call: the align step pads to it)."""

    bn: int
    bk: int
    split_k: int = 1
    warps: int = 4
    stages: int = 3


# bench/moe.py --sweep sets this to time candidate configs. None = the heuristic. Keys (all
# optional): "bm": int, "combine": "atomic" | "store", and per launch "w13" / "w2" /
# "w13_int" / "w13_float" / "w2_int" / "w2_float": dict of GemmConfig fields.
CONFIG_OVERRIDE: dict | None = None
# "dispatch": "direct" | "sorted", "streams": bool.
# pairs (T * top_k) up to which programs take one pair each, unsorted (no align launch);
# beyond, experts hit by several pairs would stream their weights several times
DIRECT_MAX_PAIRS = 16
# pairs up to which (sorted) w2 combines with fp32 atomics rather than store + sum
ATOMIC_MAX_PAIRS = 512


def _sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def min_bk(op: Operand) -> int:
    """Smallest K tile the operand allows: the per-slot dots of an int tile need K >= 16."""
    return 16 * (32 // op.bits) if op.is_int else 16


def choose_bm(pairs: int, fids: int) -> int:
    """Rows per block: about the tokens an active expert gets (pairs spread over experts)."""
    per_expert = pairs / max(1, min(fids, pairs))
    return 16 if per_expert <= 16 else 32 if per_expert <= 32 else 64


def choose_config(launch: Launch, pairs: int, fids: int, bm: int, device: torch.device,
                  direct: bool = False, sms: int | None = None) -> GemmConfig:
    """Heuristic tile for one launch: memory-bound at small M, so enough programs must
    stream the weights (~2 per SM, counting the blocks the routing is expected to fill).
    `sms` (tests): the GPU's multiprocessor count, instead of the device's (and of the
    interpreter's one config)."""
    op = launch.ops[0]
    bk = max(min_bk(op), 128 if op.is_int or op.sbk == 0 else min(128, op.sbk))
    if sms is None and interpreting():
        return GemmConfig(64, bk, 1, 4, 1)
    if direct:  # one block per pair of this group's experts
        blocks = max(1.0, pairs * launch.experts / max(fids, 1))
    else:
        hit = launch.experts * (1 - (1 - 1 / max(fids, 1)) ** pairs)  # expected experts with tokens
        blocks = max(1.0, hit + pairs * launch.experts / max(fids, 1) / bm)
    target = 2 * (sms or _sms(device))
    big = pairs / max(1, min(fids, pairs)) > 32
    # H100 (bench/RESULTS.md): 16-wide tiles lost every case; 128 wins only with many pairs
    bn = 64 if big else 32
    for cand in (128, 64, 32) if pairs > 1024 else (64, 32):
        if not big and blocks * math.ceil(op.n / cand) >= target:
            bn = cand
            break
    split = 1
    if launch.mode == COMBINE_ATOMIC and not big:
        k_tiles = math.ceil(op.k / bk)
        split = max(1, min(k_tiles, int(target // (blocks * math.ceil(op.n / bn)))))
    return GemmConfig(bn, bk, split, 4, 3 if big else 4)


def _override(launch: Launch, o: dict) -> dict:
    fmt = "int" if launch.ops[0].is_int else "float"
    return {**o.get(launch.kind, {}), **o.get(f"{launch.kind}_{fmt}", {})}


def check_config(launch: Launch, cfg: GemmConfig) -> None:
    """Refuse tiles the kernel cannot run (wrong results or a compile error otherwise)."""
    op = launch.ops[0]
    if cfg.bk % min_bk(op) or cfg.bk & (cfg.bk - 1):
        raise ValueError(f"fused MoE {launch.kind}: BK={cfg.bk} must be a power of two multiple of {min_bk(op)}")
    if op.is_int and op.group % (32 // op.bits):
        raise ValueError(f"fused MoE {launch.kind}: group {op.group} is not whole packed words")
    if not op.is_int and op.sbk and op.sbk < op.k and op.sbk % cfg.bk:
        raise ValueError(f"fused MoE {launch.kind}: BK={cfg.bk} must divide the scale block {op.sbk}")
    if cfg.split_k > 1 and launch.mode != COMBINE_ATOMIC:
        raise ValueError(f"fused MoE {launch.kind}: split-K needs the atomic combine (mode {launch.mode})")
    if cfg.bn < 16 or cfg.bn & (cfg.bn - 1):
        raise ValueError(f"fused MoE {launch.kind}: BN={cfg.bn} must be a power of two >= 16")


# ------------------------------------------------------------------------------- launches


@dataclass
class Aligned:
    """How programs find their rows: the output of moe_align (BM rows per block, see the
    module docstring), or `direct` (no sort: program i takes pair i; ids/fid_map give its
    expert), which costs no launch and wins when there are only a few pairs."""

    sorted_ids: torch.Tensor | None  # int32 [blocks * BM]: pair index t*k + j, or -1 (padding)
    block_fid: torch.Tensor | None  # int32 [blocks]
    block_start: torch.Tensor | None  # int32 [F + 1]
    bm: int
    pairs: int
    ids: torch.Tensor  # [T*k] expert ids
    fid_map: torch.Tensor
    direct: bool = False

    @property
    def rows(self) -> int:
        """Rows of the intermediate: one per pair (direct) or per padded slot."""
        return self.pairs if self.direct else self.sorted_ids.numel()


def max_blocks(pairs: int, experts: int, bm: int) -> int:
    """Bound on the padded blocks of `experts` experts sharing `pairs` pairs:
    sum ceil(c_e / BM) <= pairs / BM + (experts with tokens)."""
    return -(-pairs // bm) + min(experts, pairs)


def moe_align(topk_ids: torch.Tensor, fid_map: torch.Tensor, fids: int, bm: int,
              zero: torch.Tensor | None = None) -> Aligned:
    """Sort pairs by fused expert id in one launch. topk_ids [T, k] int; fid_map int32 [E]
    (expert id -> fid, -1 = expert not held here: its pairs are dropped); `zero`, if given,
    is zero-filled by extra programs of the same launch (the combine buffer)."""
    pairs = topk_ids.numel()
    nblk = max_blocks(pairs, fids, bm)
    dev = topk_ids.device
    sorted_ids = torch.empty(nblk * bm, dtype=torch.int32, device=dev)
    block_fid = torch.empty(nblk, dtype=torch.int32, device=dev)
    block_start = torch.empty(fids + 1, dtype=torch.int32, device=dev)
    fb = triton.next_power_of_2(fids + 1)
    scratch = torch.empty(fb + pairs, dtype=torch.int32, device=dev)
    zn, zch = (0, 1024) if zero is None else (zero.numel(), 4096 if zero.numel() > 2**16 else 1024)
    grid = (1 + triton.cdiv(zn, zch),)
    _align_kernel[grid](topk_ids.reshape(-1), fid_map, scratch, scratch[fb:], sorted_ids, block_fid, block_start,
                        zero if zero is not None else scratch, pairs, fids, nblk * bm, nblk, zn, BM=bm, FB=fb,
                        CH=256 if pairs > 128 else 128, ZCH=zch, num_warps=4)
    return Aligned(sorted_ids, block_fid, block_start, bm, pairs, topk_ids.reshape(-1), fid_map)


def launch_gemm(launch: Launch, a: torch.Tensor, al: Aligned, topk_weights: torch.Tensor, out: torch.Tensor,
                top_k: int, cfg: GemmConfig) -> None:
    """One grouped GEMM launch (`a`: x [T, K] for w13, the intermediate for w2)."""
    op0 = launch.ops[0]
    op1 = launch.ops[1] if launch.mode == PAIR else op0
    dummy = launch.slots
    w, s = op0.w, op0.scales if op0.scales is not None else dummy
    scale_last = (not op0.is_int) and op0.scales is not None and op0.sbk >= op0.k
    blocks = al.pairs if al.direct else max_blocks(al.pairs, launch.f1 - launch.f0, al.bm)
    grid = (blocks, triton.cdiv(op0.n, cfg.bn), cfg.split_k)

    def t(x):
        return x if x is not None else dummy

    _moe_gemm_kernel[grid](
        a, t(al.sorted_ids), t(al.block_fid), t(al.block_start), launch.slots, topk_weights, out, al.ids, al.fid_map,
        w, s, t(op0.zeros), t(op0.perm), t(op0.iscale),
        op1.w, t(op1.scales), t(op1.zeros), t(op1.perm), t(op1.iscale),
        op0.n, op0.k, launch.f0, launch.f1, a.stride(0), out.stride(0), w.stride(0), w.stride(1),
        s.stride(0) if op0.scales is not None else 0, s.stride(1) if op0.scales is not None else 0,
        op0.perm.stride(0) if op0.perm is not None else 0, op0.iscale.stride(0) if op0.iscale is not None else 0,
        TOPK=top_k, A_BY_TOKEN=launch.kind == "w13", MODE=launch.mode, INT=op0.is_int, BITS=op0.bits or 8,
        GROUP=op0.group or 1, HAS_ZP=op0.zeros is not None, HAS_PERM=op0.perm is not None,
        HAS_IS=op0.iscale is not None, SCALE_TILE=(not op0.is_int) and op0.scales is not None and not scale_last,
        SCALE_LAST=scale_last, SBN=op0.sbn or 1, SBK=op0.sbk or 1, BM=al.bm, BN=cfg.bn, BK=cfg.bk,
        SPLIT_K=cfg.split_k, UPCAST=interpreting() or a.dtype == torch.float32, DIRECT=al.direct,
        num_warps=cfg.warps, num_stages=cfg.stages,
    )


@dataclass
class MoEPlan:
    """A layer's fused compute: fid_map int32 [E] (expert id -> fid or -1), the w13 launches
    then the w2 launches. Built once after loading by mixq.kernels.moe_pack."""

    fid_map: torch.Tensor
    fids: int
    hidden: int
    inter: int
    w13: list[Launch]
    w2: list[Launch]
    foreign_ids: bool = False  # routed ids may be < 0 (another expert-parallel rank's experts)

    @cached_property
    def flat(self) -> tuple[list[torch.Tensor | None], list[int]]:
        return flatten_plan(self)

    @property
    def partial(self) -> bool:
        """Some routed experts are not held here (expert parallel): their pairs add nothing,
        so their rows of the combine buffer are never written and it is zero-filled."""
        return self.foreign_ids or self.fids < self.fid_map.numel()


def fused_moe(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, plan: MoEPlan) -> torch.Tensor:
    """sum_j w[t, j] * down_e(silu(gate_e(x_t)) * up_e(x_t)) over the top-k experts e = ids[t, j].

    x [T, hidden] bf16/fp16 (fp32 under the interpreter or for fp32 models);
    topk_ids [T, k] int (expert ids, indexing plan.fid_map); topk_weights [T, k] float32.
    Returns [T, hidden] in x's dtype. No host sync: graph-capturable for a fixed T. Runs as
    the custom op mixq::fused_moe (the plan travels as a flat tensor list + ints)."""
    if x.dim() != 2 or x.shape[1] != plan.hidden:
        raise ValueError(f"fused_moe: x must be [T, {plan.hidden}], got {list(x.shape)}")
    if topk_ids.shape != topk_weights.shape or topk_ids.shape[0] != x.shape[0]:
        raise ValueError(f"fused_moe: topk_ids {list(topk_ids.shape)} / topk_weights "
                         f"{list(topk_weights.shape)} do not match x {list(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"fused_moe: x dtype {x.dtype} not supported")
    tensors, meta = plan.flat
    return torch.ops.mixq.fused_moe(x.contiguous(), topk_ids, topk_weights.contiguous(), plan.fid_map, tensors, meta)


def run_plan(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, plan: MoEPlan,
             override: dict | None = None) -> torch.Tensor:
    """The launches of fused_moe: [align], the w13 groups, the w2 groups, a cast or a sum.
    Format groups are independent: on CUDA each group's launches go to its own stream
    (fork/join, graph-capturable), so small groups overlap instead of queueing.
    `override` (tests): replaces CONFIG_OVERRIDE (same keys) for this call."""
    tokens, top_k = topk_ids.shape
    pairs = tokens * top_k
    if pairs == 0:
        return torch.zeros_like(x)
    o = override if override is not None else CONFIG_OVERRIDE or {}
    dev = x.device
    direct = o.get("dispatch", "direct" if pairs <= DIRECT_MAX_PAIRS else "sorted") == "direct"
    atomic = not direct and o.get("combine", "atomic" if pairs <= ATOMIC_MAX_PAIRS else "store") == "atomic"
    if atomic:  # zero-filled by the align launch
        out = torch.empty(tokens, plan.hidden, dtype=torch.float32, device=dev)
    else:  # every pair row is written once, unless its expert is not held here
        out = (torch.zeros if direct and plan.partial else torch.empty)(pairs, plan.hidden, dtype=x.dtype, device=dev)
    if direct:
        bm = 16  # the smallest dot; one valid row per program
        al = Aligned(None, None, None, bm, pairs, topk_ids.reshape(-1), plan.fid_map, direct=True)
    else:
        bm = o.get("bm") or choose_bm(pairs, plan.fids)
        al = moe_align(topk_ids, plan.fid_map, plan.fids, bm, zero=out if atomic or plan.partial else None)
    inter = torch.empty(al.rows, plan.inter, dtype=x.dtype, device=dev)
    parallel = o.get("streams", True) and dev.type == "cuda"

    def run13(launch: Launch) -> None:
        cfg = GemmConfig(**{**choose_config(launch, pairs, plan.fids, bm, dev, direct).__dict__, **_override(launch, o)})
        check_config(launch, cfg)
        launch_gemm(launch, x, al, topk_weights, inter, top_k, cfg)

    def run2(launch: Launch) -> None:
        launch = Launch(launch.kind, COMBINE_ATOMIC if atomic else COMBINE_STORE, launch.f0, launch.f1,
                        launch.slots, launch.ops, launch.experts)
        cfg = GemmConfig(**{**choose_config(launch, pairs, plan.fids, bm, dev, direct).__dict__, **_override(launch, o)})
        check_config(launch, cfg)
        launch_gemm(launch, inter, al, topk_weights, out, top_k, cfg)

    _run_groups(plan.w13, run13, parallel)
    _run_groups(plan.w2, run2, parallel)
    if atomic:
        return out.to(x.dtype)
    return out.view(tokens, top_k, plan.hidden).sum(1)


_STREAMS: dict[torch.device, list] = {}


def _run_groups(launches: list[Launch], run, parallel: bool) -> None:
    """Run launches; those of one format group (same fid range) in order. With `parallel`,
    groups after the first run on side streams forked from and joined to the current one."""
    chains: list[list[Launch]] = []
    for launch in launches:
        if chains and (chains[-1][-1].f0, chains[-1][-1].f1) == (launch.f0, launch.f1):
            chains[-1].append(launch)
        else:
            chains.append([launch])
    if not parallel or len(chains) == 1:
        for launch in launches:
            run(launch)
        return
    dev = launches[0].slots.device
    pool = _STREAMS.setdefault(dev, [])
    while len(pool) < len(chains) - 1:
        pool.append(torch.cuda.Stream(dev))
    main = torch.cuda.current_stream(dev)
    for chain, side in zip(chains[1:], pool):
        side.wait_stream(main)
        with torch.cuda.stream(side):
            for launch in chain:
                run(launch)
    for launch in chains[0]:
        run(launch)
    for side in pool[: len(chains) - 1]:
        main.wait_stream(side)


_ROLES = ("w", "scales", "zeros", "perm", "iscale")


def flatten_plan(plan: MoEPlan) -> tuple[list[torch.Tensor | None], list[int]]:
    """MoEPlan -> (tensors, ints) for the custom op's schema; unflatten_plan inverts it."""
    tensors: list[torch.Tensor | None] = []
    meta = [plan.fids, plan.hidden, plan.inter, len(plan.w13), len(plan.w2), plan.foreign_ids]
    for launch in plan.w13 + plan.w2:
        meta += [launch.kind == "w2", launch.mode, launch.f0, launch.f1, launch.experts, len(launch.ops)]
        tensors.append(launch.slots)
        for op in launch.ops:
            meta += [op.is_int, op.n, op.k, op.bits, op.group, op.sbn, op.sbk]
            tensors += [getattr(op, r) for r in _ROLES]
    return tensors, meta


def unflatten_plan(fid_map: torch.Tensor, tensors: list[torch.Tensor | None], meta: list[int]) -> MoEPlan:
    fids, hidden, inter, n13, n2, foreign = meta[:6]
    i, j, launches = 6, 0, []
    for _ in range(n13 + n2):
        kind, mode, f0, f1, experts, nops = meta[i:i + 6]
        slots, i, j = tensors[j], i + 6, j + 1
        ops = []
        for _ in range(nops):
            is_int, n, k, bits, group, sbn, sbk = meta[i:i + 7]
            ops.append(Operand(("int",) if is_int else ("float",), n, k, *tensors[j:j + 5], bits=bits, group=group,
                               sbn=sbn, sbk=sbk))
            i, j = i + 7, j + 5
        launches.append(Launch("w2" if kind else "w13", mode, f0, f1, slots, tuple(ops), experts))
    return MoEPlan(fid_map, fids, hidden, inter, launches[:n13], launches[n13:], bool(foreign))


if triton is not None:

    @torch.library.custom_op("mixq::fused_moe", mutates_args=())
    def _fused_moe_op(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, fid_map: torch.Tensor,
                      tensors: list[torch.Tensor | None], meta: list[int]) -> torch.Tensor:
        return run_plan(x, topk_ids, topk_weights, unflatten_plan(fid_map, tensors, meta))

    @_fused_moe_op.register_fake
    def _(x, topk_ids, topk_weights, fid_map, tensors, meta):
        return torch.empty_like(x)
