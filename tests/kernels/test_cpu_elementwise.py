"""The CPU's C RMSNorm and rotary (mixq/kernels/cpu_elementwise.py) against the torch code
they replace, written out here with its rounding points, and against float64."""

from __future__ import annotations

import pytest
import torch

from mixq.kernels import cpu_elementwise as ce
from mixq.layers.norm import RMSNorm
from mixq.layers.rotary import RotaryEmbedding

pytestmark = pytest.mark.skipif(not ce.available()[0], reason="no C compiler for the CPU kernels")


def torch_norm(x, residual, weight, eps):
    """mixq.layers.norm's torch code: the sum rounded to the dtype, the normalized row too."""
    if residual is not None:
        x = x + residual
        residual = x
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype), residual


def ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| in units in the last place of bf16 (same-sign values: difference of the bit patterns)."""
    return (a.view(torch.int16).int() - b.view(torch.int16).int()).abs()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,n", [(1, 576), (5, 100), (70, 64)])  # 70 rows: the OpenMP loop
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_against_torch_and_float64(dtype, rows, n, with_residual):
    gen = torch.Generator().manual_seed(rows * n + with_residual)
    x = (torch.randn(rows, n, generator=gen) * 3).to(dtype)
    r = torch.randn(rows, n, generator=gen).to(dtype) if with_residual else None
    w = (1 + 0.5 * torch.randn(n, generator=gen)).to(dtype)
    eps = 1e-5
    assert ce.takes_norm(x, r, w)
    out, new_res = ce.add_rms_norm(x, r, w, eps)
    ref_out, ref_res = torch_norm(x, r, w, eps)
    assert out.dtype == dtype and out.shape == x.shape
    if with_residual:
        assert torch.equal(new_res, ref_res)  # one rounding of an exact sum: identical
    else:
        assert new_res is None
    if dtype == torch.float32:  # the mean of squares summed in another order: fp32 rounding
        assert torch.allclose(out, ref_out, rtol=1e-6, atol=1e-6)
    else:  # the normalized value rounds to bf16 twice: one ulp where the fp32 sums straddle a tie
        d = ulps(out, ref_out)
        assert int(d.max()) <= 1 and float((d > 0).float().mean()) < 0.02
    s = x.double() + (r.double() if with_residual else 0)
    s = s if dtype == torch.float32 else s.to(dtype).double()
    exact = w.double() * s / (s.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    # bf16: the normalized value and the product each round to 2**-9 relative
    tol = 1e-6 if dtype == torch.float32 else 2 * 2**-8
    assert float(((out.double() - exact).abs() / exact.abs().clamp(min=1e-3)).max()) < tol


def test_rms_norm_module_takes_the_c_call_for_3d_rows():
    gen = torch.Generator().manual_seed(3)
    norm = RMSNorm(64, 1e-6)
    norm.weight.data = (torch.rand(64, generator=gen) + 0.5).bfloat16()
    x = torch.randn(2, 3, 64, generator=gen).bfloat16()
    res = torch.randn(2, 3, 64, generator=gen).bfloat16()
    out, new_res = norm(x, res)
    ref_out, ref_res = torch_norm(x, res, norm.weight, 1e-6)
    assert out.shape == x.shape and torch.equal(new_res, ref_res)
    assert int(ulps(out, ref_out).max()) <= 1
    # 2-d rows with a row stride past their length (a column slice of a merged output)
    wide = torch.randn(4, 3 * 64, generator=gen).bfloat16()
    rows = wide[:, 64:128]
    assert ce.takes_norm(rows, None, norm.weight)
    out = norm(rows)
    assert out.is_contiguous() and int(ulps(out, torch_norm(rows, None, norm.weight, 1e-6)[0]).max()) <= 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t", [7, 70])  # 70 tokens: the OpenMP loop
def test_rotary_is_bit_identical_to_the_torch_code(dtype, t):
    """q and k as views of one merged q/k/v output (token stride > H * D), positions out of
    order: the C call and mixq.layers.rotary's torch code agree to the bit."""
    gen = torch.Generator().manual_seed(4 + t)
    h, hk, d = 9, 3, 64
    rope = RotaryEmbedding(d, 4096, {"rope_theta": 10000.0})
    qkv = torch.randn(t, (h + 2 * hk) * d, generator=gen).to(dtype)
    q, k, _ = qkv.split([h * d, hk * d, hk * d], dim=-1)
    q, k = q.view(t, h, d), k.view(t, hk, d)
    pos = torch.cat([torch.tensor([0, 5, 4095, 17, 3, 1000, 2]), torch.randint(0, 4096, (t - 7,), generator=gen)])
    assert ce.takes_rotary(q, k, rope.cos, rope.sin, pos)
    qo, ko = ce.rotary_neox(pos, q, k, rope.cos, rope.sin)

    def torch_rotate(x):
        c, s = rope.cos[pos].unsqueeze(1), rope.sin[pos].unsqueeze(1)
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)

    assert torch.equal(qo, torch_rotate(q)) and torch.equal(ko, torch_rotate(k))
    # and the rotation itself, in float64 from the angles
    inv = 1.0 / 10000.0 ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = pos.double()[:, None] * inv
    c, s = ang.cos()[:, None], ang.sin()[:, None]
    x1, x2 = q.double().chunk(2, dim=-1)
    exact = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
    tol = 1e-5 if dtype == torch.float32 else 2**-7
    assert float((qo.double() - exact).abs().max() / exact.abs().max()) < tol


def test_rotary_names_a_position_outside_the_tables():
    rope = RotaryEmbedding(16, 32, {"rope_theta": 10000.0})
    q, k = torch.randn(2, 2, 16), torch.randn(2, 1, 16)
    with pytest.raises(IndexError, match="position 32 of token 1 is outside the 32-position tables"):
        ce.rotary_neox(torch.tensor([3, 32]), q, k, rope.cos, rope.sin)


def test_other_dtypes_and_layouts_take_the_torch_code():
    w = torch.ones(8)
    assert not ce.takes_norm(torch.randn(2, 8).half(), None, w.half())  # fp16
    assert not ce.takes_norm(torch.randn(2, 8).bfloat16(), None, w)  # bf16 x, fp32 weight
    assert not ce.takes_norm(torch.randn(8, 2).t(), None, w)  # column stride 8
    rope = RotaryEmbedding(16, 32, {"rope_theta": 10000.0})
    q, k = torch.randn(2, 2, 16), torch.randn(2, 1, 16)
    assert ce.takes_rotary(q, k, rope.cos, rope.sin, torch.tensor([0, 1]))
    assert not ce.takes_rotary(q, k, rope.cos, rope.sin, torch.tensor([0, 1], dtype=torch.int32))
    assert not ce.takes_rotary(q.half(), k.half(), rope.cos, rope.sin, torch.tensor([0, 1]))
    assert not ce.takes_rotary(q.transpose(0, 1), k, rope.cos, rope.sin, torch.tensor([0, 1]))
