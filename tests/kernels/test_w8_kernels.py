"""Activation quantization, 8-bit weight-only GEMM and 8-bit x 8-bit GEMM against plain-torch
references (interpreter on CPU, compiled on CUDA). Inputs are fresh random every case."""

from __future__ import annotations

import pytest
import torch

from mixq.kernels import wna16
from mixq.kernels.quant import quant_fp8, quant_int8, quant_reference
from mixq.kernels.w8a8 import scaled_mm_ok, scaled_mm_rowwise, w8a8_gemm, w8a8_reference
from mixq.kernels.w8a16 import w8a16_gemm, w8a16_reference

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
MS = (1, 2, 3, 7, 16, 33, 100, 257) if CUDA else (1, 3, 17)
# (N, K, scale block): N and K not powers of two, blocks partial in both dims; on the GPU
# also an aligned shape (the fast, vectorized specialization). Few shapes: each distinct
# alignment of N/K compiles every kernel variant again.
SHAPES = [(200, 328, (128, 128)), (256, 512, (128, 128))] if CUDA else [(48, 200, (32, 64))]
FP8 = torch.float8_e4m3fn
pytestmark = pytest.mark.skipif(wna16.triton is None, reason="triton not installed")


def rand_x(m, k, dtype, gen):
    """Rows of different magnitudes (per-token scales matter), one all-zero row."""
    x = torch.randn(m, k, generator=gen) * torch.exp(torch.randn(m, 1, generator=gen))
    if m > 2:
        x[1] = 0
    return x.to(dtype).to(DEV)


def rand_w(n, k, wdt, gen):
    if wdt == torch.int8:
        return torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8).to(DEV)
    return (torch.randn(n, k, generator=gen) * 64).clamp(-448, 448).to(FP8).to(DEV)


def rand_scale(n, k, block, wdt, gen):
    amp = 0.02 / 127 if wdt == torch.int8 else 0.02 / 64  # weights of ~0.02, like a real layer
    shape = (n,) if block is None else (-(-n // block[0]), -(-k // block[1]))
    return ((torch.rand(shape, generator=gen) + 0.5) * amp).to(DEV)


def rel_err(y, ref):
    return float((y.double() - ref).norm() / ref.norm())


# Output rounding bounds the error of an exact-input kernel: bf16 keeps 8 bits (relative
# rounding <= 2**-9 on the GPU; the interpreter truncates its bf16 stores, <= 2**-8), fp16 11.
OUT_TOL = {torch.bfloat16: 5e-3, torch.float16: 7e-4}


def ulps_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in fp8 codes (same sign: e4m3 codes are ordered like their magnitudes)."""
    ai, bi = a.view(torch.uint8).int(), b.view(torch.uint8).int()
    mag = lambda v: torch.where(v >= 128, -(v - 128), v)  # noqa: E731
    return (mag(ai) - mag(bi)).abs()


@pytest.mark.parametrize("kind", ["fp8-token", "fp8-static", "fp8-group", "int8-token", "int8-static"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_quant_matches_reference(kind, dtype):
    gen = torch.Generator().manual_seed(sum(map(ord, kind)) + (dtype == torch.float16))
    to_int8, group = kind.startswith("int8"), 128 if CUDA else 64
    for m in MS:
        for k in ((200, 4100) if CUDA else (200,)):
            x = rand_x(m, k, dtype, gen)
            static = (x.float().abs().amax() / (600.0 if not to_int8 else 200.0)).reshape(1) if "static" in kind \
                else None  # some values saturate
            args = {"group": group} if kind == "fp8-group" else {"static_scale": static}
            q, s = (quant_int8(x, static) if to_int8 else quant_fp8(x, **args))
            qr, sr = quant_reference(x, to_int8=to_int8, **args)
            assert q.dtype == qr.dtype and q.shape == (m, k) and s.shape == sr.shape
            # amax / qmax: IEEE division in the kernel; torch's CUDA division by a scalar
            # multiplies by the reciprocal, so the two may differ by one ulp
            torch.testing.assert_close(s, sr, rtol=2.4e-7, atol=0, msg=kind)
            # Codes, given the kernel's own scales (a one-ulp scale difference moves ~0.2% of
            # codes across a rounding boundary): the same IEEE division and
            # round-to-nearest-even (fp8) / half-away (int8) as torch; allow one code apart
            # in at most 0.1% of elements (a conversion rounding the other way on a tie).
            xs = s.repeat_interleave(group, 1)[:, :k] if kind == "fp8-group" else s
            y = (x.float() / xs).clamp(-(127.0 if to_int8 else 448.0), 127.0 if to_int8 else 448.0)
            qr = (torch.sign(y) * torch.floor(y.abs() + 0.5)).to(torch.int8) if to_int8 else y.to(qr.dtype)
            d = (q.int() - qr.int()).abs() if to_int8 else ulps_apart(q, qr)
            assert int(d.max()) <= 1 and float((d > 0).float().mean()) <= 1e-3, kind
            # and independently: q * s reconstructs x to the format's resolution
            back, xf = q.float() * xs, x.float()
            lim = xs * (127 if to_int8 else 448)
            inside = xf.abs() <= lim
            bound = xs * 0.5 + 1e-30 if to_int8 else xf.abs() * 2.0**-4 + xs * 2.0**-10  # half step / half ulp
            assert bool(((back - xf).abs() <= bound * 1.0001)[inside].all()), kind
            assert torch.equal(back[~inside].abs(), lim.expand_as(xf)[~inside]), kind  # saturated


def test_quant_refuses_bad_arguments():
    x = torch.randn(4, 64).to(DEV)
    with pytest.raises(ValueError, match="power of two"):
        quant_fp8(x, group=48)
    with pytest.raises(ValueError, match="cannot be combined"):
        quant_fp8(x, group=64, static_scale=torch.ones(1, device=DEV))
    with pytest.raises(ValueError, match="2-D"):
        quant_int8(x[None])


W8A16_CASES = [(FP8, "channel", False), (FP8, "block", False), (FP8, "group", False), (torch.int8, "channel", False),
               (torch.int8, "channel", True), (torch.int8, "group", True)]


def _block(kind, block):
    return {"channel": None, "block": block, "group": (1, 32 if not CUDA else 128)}[kind]


@pytest.mark.parametrize("wdt,kind,zp,dtype", [(*c, torch.bfloat16) for c in W8A16_CASES] +
                         [(*c, torch.float16) for c in W8A16_CASES[1::3]])
def test_w8a16_matches_float64_reference(wdt, kind, zp, dtype):
    gen = torch.Generator().manual_seed(len(kind) * 13 + zp * 3 + (wdt == FP8) + 7 * (dtype == torch.float16))
    for n, k, block in SHAPES:
        blk = _block(kind, block)
        w, s = rand_w(n, k, wdt, gen), rand_scale(n, k, blk, wdt, gen)
        z = torch.randint(-30, 30, (n,), generator=gen, dtype=torch.int32).to(DEV) if zp else None
        bias = torch.randn(n, generator=gen).to(dtype).to(DEV) * 0.1
        for m in MS:
            x = rand_x(m, k, dtype, gen)
            y = w8a16_gemm(x, w, s, z, bias, blk)
            assert y.dtype == dtype and y.shape == (m, n) and not y.isnan().any()
            # weight and activation enter exactly (8-bit values are exact in bf16/fp16), fp32
            # accumulation: what is left is the output rounding
            assert rel_err(y, w8a16_reference(x, w, s, z, bias, blk)) < OUT_TOL[dtype], (m, n, k)


@pytest.mark.parametrize("m,bm", [(1, 1), (5, 16), (40, 64)])
def test_w8a16_split_k_is_summed_by_the_last_split(m, bm, monkeypatch):
    """Forced 3-way split-K (a ragged last split) on the GEMV and the tiles: small tiles'
    last split sums the partials in the kernel, a 64-row tile's are summed after it; equal
    to the unsplit result up to fp32 sum order, the same bits on a second call, and the
    arrival counters back at zero."""
    from mixq.kernels import tiles, w8a16

    gen = torch.Generator().manual_seed(m)
    n, k = 80, 320
    w, s = rand_w(n, k, torch.int8, gen), rand_scale(n, k, None, torch.int8, gen)
    x = rand_x(m, k, torch.float16, gen)
    bias = torch.randn(n, generator=gen).half().to(DEV)
    monkeypatch.setattr(w8a16, "CONFIG_OVERRIDE", (bm, 32, 64, 1, 4, 1, True))
    whole = w8a16_gemm(x, w, s, None, bias)
    monkeypatch.setattr(w8a16, "CONFIG_OVERRIDE", (bm, 32, 64, 3, 4, 1, True))
    y = w8a16_gemm(x, w, s, None, bias)
    assert rel_err(y, w8a16_reference(x, w, s, None, bias)) < OUT_TOL[torch.float16]
    assert (y.float() - whole.float()).abs().max() <= 2e-3 * whole.float().abs().max()  # fp16 output rounding
    assert not tiles.split_counters(x.device, 1).any()
    assert torch.equal(w8a16_gemm(x, w, s, None, bias), y)


# act_group -1: the weight's K block (block-scaled FP8's 1x128 groups); 0: per token
W8A8_CASES = [(FP8, "channel", 0, False), (FP8, "block", -1, False), (FP8, "block", 0, False), (FP8, "group", -1, False),
              (FP8, "channel", 64, False), (torch.int8, "channel", 0, False), (torch.int8, "channel", 0, True),
              (torch.int8, "group", 0, False)]


@pytest.mark.parametrize("wdt,kind,act_group,zp,dtype", [(*c, torch.bfloat16) for c in W8A8_CASES] +
                         [(*c, torch.float16) for c in W8A8_CASES[1::3]])
def test_w8a8_matches_reference_on_the_same_quantized_inputs(wdt, kind, act_group, zp, dtype):
    gen = torch.Generator().manual_seed(len(kind) * 11 + zp * 5 + act_group + (dtype == torch.float16))
    to_int8 = wdt == torch.int8
    for n, k, block in SHAPES:
        blk = _block(kind, block)
        group = blk[1] if act_group == -1 else act_group
        w, s = rand_w(n, k, wdt, gen), rand_scale(n, k, blk, wdt, gen)
        z = torch.randint(-30, 30, (n,), generator=gen, dtype=torch.int32).to(DEV) if zp else None
        bias = torch.randn(n, generator=gen).to(dtype).to(DEV) * 0.1
        for m in MS:
            x = rand_x(m, k, dtype, gen)
            a, sa = quant_reference(x, group=group, to_int8=to_int8)
            y = w8a8_gemm(a, sa, w, s, z, bias, group, blk, dtype)
            assert y.dtype == dtype and y.shape == (m, n) and not y.isnan().any()
            # same quantized operands as the reference: exact products, fp32 sums (fp8 ones
            # promoted every K tile), output rounding
            assert rel_err(y, w8a8_reference(a, sa, w, s, z, bias, group, blk)) < OUT_TOL[dtype], (m, n, k)
            # against the unquantized activation: e4m3 keeps 3 mantissa bits (relative
            # rounding <= 2**-4, rms ~2**-4/sqrt(3) ~ 3.6%; products of random signs average
            # it down), int8 per token a step of amax/127 (~1%)
            exact = w8a16_reference(x, w, s, z, bias, blk)
            assert rel_err(y, exact) < (0.02 if to_int8 else 0.05), (m, n, k)


def test_scaled_mm_path_matches_reference():
    """The cuBLAS FP8 path (scaled_mm_rowwise: operand layout, scale shapes, bias cast).
    The engine takes it on CUDA only (scaled_mm_ok refuses the CPU, which runs the Triton
    w8a8 kernel); the wrapper itself runs on the CPU too, on torch's CPU _scaled_mm."""
    gen = torch.Generator().manual_seed(5)
    for n, k in ((256, 512), (4096, 1024)):
        w, s = rand_w(n, k, FP8, gen), rand_scale(n, k, None, FP8, gen)
        bias = torch.randn(n, generator=gen).bfloat16().to(DEV)
        for m in MS:
            x = rand_x(m, k, torch.bfloat16, gen)
            a, sa = quant_fp8(x)
            assert scaled_mm_ok(m, n, k, torch.bfloat16, DEV) == CUDA
            y = scaled_mm_rowwise(a, sa, w, s, bias)
            assert rel_err(y, w8a8_reference(a, sa, w, s, None, bias)) < OUT_TOL[torch.bfloat16]


def test_ops_trace_with_their_fake_implementations():
    """opcheck: the fake (meta) impl agrees with the real one; dynamic-shape AOT tracing.
    (Its schema check compares fp8 outputs with ops torch lacks for fp8 on the CPU.)"""
    utils = ("test_faketensor", "test_aot_dispatch_dynamic")
    gen = torch.Generator().manual_seed(9)
    x = rand_x(3, 96, torch.bfloat16, gen)
    w, s = rand_w(40, 96, FP8, gen), rand_scale(40, 96, None, FP8, gen)
    sg = rand_scale(40, 96, (32, 32), FP8, gen)
    torch.library.opcheck(torch.ops.mixq.quant_act.default, (x, 0, None, False), test_utils=utils)
    torch.library.opcheck(torch.ops.mixq.quant_act.default, (x, 32, None, False), test_utils=utils)
    torch.library.opcheck(torch.ops.mixq.w8a16_gemm.default, (x, w, s, None, None, 0, 0), test_utils=utils)
    a, sa = quant_reference(x, group=32)
    torch.library.opcheck(torch.ops.mixq.w8a8_gemm.default, (a, sa, w, sg, None, None, 32, 32, 32, torch.bfloat16),
                             test_utils=utils)


def test_invalid_inputs_are_refused():
    gen = torch.Generator().manual_seed(3)
    w, s = rand_w(40, 96, FP8, gen), rand_scale(40, 96, None, FP8, gen)
    x = rand_x(2, 96, torch.bfloat16, gen)
    with pytest.raises(ValueError, match=r"x must be \[M, 96\]"):
        w8a16_gemm(x[:, :64], w, s)
    with pytest.raises(ValueError, match="per-channel scale must be fp32"):
        w8a16_gemm(x, w, s[:20])
    with pytest.raises(ValueError, match="power of two >= 32"):
        w8a16_gemm(x, w, rand_scale(40, 96, (16, 16), FP8, gen), block=(16, 16))
    with pytest.raises(ValueError, match="zero must be int32"):
        w8a16_gemm(x, w, s, torch.zeros(40, dtype=torch.int32, device=DEV))
    a, sa = quant_reference(x)
    with pytest.raises(ValueError, match="both be float8_e4m3fn or int8"):
        w8a8_gemm(a, sa, w.view(torch.int8), s)
    with pytest.raises(ValueError, match=r"sa must be fp32 \[2, 3\]"):
        w8a8_gemm(a, sa, w, rand_scale(40, 96, (32, 32), FP8, gen), act_group=32, block=(32, 32))
    with pytest.raises(ValueError, match="per-group activation scales are FP8 only"):
        ai, sai = quant_reference(x, to_int8=True)
        w8a8_gemm(ai, torch.ones(2, 3, device=DEV), w.view(torch.int8), s, act_group=32)
