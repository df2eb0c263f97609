"""W4A16/W8A16 Triton GEMM against float64 references (interpreter on CPU, real on CUDA)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mixq.formats import CheckpointCatalog
from mixq.kernels import tiles, wna16
from mixq.kernels.methods import WNA16Method
from mixq.kernels.wna16 import pack_wna16, unpack_wna16, wna16_gemm, wna16_reference

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
MS = (1, 2, 3, 7, 16, 33, 100, 257) if CUDA else (1, 3, 17)
SHAPES = [(96, 192, 64), (64, 128, 32), (256, 512, 128), (200, 384, 128)] if CUDA else [(96, 192, 64), (64, 128, 32)]
FIX = Path(__file__).parents[1] / "fixtures" / "tiny-llama"
pytestmark = pytest.mark.skipif(wna16.triton is None, reason="triton not installed")


def make(n, k, bits, group, zeros, perm, gen):
    q = torch.randint(0, 2**bits, (n, k), generator=gen, dtype=torch.int32).to(torch.uint8)
    s = (torch.rand(n, k // group, generator=gen) * 0.02 + 0.005).half()
    z = torch.randint(0, 2**bits, (n, k // group), generator=gen) if zeros else None
    p = torch.randperm(k, generator=gen) if perm else None
    w = pack_wna16(q, s, z, bits, group, p)
    return q, s, z, p, w


def test_pack_round_trip_is_bit_exact():
    gen = torch.Generator().manual_seed(0)
    for bits in (4, 8):
        q, s, z, _, w = make(40, 128, bits, 32, True, False, gen)
        q2, s2, z2 = unpack_wna16(w)
        assert torch.equal(q2, q.to(torch.int32)) and torch.equal(s2, s) and torch.equal(z2, z.to(torch.int32))
        # bits/8 bytes per weight, plus a 2-byte scale and 1-byte zero per group of 32
        assert w.nbytes == q.numel() * bits // 8 + q.numel() // 32 * 3


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("zeros,perm", [(False, False), (True, False), (True, True), (False, True)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gemm_matches_float64_reference(bits, zeros, perm, dtype):
    gen = torch.Generator().manual_seed(bits * 7 + zeros * 3 + perm)
    for n, k, group in SHAPES:
        *_, w = make(n, k, bits, group, zeros, perm, gen)
        w = wna16.WNA16Weight(*(t.to(DEV) if isinstance(t, torch.Tensor) else t for t in
                                (w.qweight, w.scales, w.zeros, w.perm)), w.bits, w.group_size, w.n, w.k)
        bias = torch.randn(n, generator=gen).to(dtype).to(DEV)
        for m in MS:
            x = torch.randn(m, k, generator=gen).to(dtype).to(DEV)
            y = torch.full((m, n), float("nan"), dtype=dtype, device=DEV)  # poison: every element must be written
            y = wna16_gemm(x, w, bias)
            ref = wna16_reference(x, w, bias)
            assert y.dtype == dtype and y.shape == (m, n) and not y.isnan().any()
            # the dequantized weight is rounded to the activation dtype before the dot
            # (2**-11 fp16, 2**-8 bf16 relative), sums accumulate in fp32; the output
            # rounds once more: a relative Frobenius error well under 1e-2 / 2e-2
            err = (y.double() - ref).norm() / ref.norm()
            assert err < (2e-3 if dtype == torch.float16 else 1.5e-2), (m, n, k, float(err))


def test_invalid_inputs_are_refused():
    gen = torch.Generator().manual_seed(1)
    q = torch.randint(0, 16, (8, 96), generator=gen).to(torch.uint8)
    with pytest.raises(ValueError, match="not a multiple of group_size=64"):
        pack_wna16(q, torch.ones(8, 1), None, 4, 64)
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        pack_wna16(q, torch.ones(8, 3), None, 3, 32)
    with pytest.raises(ValueError, match="values out of range"):
        pack_wna16(q * 2, torch.ones(8, 3), None, 4, 32)
    w = pack_wna16(q, torch.ones(8, 3), None, 4, 32)
    with pytest.raises(ValueError, match=r"x must be \[M, 96\]"):
        wna16_gemm(torch.zeros(2, 64, dtype=torch.float16), w)


@pytest.mark.parametrize("variant", ["gptq-legacy-4bit-desc-act", "gptq-legacy-4bit-asym", "gptq-legacy-8bit",
                                     "gptq-legacy-4bit-g-1", "awq-gemm", "gptq-w4a16", "awq-w4a16",
                                     "gptq-w4a16-asym-actorder"])
def test_method_on_real_checkpoints_equals_their_dequantization(variant, monkeypatch):
    monkeypatch.setenv("MIXQ_TRITON_INTERPRET_METHODS", "1")
    cat = CheckpointCatalog(FIX / variant)
    method = WNA16Method()
    gen = torch.Generator().manual_seed(2)
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        qw = cat.read(name).to(DEV)
        ok, why = method.can_implement(qw.spec, DEV)
        assert ok, why
        held = method.prepare(qw, torch.float16)
        assert held.nbytes <= qw.nbytes * 1.3  # still compressed (uint8 zeros may add a little)
        x = torch.randn(5, qw.shape[1], generator=gen).half().to(DEV)
        y = method.apply(held, x, None)
        ref = x.double() @ qw.dequantize().double().t()
        assert (y.double() - ref).norm() / ref.norm() < 2e-3, name


def test_refusals_name_the_reason():
    from mixq.formats.spec import WeightSpec

    m = WNA16Method()
    ok, why = m.can_implement(WeightSpec(layout="fp8", bits=8, dtype=torch.float8_e4m3fn), DEV)
    assert not ok and "not a packed int layout" in why
    if not CUDA:
        ok, why = m.can_implement(WeightSpec(layout="gptq", bits=4, dtype=torch.int32, group_size=128), DEV)
        assert not ok and "needs a CUDA device" in why


@pytest.mark.parametrize("cfg", [
    wna16.WNA16Config("gemv", 1, 64, 32, 3, 4, 1),
    wna16.WNA16Config("gemv", 1, 64, 16, 10, 4, 1),  # more splits than one round of the in-kernel sum
    wna16.WNA16Config("mm", 16, 64, 32, 2, 4, 1, swap=True),
    wna16.WNA16Config("mm", 32, 64, 32, 1, 4, 1, swap=False),
    wna16.WNA16Config("mm", 64, 64, 32, 2, 4, 1, swap=False),  # a tile too big for the in-kernel sum
], ids=lambda c: f"{c.kind}-swap{int(c.swap)}-split{c.split_k}")
def test_each_launch_path_matches_the_reference(cfg, monkeypatch):
    """Every kernel path the heuristic can pick (GEMV, swapped and plain tiles, split-K
    with a ragged last split, summed in the kernel or after it), with zero points,
    act-order and a bias."""
    gen = torch.Generator().manual_seed(11)
    monkeypatch.setattr(wna16, "CONFIG_OVERRIDE", cfg)
    for bits in (4, 8):
        *_, w = make(72, 160, bits, 32, True, True, gen)
        w = wna16.WNA16Weight(*(t.to(DEV) for t in (w.qweight, w.scales, w.zeros, w.perm)), w.bits, w.group_size,
                              w.n, w.k)
        bias = torch.randn(72, generator=gen).half().to(DEV)
        for m in ((1,) if cfg.kind == "gemv" else (1, 5, 33)):
            x = torch.randn(m, 160, generator=gen).half().to(DEV)
            y = wna16_gemm(x, w, bias)
            ref = wna16_reference(x, w, bias)
            # fp16 weights and output (2**-11 relative each), fp32 sums: well under 2e-3
            assert (y.double() - ref).norm() / ref.norm() < 2e-3, (bits, m)
    if cfg.kind == "gemv":
        with pytest.raises(ValueError, match="gemv config takes one row"):
            wna16_gemm(torch.randn(2, 160, generator=gen).half().to(DEV), w)
    if cfg.split_k > 1:  # the last split of each tile re-armed its counter: the next call starts clean
        assert not tiles.split_counters(DEV, 1).any()
        assert torch.equal(wna16_gemm(x, w, bias), y)  # and the split order is fixed: same bits again


@pytest.mark.parametrize("variant", ["gptq-legacy-4bit-desc-act"])
@pytest.mark.parametrize("world", [2, 4])
def test_act_order_weight_split_along_k_reads_a_scale_per_column(variant, world, monkeypatch):
    """A row-parallel shard of an act-order weight (tensor parallel): its columns fill the
    whole scale table's groups unevenly. The kernel reads a scale per column (gidx) and
    each shard's product equals its dequantized slice; the shards sum to the full layer."""
    from mixq.formats.base import Shard

    monkeypatch.setenv("MIXQ_TRITON_INTERPRET_METHODS", "1")
    cat = CheckpointCatalog(FIX / variant)
    name = "model.layers.1.mlp.down_proj.weight"
    full = cat.read(name).to(DEV)
    method = WNA16Method()
    gen = torch.Generator().manual_seed(world)
    x = torch.randn(5, full.shape[1], generator=gen).half().to(DEV)
    total = torch.zeros(5, full.shape[0], dtype=torch.float64, device=DEV)
    k_part = full.shape[1] // world
    for r in range(world):
        part = cat.read(name, Shard(1, r, world)).to(DEV)
        held = method.prepare(part, torch.float16)
        assert "gidx" in held.tensors and held.tensors["qweight"].shape[0] * 8 == k_part
        xs = x[:, r * k_part:(r + 1) * k_part]
        y = method.apply(held, xs, None)
        ref = xs.double() @ part.dequantize().double().t()
        # fp16 weights and output rounding (2**-11 each), fp32 sums
        assert (y.double() - ref).norm() / ref.norm() < 2e-3, (variant, r)
        total += y.double()
    ref_full = x.double() @ full.dequantize().double().t()
    assert (total - ref_full).norm() / ref_full.norm() < 2e-3


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("zeros", [False, True])
def test_per_column_groups_match_the_reference(bits, zeros):
    """gidx mode on its own: uneven, nondecreasing column groups over a larger scale table
    (some groups empty), zero points, act-order perm, M from 1 (run as a tile) up."""
    gen = torch.Generator().manual_seed(bits + 10 * zeros)
    n, k, g = 72, 96, 7
    counts = torch.tensor([0, 30, 2, 17, 0, 40, 7])  # sums to K = 96
    gidx = torch.repeat_interleave(torch.arange(g), counts)
    q = torch.randint(0, 2**bits, (n, k), generator=gen).to(torch.uint8)
    sc = (torch.rand(n, g, generator=gen) * 0.02 + 0.005).half()
    z = torch.randint(0, 2**bits, (n, g), generator=gen) if zeros else None
    perm = torch.randperm(k, generator=gen)
    w = pack_wna16(q, sc, z, bits, 32, perm, gidx)
    w = wna16.WNA16Weight(*(t.to(DEV) if isinstance(t, torch.Tensor) else t for t in
                            (w.qweight, w.scales, w.zeros, w.perm)), w.bits, w.group_size, w.n, w.k, w.gidx.to(DEV))
    for m in (1, 3, 17):
        x = torch.randn(m, k, generator=gen).half().to(DEV)
        y = wna16_gemm(x, w)
        ref = wna16_reference(x, w)
        assert (y.double() - ref).norm() / ref.norm() < 2e-3, m
    with pytest.raises(ValueError, match="nondecreasing"):
        pack_wna16(q, sc, z, bits, 32, perm, gidx.flip(0))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("zeros,perm", [(False, False), (True, True)])
def test_dequantize_then_gemm_path(bits, zeros, perm, monkeypatch):
    """The large-M path (weight dequantized into a buffer, one GEMM per column chunk) with
    a ragged last chunk, zero points, act-order and a bias; and its size heuristic."""
    from mixq.kernels.wna16_dequant import WHOLE_BYTES, dequant_chunk

    gen = torch.Generator().manual_seed(bits + 2 * zeros)
    *_, w = make(200, 128, bits, 32, zeros, perm, gen)
    w = wna16.WNA16Weight(*(t.to(DEV) if isinstance(t, torch.Tensor) else t for t in
                            (w.qweight, w.scales, w.zeros, w.perm)), w.bits, w.group_size, w.n, w.k)
    bias = torch.randn(200, generator=gen).half().to(DEV)
    x = torch.randn(9, 128, generator=gen).half().to(DEV)
    ref = wna16_reference(x, w, bias)
    for chunk in (64, 200):
        monkeypatch.setattr(wna16, "CHUNK_OVERRIDE", chunk)
        y = wna16_gemm(x, w, bias)
        # fp16 dequantized weight (2**-11), fp16 GEMM output: as the fused kernels
        assert (y.double() - ref).norm() / ref.norm() < 2e-3, chunk
    assert dequant_chunk(64, 28672, 4096) == 0 and dequant_chunk(127, 2048, 2048) == 0
    assert dequant_chunk(128, 2048, 2048) == 2048  # fits in L2: from 128 rows
    assert dequant_chunk(256, 28672, 4096) == 0 and dequant_chunk(256, 4096, 14336) == 4096
    chunk = dequant_chunk(2048, 28672, 4096)
    assert chunk % 64 == 0 and 0 < chunk * 4096 * 2 <= 32 * 2**20 < 28672 * 4096 * 2 and 4096 * 4096 * 2 <= WHOLE_BYTES
