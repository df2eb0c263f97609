"""INT4 experts on the compiled W4A16 GEMV (mixq/kernels/moe_w4a16.py): the stacked layout
and the split rule on the CPU (bit-exact, independent of the kernel), the grouped GEMV and
the layer against float64 on CUDA."""

from __future__ import annotations

import pytest
import torch

from mixq.kernels import moe_w4a16, tiles, w4a16_mma
from mixq.kernels.moe_w4a16 import (
    ExpertStack,
    grouped_gemv,
    moe_layer,
    moe_reference,
    moe_split,
    pack_experts,
)
from mixq.kernels.w4a16_mma import pack_w4a16, unpack_w4a16

CUDA = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)
cuda_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU of compute capability 8.0+")


def experts(e, n, k, group, zeros, gen):
    q = torch.randint(0, 16, (e, n, k), generator=gen)
    s = torch.rand(e, n, k // group, generator=gen) * 0.02 + 0.005
    z = torch.randint(0, 16, (e, n, k // group), generator=gen) if zeros else None
    return q, s, z


@pytest.mark.parametrize("zeros", [False, True])
def test_stack_is_each_expert_packed_alone(zeros):
    gen = torch.Generator().manual_seed(3 + zeros)
    q, s, z = experts(3, 128, 256, 64, zeros, gen)
    st = pack_experts(q, s, z, 64, torch.bfloat16)
    assert st.qw.shape == (3, 256 // 16, 2 * 128) and st.experts == 3 and (st.n, st.k) == (128, 256)
    for e in range(3):
        alone = pack_w4a16(q[e], s[e], None if z is None else z[e], 64, torch.bfloat16)
        assert torch.equal(st.qw[e], alone.qw) and torch.equal(st.scales[e], alone.scales)
        assert (st.zeros is None) == (z is None) and (z is None or torch.equal(st.zeros[e], alone.zeros))
        q2, s2, z2 = unpack_w4a16(st.expert(e))  # the views read back the canonical weight
        assert torch.equal(q2, q[e].int()) and torch.equal(s2, s[e].bfloat16())
        assert z is None or torch.equal(z2, z[e].int())
    assert st.nbytes == sum(t.numel() * t.element_size() for t in (st.qw, st.scales, st.zeros) if t is not None)
    with pytest.raises(ValueError, match=r"\[E, N, K\]"):
        pack_experts(q[0], s[0], None, 64, torch.bfloat16)


@pytest.mark.parametrize("n,k,active", [(1536, 2048, 8), (2048, 768, 8), (1536, 2048, 128), (64, 64, 1)])
def test_split_rule(n, k, active):
    """Equal CTA ranges of whole warp runs, 16 activation rows within the shared-memory
    budget, and the CTA count over the active blocks nearest 4 per SM among the splits."""
    kcs, spc = moe_split(n, k, 132, active, 4)
    assert kcs * spc == k // 16 and spc % 4 == 0
    assert 16 * spc * 32 <= w4a16_mma.GEMV_X_BYTES
    ctas = n // 64 * active * kcs
    for c in range(1, k // 16 + 1):
        if w4a16_mma.gemv_split(16, n, k, 132, 4, kcs=c) is not None:
            assert abs(ctas - 528) <= abs(n // 64 * active * c - 528)


def test_bad_operands_are_refused_before_any_launch():
    gen = torch.Generator().manual_seed(1)
    st = pack_experts(*experts(2, 64, 64, 64, False, gen), 64, torch.bfloat16)
    ids, fid = torch.zeros(16, dtype=torch.int32), torch.zeros(1, dtype=torch.int32)
    with pytest.raises(ValueError, match="one CUDA device"):
        grouped_gemv(torch.zeros(1, 64, dtype=torch.bfloat16), st, ids, fid, fid, 1, 1, 1, 1)
    with pytest.raises(ValueError, match="prepared dtype"):
        grouped_gemv(torch.zeros(1, 64, dtype=torch.float16), st, ids, fid, fid, 1, 1, 1, 1)
    with pytest.raises(ValueError, match=r"\[rows, 64\]"):
        grouped_gemv(torch.zeros(1, 32, dtype=torch.bfloat16), st, ids, fid, fid, 1, 1, 1, 1)


def _route(t, e, top_k, gen, skew=False):
    if skew:  # a few hot experts: several rows per block, blocks of more than one row
        ids = torch.stack([torch.randperm(min(e, 2 * top_k), generator=gen)[:top_k] for _ in range(t)])
    else:
        ids = torch.stack([torch.randperm(e, generator=gen)[:top_k] for _ in range(t)])
    w = torch.rand(t, top_k, generator=gen)
    return ids.int(), (w / w.sum(1, keepdim=True)).float()


@cuda_only
@pytest.mark.parametrize("group,zeros,dtype", [(128, False, torch.bfloat16), (32, True, torch.bfloat16),
                                               (64, True, torch.float16)])
@pytest.mark.parametrize("t,skew", [(1, False), (3, False), (16, True), (40, True)])
def test_grouped_gemv_matches_float64(group, zeros, dtype, t, skew):
    """Each pair's output row equals its expert's float64 product, for whole-K CTAs and K
    split over CTAs, bit-identical twice, counters left at zero."""
    from mixq.kernels import fused_moe as fm

    gen = torch.Generator().manual_seed(group + t)
    e, n, k, top_k = 12, 192, 512, 4
    q, s, z = experts(e, n, k, group, zeros, gen)
    st = pack_experts(q, s, z, group, dtype)
    st = ExpertStack(st.qw.cuda(), st.scales.cuda(), None if st.zeros is None else st.zeros.cuda(), group, n, k)
    x = torch.randn(t, k, generator=gen).to(dtype).cuda()
    ids, _ = _route(t, e, top_k, gen, skew)
    fid_map = torch.arange(e, dtype=torch.int32, device="cuda")
    al = fm.moe_align(ids.cuda(), fid_map, e, moe_w4a16.BM)
    for kcs in (1, 4):
        y = grouped_gemv(x, st, al.sorted_ids, al.block_fid, fid_map, e, top_k, t * top_k, min(t * top_k, e), kcs=kcs)
        for p in range(t * top_k):
            ref = w4a16_mma.w4a16_reference(x[p // top_k:p // top_k + 1], st.expert(int(ids.view(-1)[p])))
            err = float((y[p].double() - ref[0]).norm() / ref.norm())
            assert err < (2e-3 if dtype == torch.float16 else 1e-2), (kcs, p, err)
        again = grouped_gemv(x, st, al.sorted_ids, al.block_fid, fid_map, e, top_k, t * top_k, 1, kcs=kcs)
        assert torch.equal(again, y)
        assert not tiles.split_counters(x.device, 1).any()


@cuda_only
@pytest.mark.parametrize("t", [1, 5, 64])
def test_layer_matches_float64_and_replays_in_a_graph(t):
    gen = torch.Generator().manual_seed(11 + t)
    e, hidden, inter, top_k = 16, 256, 128, 4
    q13, s13, _ = experts(e, 2 * inter, hidden, 128, False, gen)
    q2, s2, _ = experts(e, hidden, inter, 128, False, gen)
    w13 = pack_experts(q13, s13, None, 128, torch.bfloat16)
    w2 = pack_experts(q2, s2, None, 128, torch.bfloat16)
    w13 = ExpertStack(w13.qw.cuda(), w13.scales.cuda(), None, 128, 2 * inter, hidden)
    w2 = ExpertStack(w2.qw.cuda(), w2.scales.cuda(), None, 128, hidden, inter)
    x = torch.randn(t, hidden, generator=gen).bfloat16().cuda()
    ids, w = _route(t, e, top_k, gen, skew=t > 8)
    ids, w = ids.cuda(), w.cuda()
    y = moe_layer(x, ids, w, w13, w2)
    ref = moe_reference(x, ids, w, w13, w2)
    assert float((y.double() - ref).norm() / ref.norm()) < 1e-2
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        moe_layer(x, ids, w, w13, w2)
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        out = moe_layer(x, ids, w, w13, w2)
    x.copy_(torch.randn(t, hidden, generator=gen).bfloat16())
    g.replay()
    ref = moe_reference(x, ids, w, w13, w2)
    assert float((out.double() - ref).norm() / ref.norm()) < 1e-2
