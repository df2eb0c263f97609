"""Fused MoE (one sort + one grouped launch per format group) against the per-expert
reference loop and a float64 dense computation, for layers whose experts come in 1, 2 and 3
formats (and gate/up in different formats). Interpreter on CPU, real kernels on CUDA."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from mixq.formats.spec import QuantizedWeight, WeightSpec
from mixq.kernels import fused_moe as fm
from mixq.kernels import moe_pack, w8_methods, wna16
from mixq.layers.moe import Routing, SparseMoE, compute_experts, dispatch, route
from tests.kernels.moe_utils import FORMATS, make_moe, make_weight, moe_float64

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
MS = (1, 2, 3, 7, 16, 33, 100, 257) if CUDA else (1, 2, 3, 7, 16, 33)
H, INTER, E = 64, 32, 8  # K of w2 = 32: one int4 group of 32, not a multiple of the 128 K tile
pytestmark = pytest.mark.skipif(wna16.triton is None, reason="triton not installed")


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    monkeypatch.setenv("MIXQ_TRITON_INTERPRET_METHODS", "1")
    monkeypatch.setattr(fm, "CONFIG_OVERRIDE", None)


def tol(dtype):
    # fp32: exact dequantization, fp32 accumulation over K <= 64: ~1e-7 relative. bf16: x,
    # the dequantized weight (per-expert path) and the intermediate are rounded to 2**-9,
    # the output once more: a few 1e-3 relative per row
    return 1e-5 if dtype == torch.float32 else 2.5e-2


def check(y, ref, dtype, what):
    assert y.dtype == dtype and not y.isnan().any(), what
    err = (y.double().cpu() - ref).norm(dim=1) / ref.norm(dim=1).clamp(min=1e-12)
    assert float(err.max()) < tol(dtype), (what, float(err.max()))


def run_layer(formats, ms, top_ks, dtype, override=None, monkeypatch=None):
    if monkeypatch is not None:
        # the fused kernel computes 8-bit experts weight-only (bf16 activations); so must the
        # per-expert loop it is compared with, whose FP8/INT8 methods otherwise quantize the
        # activations above 64 rows (a few % per row, a different function)
        monkeypatch.setattr(w8_methods._W8Method, "weight_only_max_m", 1 << 30)
    fused, dense = make_moe(H, INTER, E, max(top_ks), formats, dtype=dtype, device=DEV)
    ref_layer, _ = make_moe(H, INTER, E, max(top_ks), formats, dtype=dtype, device=DEV, fused=False,
                            weight_only=True)
    assert fused.fused_plan is not None and ref_layer.fused_plan is None
    if override:
        monkeypatch.setattr(fm, "CONFIG_OVERRIDE", override)
    g = torch.Generator().manual_seed(len(formats))
    for i, m in enumerate(ms):
        k = top_ks[i % len(top_ks)]
        x = torch.randn(m, H, generator=g).to(dtype).to(DEV)
        r = route(fused.gate(x), k, True)
        y = fused.compute(fused.experts, x, r, dispatch(r, E))
        check(y, moe_float64(x, r.topk_ids, r.topk_weights, dense), dtype, (formats, m, k, "float64"))
        y_ref = compute_experts(ref_layer.experts, x, r, dispatch(r, E))
        check(y, y_ref.double().cpu(), dtype, (formats, m, k, "reference loop"))


# On CUDA one pinned tile per launch kind for the per-format tests: the heuristic's tiles
# vary with M and every variant is a Triton compile (the three-format, model and benchmark
# runs cover the heuristic)
PINNED = {"w13": {"bn": 32, "stages": 3}, "w2": {"bn": 64, "stages": 3, "split_k": 1}} if CUDA else None


@pytest.mark.parametrize("fmt", FORMATS)
def test_one_format(fmt, monkeypatch):
    run_layer([fmt], MS if CUDA else (1, 7), (2, 8), torch.float32 if not CUDA else torch.bfloat16, PINNED,
              monkeypatch)


@pytest.mark.parametrize("formats", [["bf16", "gptq4"], ["fp8-block", "awq"], ["int8", "fp8-channel"],
                                     ["gptq4-act", "ct4-asym"]])
def test_two_formats(formats, monkeypatch):
    run_layer(formats, MS if CUDA else (3, 16), (1, 2, 8), torch.bfloat16 if CUDA else torch.float32, PINNED,
              monkeypatch)


@pytest.mark.parametrize("mode", [{"combine": "atomic"}, {"combine": "store"}, {"dispatch": "direct"}])
def test_three_formats_every_m_and_top_k(mode, monkeypatch):
    formats = ["bf16", "fp8-channel", "gptq4", "gptq4-act", "fp8-block", "int8", "awq", "gptq4-asym"]
    ms = MS if CUDA or "dispatch" not in mode else (1, 2, 3, 7)  # direct: one program per pair
    run_layer(formats, ms, (1, 2, 8), torch.bfloat16 if CUDA else torch.float32, mode, monkeypatch)


def test_bf16_activations_and_gate_up_in_different_formats():
    # gate/up of one expert in different formats: gate stored, silu-and-mul in up's launch
    formats = [("gptq4", "fp8-channel", "awq"), "bf16", ("fp8-block", "gptq4-asym", "int8"),
               ("gptq4", "fp8-channel", "gptq4")]
    run_layer(formats, (1, 7, 33), (2, 8), torch.bfloat16)


def test_zero_token_experts_and_all_tokens_to_one_expert():
    moe, dense = make_moe(H, INTER, E, 2, ["gptq4", "fp8-channel", "bf16"], device=DEV)
    g = torch.Generator().manual_seed(3)
    for m, ids in ((33, [[3]]), (33, [[3, 5]]), (5, [[7, 0]]), (1, [[2, 6]])):
        ids = torch.tensor(ids).expand(m, -1).contiguous().to(DEV)
        w = torch.rand(ids.shape, generator=g).to(DEV)
        x = torch.randn(m, H, generator=g).to(DEV)
        y = moe.compute(moe.experts, x, Routing(ids, w), dispatch(Routing(ids, w), E))
        check(y, moe_float64(x, ids, w, dense), torch.float32, ids[0].tolist())


@pytest.mark.parametrize("mode", [{"combine": "atomic"}, {"combine": "store"}, {"dispatch": "direct"}])
def test_subset_of_experts_as_under_expert_parallel(mode, monkeypatch):
    """Experts 1 and 4 are not held here: their pairs add nothing; the rest is exact."""
    monkeypatch.setattr(fm, "CONFIG_OVERRIDE", mode)
    moe, dense = make_moe(H, INTER, E, 4, ["awq", "fp8-block"], device=DEV, skip={1, 4})
    assert moe.fused_plan.partial and moe.fused_plan.fids == E - 2
    g = torch.Generator().manual_seed(4)
    x = torch.randn(9, H, generator=g).to(DEV)
    r = route(moe.gate(x), 4, True)
    assert bool(((r.topk_ids == 1) | (r.topk_ids == 4)).any())
    y = moe.compute(moe.experts, x, r, dispatch(r, E))
    check(y, moe_float64(x, r.topk_ids, r.topk_weights, dense, skip={1, 4}), torch.float32, "subset")


@pytest.mark.parametrize("mode", [{"combine": "atomic"}, {"combine": "store"}, {"dispatch": "direct"}])
def test_expert_parallel_local_numbering_skips_other_ranks_pairs(mode, monkeypatch):
    """An EP rank holding experts 2..5, routed as mixq.distributed does: local ids 0..3 and
    -1 for other ranks' experts (weight 0). Only the held experts contribute, exactly."""
    from mixq.distributed.moe import localize

    monkeypatch.setattr(fm, "CONFIG_OVERRIDE", mode)
    local = range(2, 6)
    moe, dense = make_moe(H, INTER, E, 4, ["gptq4", "fp8-channel", "bf16"], device=DEV, local=local)
    assert moe.fused_plan.partial and moe.fused_plan.fids == len(local)
    g = torch.Generator().manual_seed(6)
    for m in (2, 9, 40):
        x = torch.randn(m, H, generator=g).to(DEV)
        r = route(moe.gate(x), 4, True)
        lr, d = localize(r, local.start, len(local))
        assert bool((lr.topk_ids < 0).any()) and bool((lr.topk_ids >= 0).any())
        y = moe.compute(moe.local_experts, x, lr, d)
        ref = moe_float64(x, r.topk_ids, r.topk_weights, dense, skip=set(range(E)) - set(local))
        check(y, ref, torch.float32, ("ep", m))
    with pytest.raises(ValueError, match="numbers another expert list"):
        moe.compute(moe.experts, x, lr, d)


@pytest.mark.parametrize("formats,w13,w2", [
    (["gptq4"], 1, 1),
    (["bf16", "fp8-channel", "gptq4"], 3, 3),
    ([("gptq4", "fp8-channel", "awq")], 2, 1),  # gate and up in different formats
    ([("gptq4", "gptq4", "fp8-channel"), "gptq4"], 1, 2),  # same w13 format, two w2 formats
    (["gptq4", "ct4", "gptq4-asym"], 2, 2),  # gptq (fp16 scales) and compressed-tensors int4 g32 sym share one
])
@pytest.mark.parametrize("tokens", [16, 2])  # 32 pairs: sorted (one align launch); 4 pairs: direct (none)
def test_launch_count_is_per_format_group_not_per_expert(formats, w13, w2, tokens, monkeypatch):
    moe, _ = make_moe(H, INTER, E, 2, formats, device=DEV)
    calls = {"align": 0, "w13": 0, "w2": 0}
    align, gemm = fm.moe_align, fm.launch_gemm

    def count_align(*a, **kw):
        calls["align"] += 1
        return align(*a, **kw)

    def count_gemm(launch, *a, **kw):
        calls[launch.kind] += 1
        return gemm(launch, *a, **kw)

    monkeypatch.setattr(fm, "moe_align", count_align)
    monkeypatch.setattr(fm, "launch_gemm", count_gemm)
    x = torch.randn(tokens, H, generator=torch.Generator().manual_seed(5)).to(DEV)
    r = route(moe.gate(x), 2, True)
    moe.compute(moe.experts, x, r, dispatch(r, E))
    assert calls == {"align": int(tokens * 2 > fm.DIRECT_MAX_PAIRS), "w13": w13, "w2": w2}


def test_stacked_weights_are_held_once():
    """After stacking, each expert linear holds views of the stacks: the loaded tensors are
    freed and the bytes held equal the stacks' bytes (about the loaded bytes)."""
    torch.manual_seed(0)
    formats = ["bf16", "fp8-channel", "gptq4", "awq", "int8", "gptq4-act"]
    moe = SparseMoE(H, INTER, E, 2, renormalize=True).to(DEV)
    loaded, alive = 0, []
    for e in range(E):
        for proj, (o, i) in zip(("gate_proj", "up_proj", "down_proj"), ((INTER, H), (INTER, H), (H, INTER))):
            qw = make_weight(formats[e % len(formats)], f"experts.{e}.{proj}.weight", torch.randn(o, i)).to(DEV)
            loaded += qw.nbytes
            alive += [weakref.ref(t) for t in qw.tensors.values()]
            getattr(moe.experts[e], proj).load(qw, torch.bfloat16)
    del qw
    moe.process_weights_after_loading()
    gc.collect()
    assert not [r for r in alive if r() is not None], "a loaded tensor outlived the stacking"
    stacks = {}
    for launch in moe.fused_plan.w13 + moe.fused_plan.w2:
        for op in launch.ops:
            for t in (op.w, op.scales, op.zeros, op.perm, op.iscale):
                if t is not None:
                    stacks[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    held = {}
    for ex in moe.experts:
        for n in ex.names:
            for t in getattr(ex, n).weight.tensors.values():
                held[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    assert set(held) <= set(stacks)  # every expert tensor is a view of a stack
    total = sum(stacks.values())
    # the int layout keeps a uint8 zero per group where GPTQ/AWQ pack int4 zeros, and
    # act-order adds an int32 permutation: a few percent over the loaded bytes, never 2x
    assert total <= 1.15 * loaded, (total, loaded)
    assert sum(getattr(ex, n).weight.nbytes for ex in moe.experts for n in ex.names) == total


def test_align_groups_every_pair_with_its_expert():
    g = torch.Generator().manual_seed(6)
    for pairs, top_k, bm, held in ((1, 1, 16, 8), (24, 8, 16, 8), (66, 2, 32, 5), (257 * 8, 8, 64, 128)):
        ids = torch.randint(0, 128 if held == 128 else 8, (pairs // top_k, top_k), generator=g)
        fid_map = torch.full((128 if held == 128 else 8,), -1, dtype=torch.int32)
        perm = torch.randperm(fid_map.numel(), generator=g)[:held]
        fid_map[perm] = torch.arange(held, dtype=torch.int32)
        al = fm.moe_align(ids.to(DEV), fid_map.to(DEV), held, bm)
        sid, bfid, bstart = (t.cpu().long() for t in (al.sorted_ids, al.block_fid, al.block_start))
        fid = fid_map[ids.flatten()].long()
        counts = torch.bincount(fid[fid >= 0], minlength=held)
        assert torch.equal(bstart, torch.cat([torch.zeros(1, dtype=torch.long), (-(-counts // bm)).cumsum(0)]))
        for f in range(held):
            rows = sid[bstart[f] * bm: bstart[f + 1] * bm]
            assert sorted(rows[rows >= 0].tolist()) == torch.nonzero(fid == f).flatten().tolist()
            assert bool((bfid[bstart[f]: bstart[f + 1]] == f).all())
        assert bool((sid[bstart[-1] * bm:] == -1).all())  # nothing past the last block


def test_refusals_name_the_tensor_and_the_reason(monkeypatch):
    bad = [(WeightSpec("gptq", 3, torch.int32, "group", group_size=32), "3-bit"),
           (WeightSpec("fp8", 8, torch.float8_e4m3fn, "none"), "fp8 scale layout 'none'"),
           (WeightSpec("gptq", 4, torch.int32, "group", group_size=48), "K=64, group 48")]
    for spec, why in bad:
        qw = QuantizedWeight("experts.5.up_proj.weight", spec, (INTER, H), {"qweight": torch.zeros(1, device=DEV)})
        with pytest.raises(ValueError, match=rf"experts\.5\.up_proj\.weight.*{why}"):
            moe_pack.kernel_key(qw, torch.float32)
    moe = SparseMoE(H, INTER, 2, 1, renormalize=True).to(DEV)
    for e in range(2):
        for proj, (o, i) in zip(("gate_proj", "up_proj", "down_proj"), ((INTER, H), (INTER, H), (H, INTER))):
            getattr(moe.experts[e], proj).load(make_weight("gptq4", f"experts.{e}.{proj}.weight",
                                                           torch.randn(o, i)).to(DEV), torch.float32)
    moe.experts[1].down_proj.weight.spec = bad[0][0]
    with pytest.raises(ValueError, match=r"experts\.1\.down_proj\.weight: the fused MoE kernel cannot"):
        moe.process_weights_after_loading()
    if not CUDA:
        monkeypatch.delenv("MIXQ_TRITON_INTERPRET_METHODS")
        ok, why = moe_pack.can_implement(WeightSpec("fp8", 8, torch.float8_e4m3fn, "channel"), torch.device("cpu"))
        assert not ok and "needs a CUDA device" in why


class _HostReads:
    """Records what reads tensor data back to the host (a sync on CUDA): .item(), .tolist(),
    bool/int/float/index of a tensor, .nonzero(). The CPU stand-in for
    torch.cuda.set_sync_debug_mode (patched methods see calls inside custom ops too, where
    a dispatch mode would not)."""

    METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero")

    def __init__(self, monkeypatch):
        self.seen = []
        for name in self.METHODS:
            real = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name,
                                lambda t, *a, _n=name, _r=real, **k: self.seen.append(_n) or _r(t, *a, **k))


def test_fused_forward_has_no_host_sync(monkeypatch):
    """Routing, the align launch and the grouped GEMMs never read device data on the host
    (else a decode step would stall on each MoE layer and could not be captured): on CUDA
    the sync debug mode raises; on the CPU the host-read methods of torch.Tensor are
    watched (the probe is first checked on each kind of read)."""
    moe, _ = make_moe(H, INTER, E, 2, ["gptq4", "fp8-channel", "bf16"], dtype=torch.bfloat16, device=DEV)
    g = torch.Generator().manual_seed(8)
    for m in (1, 33):  # direct and sorted dispatch
        x = torch.randn(m, H, generator=g).to(torch.bfloat16).to(DEV)
        moe(x)  # compile outside the checks
        if CUDA:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                moe(x)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        else:
            for read in (lambda t: t.sum().tolist(), lambda t: int(t.argmax()), lambda t: bool(t.sum() > 0)):
                with monkeypatch.context() as mp:
                    probe = _HostReads(mp)
                    read(x)
                assert probe.seen, "the probe must see each kind of host read"
            with monkeypatch.context() as mp:
                probe = _HostReads(mp)
                moe(x)
            assert probe.seen == [], probe.seen


@pytest.mark.skipif(not CUDA, reason="CUDA graphs exist on CUDA only (the CPU runs the no-host-sync half above)")
def test_fused_forward_replays_in_a_cuda_graph():
    moe, dense = make_moe(H, INTER, E, 2, ["gptq4", "fp8-channel", "bf16"], dtype=torch.bfloat16, device=DEV)
    g = torch.Generator().manual_seed(8)
    for m in (1, 33):  # direct and sorted dispatch
        x = torch.randn(m, H, generator=g).to(torch.bfloat16).to(DEV)
        moe(x)  # compile outside the capture
        torch.cuda.synchronize()
        static = x.clone()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = moe(static)
        x2 = torch.randn(m, H, generator=g).to(torch.bfloat16).to(DEV)
        static.copy_(x2)
        graph.replay()
        r = route(moe.gate(x2), 2, True)
        check(out, moe_float64(x2, r.topk_ids, r.topk_weights, dense), torch.bfloat16, ("graph", m))
