"""The 8-bit weight-only GEMM's GPU launch heuristic: a plain function of the shape, the
scale layout and the SM count, checked against configurations worked out by hand from
its rules; each configuration it picks is then forced (`config=`) at a tiny shape, under
the interpreter on the CPU and for real on CUDA, against float64.

Unlike wna16 there is no GPU-only dequantization to force here: the GPU path's only
difference is that the dot takes the weight cast to the activation dtype (exact for int8,
q - zero in [-255, 255] and every e4m3 value) where the interpreter, whose bf16 dot and
int -> bf16 casts are wrong, takes both in fp32: the same products."""

from __future__ import annotations

import pytest
import torch

from mixq.kernels import tiles, w8a16, wna16
from mixq.kernels.w8a16 import w8a16_gemm, w8a16_reference

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
H100_SMS = 132
FP8 = torch.float8_e4m3fn
pytestmark = pytest.mark.skipif(wna16.triton is None, reason="triton not installed")

# The rules (launch_config's docstring), at 132 SMs: one row -> GEMV with BN the widest of
# 32, 16 giving >= 264 column programs (else 8), BK = 8192 / BN, split-K only when the
# column programs are fewer than the SMs (ceil(264 / programs) splits, at most one per K
# tile); 2-16 rows: 16 x 64 x 128 swapped; 17-64: 64 x 128 x 128 swapped, both with
# ceil(528 / tiles) splits; 65-256: 64 x 128 x 64 plain; more: 128 x 128 x 64 swapped, 8
# warps, unsplit. A K tile stays inside a scale block (BK <= SBK) unless a GEMV tile's
# rows share one block row (then the scales multiply x). Splits are then evened out so
# none is empty: ceil(k_tiles / ceil(k_tiles / split)).
HEURISTIC = [
    # (m, n, k, sbn, sbk) -> (BM, BN, BK, SPLIT, warps, stages, SWAP)
    ((1, 4096, 4096, 0, 0), (1, 8, 1024, 1, 4, 3, False)),  # 256 16-wide programs < 264: BN 8
    ((1, 14336, 4096, 0, 0), (1, 32, 256, 1, 4, 3, False)),  # 448 32-wide programs
    ((1, 5120, 4096, 0, 0), (1, 16, 512, 1, 4, 3, False)),  # 160 32-wide, 320 16-wide
    ((1, 512, 4096, 0, 0), (1, 8, 1024, 4, 4, 3, False)),  # 64 programs: ceil(264 / 64) = 5, 4 K tiles
    ((1, 640, 5120, 0, 0), (1, 8, 1024, 3, 4, 3, False)),  # 80 programs: 4 splits of 5 tiles -> 3 (2+2+1)
    ((1, 4096, 4096, 128, 128), (1, 8, 1024, 1, 4, 3, False)),  # block FP8: 8 rows share a block row
    ((1, 4096, 4096, 1, 128), (1, 8, 128, 1, 4, 3, False)),  # groups of 128 along K: BK 128
    ((8, 4096, 4096, 0, 0), (16, 64, 128, 8, 4, 4, True)),  # 64 tiles: 9 splits of 32 tiles -> 8
    ((16, 4096, 4096, 128, 64), (16, 64, 64, 8, 4, 4, True)),  # BK <= SBK 64; 9 of 64 -> 8
    ((64, 4096, 4096, 0, 0), (64, 128, 128, 16, 4, 4, True)),  # 32 tiles: 17 splits of 32 -> 16
    ((200, 4096, 4096, 0, 0), (64, 128, 64, 1, 4, 4, False)),
    ((257, 4096, 4096, 128, 128), (128, 128, 64, 1, 8, 3, True)),
]


@pytest.mark.parametrize("shape,want", HEURISTIC, ids=["-".join(map(str, s)) for s, _ in HEURISTIC])
def test_gpu_heuristic_picks_the_configuration_its_rules_give(shape, want):
    assert w8a16.launch_config(*shape, H100_SMS) == want


def test_gpu_heuristic_configurations_are_launchable_everywhere():
    """Over model shapes, scale layouts and SM counts: no empty split, at most one split per
    K tile, a K tile inside a scale block unless a GEMV tile's rows share one."""
    for sms in (1, 78, 132, 170):
        for m in (1, 2, 16, 17, 64, 65, 256, 257, 4096):
            for n, k in ((512, 2048), (2048, 8192), (4096, 14336), (28672, 4096), (151936, 896)):
                for sbn, sbk in ((0, 0), (128, 128), (1, 128), (1, 32)):
                    bm, bn, bk, split, *_ = w8a16.launch_config(m, n, k, sbn, sbk, sms)
                    k_tiles = -(-k // bk)
                    assert 1 <= split <= k_tiles and (split - 1) * -(-k_tiles // split) < k_tiles, (m, n, k, split)
                    assert (bm == 1) == (m == 1)
                    if sbk and not (bm == 1 and sbn % bn == 0):
                        assert sbk % bk == 0, (m, n, k, sbn, sbk, bk)


def scales_for(n, k, sbn, sbk, gen):
    """Per-channel fp32 scales, or a (SBN, SBK) grid; weights of ~0.02 like a real layer."""
    shape = (n,) if not sbk else (-(-n // sbn), -(-k // sbk))
    return ((torch.rand(shape, generator=gen) + 0.5) * 0.02 / 100).to(DEV)


@pytest.mark.parametrize("shape,want", HEURISTIC, ids=["-".join(map(str, s)) for s, _ in HEURISTIC])
def test_each_heuristic_configuration_runs_at_a_tiny_shape(shape, want):
    """Each configuration, forced at a shape that keeps its split count (one K tile per
    split; two when unsplit), a ragged second column and row tile, and its scale layout:
    int8 with zero points and bf16 activations, e4m3 with fp16 activations and a bias.
    Inputs are exact in the kernel (8-bit values in bf16/fp16), sums are fp32: the error
    left is the output's rounding (half an ulp: 2**-8 bf16, 2**-11 fp16; a whole bf16 ulp
    under the interpreter, which truncates) plus K * 2**-24 of sum |x w|."""
    m, _, _, sbn, sbk = shape
    bm, bn, bk, split, *_ = want
    k = split * bk if split > 1 else 2 * bk
    n, m = bn + (4 if bn <= 16 else 24), 1 if bm == 1 else min(bm + 5, 70)
    block = (sbn, sbk) if sbk else None
    gen = torch.Generator().manual_seed(sum(shape))
    for wdt, dtype in ((torch.int8, torch.bfloat16), (FP8, torch.float16)):
        if wdt == torch.int8:
            w = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8).to(DEV)
            zero = torch.randint(-30, 30, (n,), generator=gen, dtype=torch.int32).to(DEV) if block is None else None
            bias = None
        else:
            w = (torch.randn(n, k, generator=gen) * 64).clamp(-448, 448).to(FP8).to(DEV)
            zero, bias = None, torch.randn(n, generator=gen).to(dtype).to(DEV)
        s = scales_for(n, k, sbn, sbk, gen)
        x = torch.randn(m, k, generator=gen).to(dtype).to(DEV)
        y = w8a16_gemm(x, w, s, zero, bias, block, config=want)
        ref = w8a16_reference(x, w, s, zero, bias, block)
        q = w.double() - (0 if zero is None else zero.double()[:, None])
        magnitude = w8a16_reference(x.abs(), q.abs(), s, None, None, block)  # sum_k |x (q - z)| s
        out_eps = {torch.bfloat16: 2**-8 if CUDA else 2**-7, torch.float16: 2**-11}[dtype]
        err = (y.double() - ref).abs()
        bound = out_eps * ref.abs() + k * 2**-24 * magnitude
        assert y.dtype == dtype and bool((err <= bound).all()), (wdt, float((err / bound).max()))
        if split > 1:  # the tiles' last splits re-armed their counters; the split order is fixed
            assert not tiles.split_counters(DEV, 1).any()
            assert torch.equal(w8a16_gemm(x, w, s, zero, bias, block, config=want), y)
