"""The fused MoE's GPU launch heuristics (rows per block, then each grouped GEMM's tile and
split-K), plain functions of the routing size and the SM count, checked against values
worked out by hand from their rules; then each tile they pick, forced through
`run_plan(..., override=)` at a tiny layer, against float64. Under the interpreter the
heuristic always answers one 64-wide unsplit tile, so without forcing, the GPU's 32- and
128-wide tiles and its split-K (fp32 atomics from several programs per output tile)
would never run on the CPU. The kernels have no GPU-only dequantization to force: int
weights are dequantized in fp32 on both paths, and the GPU only casts them to the
activation dtype before the dot."""

from __future__ import annotations

import pytest
import torch

from mixq.kernels import fused_moe as fm
from mixq.kernels import wna16
from mixq.layers.moe import route
from tests.kernels.moe_utils import make_moe, moe_float64

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
H100_SMS = 132
pytestmark = pytest.mark.skipif(wna16.triton is None, reason="triton not installed")


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    monkeypatch.setenv("MIXQ_TRITON_INTERPRET_METHODS", "1")
    monkeypatch.setattr(fm, "CONFIG_OVERRIDE", None)


@pytest.mark.parametrize("pairs,fids,bm", [
    (8, 128, 16),  # decode: 8 pairs over 8 of 128 experts, 1 each
    (4096, 128, 32),  # 512 tokens x top-8: 32 per expert
    (4100, 128, 64),  # just over 32 per expert
    (100, 2, 64),  # two experts held: 50 each
    (20, 1, 32),
])
def test_rows_per_block_follow_the_tokens_per_expert(pairs, fids, bm):
    """BM = 16, 32 or 64: the smallest that holds pairs / min(experts, pairs) rows."""
    assert fm.choose_bm(pairs, fids) == bm


def launch(kind, mode, n, k, experts, fmt="int4", sbk=0):
    """A Launch with only what the heuristic reads (shapes, format, expert count)."""
    if fmt.startswith("int"):
        op = fm.Operand(("int",), n, k, torch.empty(0), bits=int(fmt[3:]), group=128)
    else:
        op = fm.Operand(("float",), n, k, torch.empty(0), sbn=128 if sbk else 1, sbk=sbk or k)
    ops = (op, op) if mode == fm.PAIR else (op,)
    return fm.Launch(kind, mode, 0, experts, torch.empty(0, dtype=torch.int32), ops, experts)


# Worked by hand at 132 SMs (target: 264 programs). blocks = pairs * experts / fids when
# direct, else experts * (1 - (1 - 1/fids)**pairs) + pairs * experts / fids / BM (at least
# 1); "big" = more than 32 pairs per expert. BN: 64 when big; else the first of (128,) 64,
# 32 (128 only above 1024 pairs) with blocks * ceil(N / BN) >= 264, else 32. Split-K only
# for the atomic combine and not big: min(K tiles, 264 // (blocks * ceil(N / BN))). BK 128
# (int4 packs 8 values a word: at least 128; fp8 blocks cap it at the block). Stages 3 when
# big, else 4. A Qwen3-30B-A3B-shaped layer: 128 experts, hidden 2048, expert width 768.
HEURISTIC = [
    # decode, direct (8 pairs): blocks = 8 * 128 / 128 = 8; w13 N = 768: 8 * 12 = 96 and
    # 8 * 24 = 192 < 264 -> 32, PAIR mode: no split
    (("w13", fm.PAIR, 768, 2048, 128, "int4", 0), (8, 128, 16, True), (32, 128, 1, 4, 4)),
    # w2 N = 2048 (store combine): 8 * 32 = 256 < 264, 8 * 64 = 512 -> 32
    (("w2", fm.COMBINE_STORE, 2048, 768, 128, "int4", 0), (8, 128, 16, True), (32, 128, 1, 4, 4)),
    # 4 tokens x top-8, sorted, atomic: blocks = 128 * (1 - (127/128)**32) + 32 / 16 =
    # 28.41 + 2 = 30.41; 30.41 * 32 = 973 >= 264 -> 64; 264 // (30.41 * 32) = 0 -> no split
    (("w2", fm.COMBINE_ATOMIC, 2048, 768, 128, "int4", 0), (32, 128, 16, False), (64, 128, 1, 4, 4)),
    # the same step, a group of the 2 hot experts in block FP8: blocks = max(1, 0.444 +
    # 0.031) = 1; 1 * 32 and 1 * 64 < 264 -> 32; split min(6 K tiles, 264 // 64 = 4) = 4
    (("w2", fm.COMBINE_ATOMIC, 2048, 768, 2, "fp8", 128), (32, 128, 16, False), (32, 128, 4, 4, 4)),
    # ... and in int8 (4 values a word: BK at least 64; the rule's 128 all the same)
    (("w2", fm.COMBINE_ATOMIC, 2048, 768, 2, "int8", 0), (32, 128, 16, False), (32, 128, 4, 4, 4)),
    # 20 pairs, one expert of 128 in its own group with fp8 blocks of 64 along K: blocks =
    # max(1, 0.145 + 0.010) = 1; BN 32; BK 64, 12 K tiles, split min(12, 264 // 64 = 4)
    (("w2", fm.COMBINE_ATOMIC, 2048, 768, 1, "fp8", 64), (20, 128, 16, False), (32, 64, 4, 4, 4)),
    # 256 tokens x top-8 = 2048 pairs, 16 per expert (not big): blocks = ~128 + 128 = 256,
    # w13 N = 768: 256 * 6 >= 264 with BN 128 (offered above 1024 pairs)
    (("w13", fm.PAIR, 768, 2048, 128, "int4", 0), (2048, 128, 16, False), (128, 128, 1, 4, 4)),
    # prefill of 1024 tokens: 64 per expert, big -> 64 wide, 3 stages, unsplit
    (("w2", fm.COMBINE_STORE, 2048, 768, 128, "int4", 0), (8192, 128, 64, False), (64, 128, 1, 4, 3)),
]


@pytest.mark.parametrize("op,route_,want", HEURISTIC, ids=[f"{o[0]}-{o[5]}-{r[0]}pairs" for o, r, _ in HEURISTIC])
def test_gpu_tile_heuristic_picks_what_its_rules_give(op, route_, want):
    kind, mode, n, k, experts, fmt, sbk = op
    pairs, fids, bm, direct = route_
    cfg = fm.choose_config(launch(kind, mode, n, k, experts, fmt, sbk), pairs, fids, bm, torch.device("cpu"),
                           direct, sms=H100_SMS)
    assert cfg == fm.GemmConfig(*want)
    fm.check_config(launch(kind, mode, n, k, experts, fmt, sbk), cfg)  # and the kernel accepts it


# The tiles above, forced on a tiny layer, with each dispatch and combine the heuristic
# pairs them with: (bm, dispatch, combine, w13 tile, w2 tile). The expert width (w13's N,
# w2's K) is 160: ragged 32/64/128-wide column tiles, a full and a partial K tile; 640 for
# split-K: 5 K tiles over 4 splits (2 + 2 + 1 + an empty one).
FORCED = [
    (16, "direct", None, (32, 128, 1), (32, 128, 1)),
    (16, "sorted", "atomic", (64, 128, 1), (64, 128, 1)),
    (16, "sorted", "atomic", (32, 128, 1), (32, 128, 4)),  # split-K: 4 programs add into each output tile
    (32, "sorted", "store", (128, 128, 1), (128, 128, 1)),
    (64, "sorted", "store", (64, 128, 1), (64, 128, 1)),
]
H, E = 96, 4


@pytest.mark.parametrize("bm,dispatch,combine,w13,w2", FORCED, ids=[f"bm{f[0]}-{f[1]}-{f[2]}-w2split{f[4][2]}"
                                                                     for f in FORCED])
def test_each_heuristic_tile_runs_on_a_tiny_layer(bm, dispatch, combine, w13, w2):
    """Two int4 format groups (GPTQ symmetric, AWQ with zero points), bf16 activations,
    against the float64 layer on the dequantized weights: bf16 rounds x, the weights and
    the intermediate (2**-9 relative each, 2**-8 where the interpreter truncates) and the
    output: a few 1e-3 per row, 2.5e-2 allowed (a dropped or doubled split is ~25%)."""
    override = {"bm": bm, "dispatch": dispatch, "streams": False,
                "w13": dict(zip(("bn", "bk", "split_k"), w13)), "w2": dict(zip(("bn", "bk", "split_k"), w2))}
    if combine:
        override["combine"] = combine
    inter = 640 if w2[2] > 1 else 160
    moe, dense = make_moe(H, inter, E, 2, ["gptq4", "awq"], seed=bm, dtype=torch.bfloat16, device=DEV)
    g = torch.Generator().manual_seed(bm + len(dispatch))
    x = torch.randn(5 if dispatch == "direct" else 12, H, generator=g).bfloat16().to(DEV)
    r = route(moe.gate(x), 2, True)
    y = fm.run_plan(x, r.topk_ids, r.topk_weights, moe.fused_plan, override=override)
    ref = moe_float64(x, r.topk_ids, r.topk_weights, dense)
    assert y.dtype == torch.bfloat16 and not y.isnan().any()
    err = (y.double().cpu() - ref).norm(dim=1) / ref.norm(dim=1)
    assert float(err.max()) < 2.5e-2, float(err.max())
