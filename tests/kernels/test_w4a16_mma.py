"""The Marlin-class W4A16 kernel: its layout conversion and launch heuristic on the CPU
(bit-exact, independent of the kernel), the kernel itself against float64 on CUDA."""

from __future__ import annotations

import ctypes
from pathlib import Path

import pytest
import torch

from mixq.formats import CheckpointCatalog
from mixq.formats.spec import WeightSpec
from mixq.kernels import cuda_jit, tiles, w4a16_mma
from mixq.kernels.methods import MMAW4A16Method
from mixq.kernels.w4a16_mma import (
    MMALaunch,
    choose_launch,
    layout_problem,
    pack_w4a16,
    stream_k_grid,
    unpack_w4a16,
    w4a16_gemm,
    w4a16_reference,
)
from mixq.kernels.wna16 import pack_wna16

CUDA = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)
FIX = Path(__file__).parents[1] / "fixtures" / "tiny-llama"
cuda_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU of compute capability 8.0+")


def make(n, k, group, zeros, perm, gen, dtype=torch.bfloat16, device="cpu"):
    q = torch.randint(0, 16, (n, k), generator=gen)
    s = torch.rand(n, k // group, generator=gen) * 0.02 + 0.005
    z = torch.randint(0, 16, (n, k // group), generator=gen) if zeros else None
    p = torch.randperm(k, generator=gen) if perm else None
    w = pack_w4a16(q, s, z, group, dtype, p)
    if device != "cpu":
        w = w4a16_mma.W4A16MMAWeight(*(t.to(device) if t is not None else None for t in (w.qw, w.scales, w.zeros, w.perm)),
                                     w.group_size, w.n, w.k)
    return q, s, z, p, w


@pytest.mark.parametrize("n,k,group", [(64, 64, 64), (192, 256, 32), (128, 512, 128), (256, 128, 128)])
@pytest.mark.parametrize("zeros", [False, True])
def test_layout_round_trip_is_bit_exact(n, k, group, zeros):
    gen = torch.Generator().manual_seed(n + k + group + zeros)
    q, s, z, _, w = make(n, k, group, zeros, False, gen)
    q2, s2, z2 = unpack_w4a16(w)
    assert torch.equal(q2, q.int()) and torch.equal(s2, s.bfloat16())
    assert z2 is None if not zeros else torch.equal(z2, z.int())
    # memory accounting unchanged: the same bytes as the Triton layout of the same weight
    t = pack_wna16(q.to(torch.uint8), s.bfloat16(), z, 4, group)
    assert w.nbytes == t.nbytes == n * k // 2 + n * (k // group) * (3 if zeros else 2)


def test_each_word_holds_the_mma_fragment_nibbles():
    """Independent of pack_w4a16's arithmetic: nibble p of word w of lane (g, t) in block
    (kb, nb) is q[n, k] with k = 16 kb + 2 t + p // 4 + 8 (p % 2) and
    n = 64 nb + 8 (2 w + (p % 4) // 2) + g: the B fragments of mma.m16n8k16 (b0: k = 2t,
    2t+1; b1: k = 2t+8, 2t+9; column g) after `(word >> 4i) & 0x000f000f`."""
    gen = torch.Generator().manual_seed(3)
    n, k = 128, 64
    q, _, _, _, w = make(n, k, 64, False, False, gen)
    words = w.qw.view(k // 16, n // 64, 8, 4, 4)
    for kb, nb, g, t, wd in [(0, 0, 0, 0, 0), (3, 1, 7, 3, 3), (2, 1, 4, 2, 1), (1, 0, 5, 1, 2)]:
        word = int(words[kb, nb, g, t, wd]) & 0xFFFFFFFF
        for p in range(8):
            kk = 16 * kb + 2 * t + p // 4 + 8 * (p % 2)
            nn = 64 * nb + 8 * (2 * wd + (p % 4) // 2) + g
            assert (word >> (4 * p)) & 0xF == int(q[nn, kk]), (kb, nb, g, t, wd, p)
    # and the scales: a lane's 8 scales (n8 tiles jt = 0..7 of its column g) are contiguous
    _, s, _, _, w = make(n, k, 32, False, False, gen)
    sp = w.scales.view(2, n // 64, 8, 8)
    assert torch.equal(sp[1, 1, 5], s.bfloat16()[64 + 5::8, 1])


def test_bad_layouts_are_refused():
    assert layout_problem(96, 128, 128) == "N=96 is not a multiple of 64"
    assert "K=200" in layout_problem(64, 200, 8)
    assert "group size 48" in layout_problem(64, 192, 48)
    assert layout_problem(64, 256, 256) is None and layout_problem(64, 256, 32) is None
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (64, 128), generator=gen)
    with pytest.raises(ValueError, match="4-bit unsigned"):
        pack_w4a16(q * 2, torch.ones(64, 1), None, 128, torch.bfloat16)
    with pytest.raises(ValueError, match="scales/zeros must be"):
        pack_w4a16(q, torch.ones(64, 2), None, 128, torch.bfloat16)
    with pytest.raises(ValueError, match="not bf16/fp16"):
        pack_w4a16(q, torch.ones(64, 1), None, 128, torch.float32)


def test_gemm_refuses_tensors_off_cuda():
    *_, w = make(64, 64, 64, False, False, torch.Generator().manual_seed(2))
    with pytest.raises(ValueError, match="one CUDA device"):
        w4a16_gemm(torch.zeros(1, 64, dtype=torch.bfloat16), w)


def test_launch_heuristic():
    occ = lambda mb, shape: 2  # noqa: E731
    # up to 16 rows on weights up to 10 MB: the GEMV, the K split nearest 4 CTAs per SM
    g1 = choose_launch(1, 4096, 4096, 128, 132, occ)
    assert (g1.kind, g1.variant, g1.kcs, g1.spc) == ("gemv", 1, 8, 32)  # 64 column blocks x 8 = 512
    g16 = choose_launch(16, 2048, 4096, 128, 132, occ)
    assert (g16.kcs, g16.spc) == (16, 16)  # 32 blocks x 16; 16 rows x 96+ slices would not fit anyway
    assert choose_launch(1, 28672, 4096, 128, 132, occ, gemv=True).kcs == 1  # 448 blocks
    assert choose_launch(17, 4096, 4096, 128, 132, occ).kind == "mma"
    # bigger weights: stream-K, 256 columns and 2 K-warps at one row, shape 5 up to 16 rows
    one = choose_launch(1, 28672, 4096, 128, 132, occ)
    assert (one.kind, one.mb, one.mchunks, one.shape) == ("mma", 1, 1, 1)
    assert (one.ntiles, one.kiters, one.grid) == (112, 64, 264)  # every resident slot
    assert choose_launch(16, 28672, 4096, 128, 132, occ).shape == 5
    assert choose_launch(1, 2048, 4096, 128, 132, occ, gemv=False).shape == 1
    assert choose_launch(17, 4096, 4096, 128, 132, occ).mb == 2
    big = choose_launch(100, 4096, 14336, 128, 132, occ)
    assert (big.mb, big.mchunks, big.shape) == (4, 2, 5)
    assert choose_launch(64, 28672, 4096, 128, 132, occ).shape == 3
    two = choose_launch(64, 28672, 4096, 128, 132, occ, mb=2)  # half-height tiles: two row chunks
    assert (two.mb, two.mchunks) == (2, 2)
    with pytest.raises(ValueError, match="row blocks"):
        choose_launch(64, 28672, 4096, 128, 132, occ, mb=5)
    assert choose_launch(128, 2048, 2048, 128, 132, occ).kind == "dequant"  # fits in L2
    assert choose_launch(1, 4032, 4096, 128, 132, occ, gemv=False).shape == 2  # N % 128: 64-wide tiles
    d = choose_launch(2048, 28672, 4096, 128, 132, occ)
    assert d.kind == "dequant" and d.chunk % 64 == 0 and d.chunk * 4096 * 2 <= w4a16_mma.DEQUANT_CHUNK_BYTES
    assert choose_launch(2048, 64, 64, 64, 132, occ).chunk == 64
    # few iterations: no CTA gets fewer than min_iters stages (a partial costs more than it saves)
    small = choose_launch(64, 256, 256, 128, 132, occ)
    assert small.grid == max(1, small.mchunks * small.ntiles * small.kiters // 8)
    with pytest.raises(ValueError, match="does not tile"):
        choose_launch(1, 192, 256, 128, 132, occ, shape=1)


@pytest.mark.parametrize("m,n,k,warps", [(1, 64, 64, 4), (16, 4096, 14336, 4), (7, 192, 4096, 8), (16, 64, 256, 8),
                                         (1, 64, 96, 2), (1, 64, 192, 2)])  # 2 warps: the swizzle's own bound
def test_gemv_split_bounds(m, n, k, warps):
    """Every split the GEMV may get: equal CTA ranges, whole warp runs, swizzle-sized rows,
    activations within the shared-memory budget; a forced split that breaks one is refused."""
    split = w4a16_mma.gemv_split(m, n, k, 132, warps)
    slices = k // 16
    if split is None:  # nothing fits: a single range would still have to
        assert slices % warps or slices % 4 or m * slices * 32 > w4a16_mma.GEMV_X_BYTES
        return
    kcs, spc = split
    assert kcs * spc == slices and spc % 4 == 0 and spc % warps == 0
    assert m * spc * 32 <= w4a16_mma.GEMV_X_BYTES
    assert w4a16_mma.gemv_split(m, n, k, 132, warps, kcs=slices + 1) is None


@pytest.mark.parametrize("total,sms,occ,min_iters", [(1, 132, 2, 2), (100, 132, 2, 2), (14336, 132, 3, 2),
                                                     (7, 4, 1, 16), (64 * 16, 132, 1, 4)])
def test_stream_k_grid_bounds(total, sms, occ, min_iters):
    g = stream_k_grid(total, sms, occ, min_iters)
    assert 1 <= g <= min(total, sms * occ)
    assert g == 1 or total // g >= min_iters  # every CTA gets at least min_iters stages


def test_jit_cache_key_and_switches(monkeypatch, tmp_path):
    monkeypatch.setenv("MIXQ_CUDA_CACHE", str(tmp_path))
    a = cuda_jit.library_path("w4a16_mma", (9, 0))
    assert a.parent == tmp_path and "sm90" in a.name
    assert a != cuda_jit.library_path("w4a16_mma", (8, 0))
    assert a != cuda_jit.library_path("w4a16_mma", (9, 0), parts=4)  # a split build is another build
    assert cuda_jit.arch_flags((9, 0)) == ["-gencode=arch=compute_90a,code=sm_90a"]
    monkeypatch.setenv("MIXQ_CUDA_KERNELS", "0")
    assert cuda_jit.available("w4a16_mma", (9, 0)) == (False, "compiled CUDA kernels are off (MIXQ_CUDA_KERNELS=0)")
    monkeypatch.setenv("MIXQ_CUDA_KERNELS", "1")
    monkeypatch.setenv("MIXQ_NVCC", str(tmp_path / "no-nvcc"))
    ok, why = cuda_jit.available("w4a16_mma", (9, 0))
    assert not ok and "no nvcc" in why
    a.write_bytes(b"")  # a cached build is enough
    assert cuda_jit.available("w4a16_mma", (9, 0)) == (True, "")


@pytest.mark.skipif(cuda_jit.nvcc_path() is None, reason="needs nvcc")
def test_split_build_exports_every_entry_point(monkeypatch, tmp_path):
    """The library built as PARTS translation units (in parallel) and linked: every
    extern "C" entry point is there exactly once (a combo compiled in no part, or in two,
    fails the link or this check)."""
    monkeypatch.setenv("MIXQ_CUDA_CACHE", str(tmp_path))
    path = cuda_jit.build("w4a16_mma", (9, 0), parts=w4a16_mma.PARTS)
    lib = ctypes.CDLL(str(path))
    for sym in ("mixq_w4a16_occupancy", "mixq_w4a16_gemm", "mixq_w4a16_dequant", "mixq_w4a16_gemv",
                "mixq_w4a16_moe_gemv"):
        assert hasattr(lib, sym), sym
    assert cuda_jit.build("w4a16_mma", (9, 0), parts=w4a16_mma.PARTS) == path  # cached


def test_method_refusals_name_the_reason(monkeypatch):
    m = MMAW4A16Method()
    ok, why = m.can_implement(WeightSpec(layout="gptq", bits=4, dtype=torch.int32, group_size=128), torch.device("cuda"))
    assert not ok and "opt-in" in why  # not the default kernel (yet): see bench/w4a16-notes.md
    monkeypatch.setenv("MIXQ_W4A16_MMA", "1")
    ok, why = m.can_implement(WeightSpec(layout="gptq", bits=8, dtype=torch.int32, group_size=128), torch.device("cpu"))
    assert not ok and "8-bit" in why
    ok, why = m.can_implement(WeightSpec(layout="gptq", bits=4, dtype=torch.int32, group_size=128), torch.device("cpu"))
    assert not ok and "needs a CUDA device" in why
    cat = CheckpointCatalog(FIX / "gptq-legacy-4bit-desc-act")
    qw = cat.read("model.layers.1.mlp.down_proj.weight")
    ok, why = m.can_implement_weight(qw, torch.float32)
    assert not ok and "not bf16/fp16" in why


# ---------------------------------------------------------------------------- CUDA


def _run(x, w, bias=None):
    # poison what the allocator hands out next: the output must be written everywhere
    torch.full((x.shape[0] * w.n + 4096,), float("nan"), device=x.device, dtype=x.dtype)
    return w4a16_gemm(x, w, bias)


@cuda_only
@pytest.mark.parametrize("group", [32, 64, 128, -1])
@pytest.mark.parametrize("zeros,perm", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gemm_matches_float64_reference(group, zeros, perm, dtype):
    gen = torch.Generator().manual_seed(group + 3 * zeros + 7 * perm)
    for n, k in ((256, 512), (192, 256)):
        g = k if group == -1 else group
        *_, w = make(n, k, g, zeros, perm, gen, dtype, "cuda")
        bias = torch.randn(n, generator=gen).to(dtype).cuda()
        for m in (1, 2, 15, 16, 17, 40, 64, 65, 130, 600):
            x = torch.randn(m, k, generator=gen).to(dtype).cuda()
            y = _run(x, w, bias if m % 2 else None)
            ref = w4a16_reference(x, w, bias if m % 2 else None)
            assert y.dtype == dtype and y.shape == (m, n) and torch.isfinite(y).all()
            # the dequantized weight rounds to the activation dtype (2**-8 bf16, 2**-11 fp16
            # relative), sums in fp32, one more rounding of the output
            err = float((y.double() - ref).norm() / ref.norm())
            assert err < (2e-3 if dtype == torch.float16 else 1e-2), (n, k, m, err)


@cuda_only
@pytest.mark.parametrize("shape", sorted(w4a16_mma.SHAPES))
@pytest.mark.parametrize("m", [1, 16, 33, 64, 200])
def test_every_launch_shape_and_stream_k_split(shape, m, monkeypatch):
    """Each launch shape with a grid that splits tiles between CTAs (min_iters 1: partials
    and the last-arrival sum on every tile), zero points and a bias; bit-identical twice
    (the partials are summed in CTA order) and the counters left at zero."""
    gen = torch.Generator().manual_seed(shape * 100 + m)
    n, k = 512, 1024
    *_, w = make(n, k, 64, True, False, gen, torch.bfloat16, "cuda")
    bias = torch.randn(n, generator=gen).bfloat16().cuda()
    x = torch.randn(m, k, generator=gen).bfloat16().cuda()
    occ = lambda mb, s: 1  # noqa: E731
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    monkeypatch.setattr(w4a16_mma, "CONFIG_OVERRIDE",
                        lambda m_, n_, k_, g_: choose_launch(m_, n_, k_, g_, sms, occ, shape=shape, min_iters=1))
    y = _run(x, w, bias)
    ref = w4a16_reference(x, w, bias)
    assert float((y.double() - ref).norm() / ref.norm()) < 1e-2
    assert torch.equal(_run(x, w, bias), y)
    assert not tiles.split_counters(x.device, 1).any()


@cuda_only
@pytest.mark.parametrize("variant", sorted(w4a16_mma.GEMV_VARIANTS))
@pytest.mark.parametrize("k,group,zeros,perm,dtype", [
    (1024, 128, False, False, torch.bfloat16), (1024, 32, True, False, torch.bfloat16),
    (1024, 64, True, True, torch.float16), (1024, 16, False, False, torch.bfloat16),
    (1344, -1, False, False, torch.float16)])  # per channel: a group of 1344, not a power of 2
def test_gemv_matches_float64_reference(variant, k, group, zeros, perm, dtype, monkeypatch):
    """The few-row GEMV at 1-16 rows: whole-K CTAs (no partials) and K split over 2-8 CTAs
    (partials summed by the last arrival), a bias, act-order; bit-identical twice and the
    arrival counters left at zero."""
    gen = torch.Generator().manual_seed(variant * 97 + group + 3 * zeros)
    n = 320
    g = k if group == -1 else group
    *_, w = make(n, k, g, zeros, perm, gen, dtype, "cuda")
    bias = torch.randn(n, generator=gen).to(dtype).cuda()
    warps = w4a16_mma.GEMV_VARIANTS[variant][0]
    for m in (1, 3, 8, 16):
        x = torch.randn(m, k, generator=gen).to(dtype).cuda()
        splits = [c for c in (1, 2, 3, 8) if w4a16_mma.gemv_split(m, n, k, 132, warps, kcs=c) is not None]
        if not splits:  # 84 k16 slices do not split over 8 warps: the stream-K kernel takes it
            assert (k, warps) == (1344, 8)
            assert choose_launch(m, n, k, g, 132, lambda mb, s: 1, gemv=True, gemv_variant=variant).kind == "mma"
            continue
        assert len(splits) >= 2, splits
        for kcs in splits:
            launch = choose_launch(m, n, k, g, 132, lambda mb, s: 1, gemv=True, gemv_variant=variant, kcs=kcs)
            assert launch.kind == "gemv" and launch.kcs == kcs
            monkeypatch.setattr(w4a16_mma, "CONFIG_OVERRIDE", lambda *a, launch=launch: launch)
            b = bias if m % 2 else None
            y = _run(x, w, b)
            ref = w4a16_reference(x, w, b)
            err = float((y.double() - ref).norm() / ref.norm())
            assert err < (2e-3 if dtype == torch.float16 else 1e-2), (m, kcs, err)
            assert torch.equal(_run(x, w, b), y)
            assert not tiles.split_counters(x.device, 1).any()


@cuda_only
def test_dequant_path_in_chunks(monkeypatch):
    gen = torch.Generator().manual_seed(5)
    *_, w = make(320, 256, 64, True, True, gen, torch.bfloat16, "cuda")
    x = torch.randn(70, 256, generator=gen).bfloat16().cuda()
    bias = torch.randn(320, generator=gen).bfloat16().cuda()
    for chunk in (128, 320):  # a ragged last chunk, and the whole weight at once
        monkeypatch.setattr(w4a16_mma, "CONFIG_OVERRIDE", lambda *a, c=chunk: MMALaunch("dequant", chunk=c))
        y = _run(x, w, bias)
        ref = w4a16_reference(x, w, bias)
        assert float((y.double() - ref).norm() / ref.norm()) < 1e-2, chunk


@cuda_only
def test_cuda_graph_replay_reads_new_inputs():
    gen = torch.Generator().manual_seed(6)
    *_, w = make(256, 512, 128, False, False, gen, torch.bfloat16, "cuda")
    x = torch.randn(3, 512, generator=gen).bfloat16().cuda()
    w4a16_gemm(x, w)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        w4a16_gemm(x, w)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = w4a16_gemm(x, w)
    for _ in range(3):
        x.copy_(torch.randn(3, 512, generator=gen).bfloat16())
        g.replay()
        ref = w4a16_reference(x, w)
        assert float((y.double() - ref).norm() / ref.norm()) < 1e-2


@cuda_only
@pytest.mark.parametrize("variant", ["gptq-legacy-4bit-desc-act", "gptq-legacy-4bit-asym", "gptq-legacy-4bit-g-1",
                                     "awq-gemm", "gptq-w4a16", "awq-w4a16", "gptq-w4a16-asym-actorder"])
def test_method_on_real_checkpoints_equals_their_dequantization(variant, monkeypatch):
    """Real GPTQ/AWQ/compressed-tensors files (tests/fixtures): where the shape fits the
    kernel it runs there, else can_implement_weight says why (the Triton method takes it)."""
    monkeypatch.setenv("MIXQ_W4A16_MMA", "1")
    cat = CheckpointCatalog(FIX / variant)
    m = MMAW4A16Method()
    gen = torch.Generator().manual_seed(2)
    ran = 0
    for name in sorted(cat.entries):
        if not name.endswith("proj.weight"):
            continue
        qw = cat.read(name).to("cuda")
        ok, why = m.can_implement(qw.spec, qw.tensors[next(iter(qw.tensors))].device)
        assert ok, why
        ok, why = m.can_implement_weight(qw, torch.float16)
        if not ok:
            assert "multiple of" in why or "group" in why, why
            continue
        held = m.prepare(qw, torch.float16)
        x = torch.randn(5, qw.shape[1], generator=gen).half().cuda()
        y = m.apply(held, x, None)
        ref = x.double() @ qw.dequantize().double().t()
        assert float((y.double() - ref).norm() / ref.norm()) < 2e-3, name
        ran += 1
    assert ran >= 7  # the fixture's shapes (hidden 128, intermediate 256) all fit
