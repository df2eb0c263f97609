"""The W4A16/W8A16 kernel's GPU-only code under the interpreter: the 16-bit magic-number
dequantization (forced with `gpu_dequant=True`; the interpreter otherwise dequantizes in
fp32) and every launch configuration the GPU heuristic picks (forced with `config=`), at
tiny shapes, against float64 references. The heuristic itself is a plain function of the
shape and the SM count, checked against configurations worked out by hand from its rules.
On CUDA the same tests run the real kernels (there the 16-bit path is the default)."""

from __future__ import annotations

import pytest
import torch

from mixq.kernels import tiles, wna16
from mixq.kernels.wna16 import WNA16Config, pack_wna16, unpack_wna16, wna16_gemm, wna16_reference

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
H100_SMS = 132
pytestmark = pytest.mark.skipif(wna16.triton is None, reason="triton not installed")


def make(n, k, bits, group, zeros, perm, gen):
    """A random packed weight on DEV: q [N, K], fp16 scales per group, optional zero points
    and act-order permutation."""
    q = torch.randint(0, 2**bits, (n, k), generator=gen, dtype=torch.int32).to(torch.uint8)
    s = (torch.rand(n, k // group, generator=gen) * 0.02 + 0.005).half()
    z = torch.randint(0, 2**bits, (n, k // group), generator=gen) if zeros else None
    p = torch.randperm(k, generator=gen) if perm else None
    w = pack_wna16(q, s, z, bits, group, p)
    return wna16.WNA16Weight(*(t.to(DEV) if isinstance(t, torch.Tensor) else t for t in
                               (w.qweight, w.scales, w.zeros, w.perm)), w.bits, w.group_size, w.n, w.k)


def operands(x, w, kind):
    """(x, W) in float64 and kernel column order (act-order: x's columns permuted), W
    [N, K] rounded as the GPU path defines it (wna16's docstrings): tiles dequantize to x's
    dtype, q - z exact, times the scale in one rounding; 4-bit values (and fp16) take the
    16-bit route, whose scale is first rounded to x's dtype; 8-bit values in bf16 take the
    fp32 route (scale kept). The GEMV never rounds the weight (fp32 q times x; scale and
    zero point applied to the fp32 sums)."""
    q, s, z = unpack_wna16(w)
    zero = torch.full_like(s, 2 ** (w.bits - 1), dtype=torch.float64) if z is None else z.double()
    groups = torch.arange(w.k, device=q.device) // w.group_size
    rounds = kind != "gemv" and x.dtype != torch.float32
    s16 = s.to(x.dtype).double() if rounds and (w.bits == 4 or x.dtype == torch.float16) else s.double()
    wd = (q.double() - zero[:, groups]) * s16[:, groups]
    if rounds:
        wd = wd.to(x.dtype).double()
    xd = x.double() if w.perm is None else x.double()[:, w.perm.long()]
    return xd, wd


def check(y, x, w, bias, kind):
    """Elementwise against the rounded float64 reference: what is left is the output's
    rounding to x's dtype (half an ulp, 2**-8 relative in bf16 and 2**-11 in fp16; a whole
    bf16 ulp under the interpreter, which truncates fp32 -> bf16 casts) and fp32 sums over
    K terms (2**-24 relative error per add: K * 2**-24 of sum |x w|). Then the plain
    float64 product, which differs by the weight rounding too."""
    xd, wd = operands(x, w, kind)
    ref = xd @ wd.t() + (0 if bias is None else bias.double())
    assert y.dtype == x.dtype and y.shape == ref.shape and not y.isnan().any()
    out_eps = {torch.bfloat16: 2**-8 if CUDA else 2**-7, torch.float16: 2**-11}[x.dtype]
    err = (y.double() - ref).abs()
    bound = out_eps * ref.abs() + w.k * 2**-24 * (xd.abs() @ wd.abs().t())
    assert bool((err <= bound).all()), f"{kind}: error {float((err / bound).max()):.3g} x the bound"
    plain = wna16_reference(x, w, bias)
    assert (y.double() - plain).norm() / plain.norm() < {torch.bfloat16: 1.6e-2, torch.float16: 2e-3}[x.dtype]


# (bits, activation dtype) -> the dequantization the GPU tiles run: MODE 2 (16-bit magic
# number: bf16 base 128, fp16 base 1024) or MODE 1 (fp32 magic number 2**23, then bf16)
DQ_CASES = [(4, torch.bfloat16), (4, torch.float16), (8, torch.float16), (8, torch.bfloat16)]


@pytest.mark.parametrize("bits,dtype", DQ_CASES, ids=lambda v: str(v).removeprefix("torch."))
@pytest.mark.parametrize("zeros,perm", [(False, False), (True, True)], ids=["sym", "zp-actorder"])
@pytest.mark.parametrize("swap", [True, False], ids=["swapped", "plain"])
def test_gpu_dequantization_matches_the_rounded_float64_reference(bits, dtype, zeros, perm, swap):
    """Every 16-bit value the dequantization can meet: all 2**bits codes against every
    zero point (random, plus the symmetric 2**(bits-1)) in each dtype, through swapped and
    plain tiles. A wrong magic constant (bf16 base 127 instead of 128) shifts every weight
    by one scale step: a ~20% error, against a bound of half an output ulp."""
    gen = torch.Generator().manual_seed(bits * 10 + zeros + 2 * swap + 5 * (dtype == torch.float16))
    w = make(40, 128, bits, 32, zeros, perm, gen)
    bias = torch.randn(40, generator=gen).to(dtype).to(DEV)
    cfg = WNA16Config("mm", 16, 32, 32, 2, 4, 1, swap)
    for m in (3, 16):
        x = torch.randn(m, 128, generator=gen).to(dtype).to(DEV)
        check(wna16_gemm(x, w, bias, config=cfg, gpu_dequant=True), x, w, bias, "mm")


def test_gpu_dequant_switches_the_interpreter_to_the_16_bit_path():
    """The interpreter's default dequantizes in fp32 (no weight rounding); gpu_dequant must
    really take the other path there (else the tests above could pass on the fp32 one). On
    CUDA both are the 16-bit path: the same bits."""
    gen = torch.Generator().manual_seed(3)
    w = make(64, 256, 4, 64, True, False, gen)
    x = torch.randn(16, 256, generator=gen).bfloat16().to(DEV)
    cfg = WNA16Config("mm", 16, 64, 64, 1, 4, 1, True)
    a, b = wna16_gemm(x, w, config=cfg), wna16_gemm(x, w, config=cfg, gpu_dequant=True)
    assert torch.equal(a, b) == CUDA


# The heuristic's branches at an H100's 132 SMs, each worked out by hand from its rules
# (gpu_config's docstring): bk = the largest power of two <= 128 (<= 64 above 64 rows)
# dividing the group; one row -> GEMV, 256 columns per program from N = 2048 (128 above
# 512, else 64), K split into min(K / bk, 32); up to 16 rows -> 16 x 64 swapped tiles with
# ceil(8 * SMs / column tiles) splits (at most K / bk); up to 64 rows -> 64 x 128 swapped
# and unsplit from N = 16384, else 64 x 64 plain tiles with ceil(4 * SMs / column tiles)
# splits keeping >= 4 K tiles each; up to 512 rows, when 256-row tiles would be fewer than
# the SMs: 64 x 128 swapped with ceil(2 * SMs / tiles) splits keeping >= 8 K tiles;
# otherwise 256 x 128 tiles, 8 warps, unsplit.
HEURISTIC = [
    # m, n, k, group -> kind, bm, bn, bk, split, warps, stages, swap
    ((1, 4096, 4096, 128), ("gemv", 1, 256, 128, 32, 4, 1, True)),  # 32 K tiles
    ((1, 2047, 1024, 128), ("gemv", 1, 128, 128, 8, 4, 1, True)),  # 8 K tiles
    ((1, 512, 2048, 32), ("gemv", 1, 64, 32, 32, 4, 1, True)),  # 64 K tiles, capped at 32
    ((8, 4096, 4096, 128), ("mm", 16, 64, 128, 17, 4, 4, True)),  # 64 column tiles: ceil(1056 / 64)
    ((16, 14336, 4096, 128), ("mm", 16, 64, 128, 5, 4, 4, True)),  # 224 column tiles: ceil(1056 / 224)
    ((16, 4096, 256, 128), ("mm", 16, 64, 128, 2, 4, 4, True)),  # 17 wanted, only 2 K tiles
    ((17, 16384, 4096, 128), ("mm", 64, 128, 128, 1, 4, 4, True)),
    ((64, 4096, 4096, 128), ("mm", 64, 64, 128, 8, 4, 4, False)),  # ceil(528 / 64) = 9, 32 / 4 = 8 cap
    ((33, 2048, 4096, 64), ("mm", 64, 64, 64, 16, 4, 4, False)),  # ceil(528 / 32) = 17, 64 / 4 = 16 cap
    ((65, 4096, 4096, 128), ("mm", 64, 128, 64, 5, 4, 3, True)),  # 1 x 32 big tiles; 64 tiles: ceil(264 / 64)
    ((512, 4096, 4096, 128), ("mm", 64, 128, 64, 2, 4, 3, True)),  # 2 x 32 big tiles; 256 tiles: ceil(264/256)
    ((300, 16384, 4096, 128), ("mm", 256, 128, 64, 1, 8, 3, True)),  # 2 x 128 = 256 big tiles >= 132
    ((513, 4096, 4096, 128), ("mm", 256, 128, 64, 1, 8, 3, True)),
]


@pytest.mark.parametrize("shape,want", HEURISTIC, ids=["x".join(map(str, s)) for s, _ in HEURISTIC])
def test_gpu_heuristic_picks_the_configuration_its_rules_give(shape, want):
    m, n, k, group = shape
    assert wna16.gpu_config(m, n, k, group, H100_SMS) == WNA16Config(*want)


def test_gpu_heuristic_configurations_are_launchable_everywhere():
    """Over a grid of model shapes and SM counts: a GEMV only for one row, BK a power of two
    dividing K and the group, at most one split per K tile."""
    for sms in (1, 78, 132, 170):
        for m in (1, 2, 15, 16, 17, 63, 64, 65, 200, 511, 512, 513, 4096):
            for n, k, group in ((512, 2048, 32), (2048, 8192, 128), (4096, 14336, 64), (28672, 4096, 128),
                                (151936, 896, 64), (4096, 4096, 4096)):
                c = wna16.gpu_config(m, n, k, group, sms)
                assert (c.kind == "gemv") == (m == 1), (m, n, k, c)
                assert c.bk & (c.bk - 1) == 0 and k % c.bk == 0 and group % c.bk == 0, (m, n, k, group, c)
                assert 1 <= c.split_k <= k // c.bk, (m, n, k, c)


def tiny_shape(c: WNA16Config) -> tuple[int, int, int, int]:
    """(M, N, K, group) that run configuration `c` as the GPU would on a real layer but in
    seconds under the interpreter: every split of its K gets one tile (K = split * BK; two
    tiles when unsplit), the group spans two tiles where K allows, N has a ragged second
    column block, M fills a ragged second row tile (one row for the GEMV)."""
    k = c.split_k * c.bk if c.split_k > 1 else 2 * c.bk
    group = 2 * c.bk if k % (2 * c.bk) == 0 else c.bk
    m = 1 if c.kind == "gemv" else min(c.bm + 5, 70)
    return m, c.bn + 24, k, group


@pytest.mark.parametrize("want", sorted({w for _, w in HEURISTIC}), ids=lambda w: "-".join(map(str, w)))
def test_each_heuristic_configuration_runs_at_a_tiny_shape(want):
    """The configurations above, launched as they are (tile, warps, stages, split-K count:
    summed in the kernel for GEMV and 16-row tiles, after the launch for bigger ones), with
    the GPU's dequantization: 4-bit bf16 with zero points, act-order and a bias; 8-bit fp16
    symmetric."""
    c = WNA16Config(*want)
    m, n, k, group = tiny_shape(c)
    gen = torch.Generator().manual_seed(sum(want[1:5]))
    for bits, dtype, zp in ((4, torch.bfloat16, True), (8, torch.float16, False)):
        w = make(n, k, bits, group, zp, zp, gen)
        bias = torch.randn(n, generator=gen).to(dtype).to(DEV) if zp else None
        x = torch.randn(m, k, generator=gen).to(dtype).to(DEV)
        y = wna16_gemm(x, w, bias, config=c, gpu_dequant=True)
        check(y, x, w, bias, c.kind)
        if c.split_k > 1:  # split order is fixed (same bits again) and the arrival counters are re-armed
            assert not tiles.split_counters(DEV, 1).any()
            assert torch.equal(wna16_gemm(x, w, bias, config=c, gpu_dequant=True), y)


def test_a_forced_configuration_is_refused_where_it_cannot_run():
    gen = torch.Generator().manual_seed(4)
    w = make(64, 128, 4, 32, False, False, gen)
    x = torch.randn(2, 128, generator=gen).half().to(DEV)
    with pytest.raises(ValueError, match="gemv config takes one row"):
        wna16_gemm(x, w, config=WNA16Config("gemv", 1, 64, 32, 1, 4, 1))
    with pytest.raises(ValueError, match="BK=64 must divide K=128 and the group size 32"):
        wna16_gemm(x, w, config=WNA16Config("mm", 16, 64, 64, 1, 4, 1))
