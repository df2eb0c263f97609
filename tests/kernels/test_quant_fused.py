"""Producers with the FP8 per-token quantization fused in: bit for bit what the unfused
producer followed by `quant_fp8` gives under the interpreter (CPU); compiled on CUDA the two
kernels sum a row's squares in different orders, so there a scale may move by a bf16 ulp
and a code by an e4m3 step. Both close to a float64 reference of the producer."""

from __future__ import annotations

import pytest
import torch

from mixq.kernels import elementwise as ew
from mixq.kernels.quant import quant_fp8
from mixq.kernels.quant_fused import add_rms_norm_fp8, fp8_act_reference, silu_and_mul_fp8

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
pytestmark = pytest.mark.skipif(ew.triton is None, reason="triton not installed")


def _same(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a.view(torch.uint8) if a.dtype == torch.float8_e4m3fn else a,
                       b.view(torch.uint8) if b.dtype == torch.float8_e4m3fn else b)


def _same_quant(q, s, q2, s2):
    """(codes, scales) equal; on CUDA equal up to the producers' own rounding: scales within
    a bf16 ulp of the row's amax (2**-7), each value within one e4m3 step (2**-3 of its size,
    or the subnormal step 2**-9 of the scale), and few codes moved."""
    if not CUDA:
        _same(q, q2)
        _same(s, s2)
        return
    assert q.dtype == q2.dtype and q.shape == q2.shape and s.shape == s2.shape
    assert float((s.float() / s2.float() - 1).abs().max()) <= 2**-7
    a, b = q.float() * s.float(), q2.float() * s2.float()
    assert bool(((a - b).abs() <= 2**-3 * torch.maximum(a.abs(), b.abs()) + 2**-9 * s2.float()).all())
    assert float((q.view(torch.uint8) != q2.view(torch.uint8)).float().mean()) < 0.25


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,n,res", [(1, 64, True), (5, 200, True), (3, 96, False)])
def test_add_rms_norm_fp8_equals_norm_then_quant(dtype, rows, n, res):
    g = torch.Generator().manual_seed(rows * n + res)
    x = (torch.randn(rows, n, generator=g) * 3).to(dtype).to(DEV)
    r = torch.randn(rows, n, generator=g).to(dtype).to(DEV) if res else None
    w = (torch.rand(n, generator=g) + 0.5).to(dtype).to(DEV)
    x[0, 3] = 0  # a zero and a large value in the row
    x[-1, 1] = 40
    q, s, rout = add_rms_norm_fp8(x, r, w, 1e-6)
    normed, rout2 = ew.add_rms_norm(x, r, w, 1e-6)
    q2, s2 = quant_fp8(normed)
    _same_quant(q, s, q2, s2)
    _same(rout, rout2)
    # and against float64: the fp8 codes times the scale within e4m3's half-ulp (2**-4
    # relative) plus the bf16/fp16 rounding of the normed value
    xs = x.double() + (r.double() if res else 0)
    want = w.double() * xs * torch.rsqrt(xs.pow(2).mean(-1, keepdim=True) + 1e-6)
    got = q.double() * s.double()
    assert float(((got - want).abs() / want.abs().amax(-1, keepdim=True)).max()) < 2 ** -4 + 2 ** -7
    # and the torch twin of the quantization on the producer's output
    qr, sr = fp8_act_reference(normed)
    _same_quant(q, s, qr.to(DEV), sr.to(DEV))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,n", [(1, 64), (4, 300)])
def test_silu_and_mul_fp8_equals_silu_then_quant(dtype, rows, n):
    g = torch.Generator().manual_seed(rows + n)
    gu = (torch.randn(rows, 2 * n, generator=g) * 2).to(dtype).to(DEV)
    gate, up = gu[:, :n], gu[:, n:]  # strided rows, as a merged gate/up GEMM hands them over
    q, s = silu_and_mul_fp8(gate, up)
    q2, s2 = quant_fp8(ew.silu_and_mul(gate, up))
    _same_quant(q, s, q2, s2)
    want = torch.nn.functional.silu(gate.double()) * up.double()
    got = q.double() * s.double()
    assert float(((got - want).abs() / want.abs().amax(-1, keepdim=True)).max()) < 2 ** -4 + 2 ** -6
