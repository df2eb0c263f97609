"""FP8 KV cache (--kv-cache-dtype fp8_e4m3|fp8_e5m2) in the kernels: the store kernel
against torch's saturating cast of x / scale, and the decode and extend attention kernels
reading fp8 caches with per-tensor scales against a float64 reference over the same fp8
values. Under the Triton interpreter on the CPU and for real on CUDA.

The fp8 -> float conversion is exact, so attention over an fp8 cache has the error budget
of the query dtype alone (the reference dequantizes the same fp8 values in float64)."""

from __future__ import annotations

import pytest
import torch

from mixq.kernels import elementwise as ew
from mixq.kernels import extend_attention as ea
from mixq.kernels import paged_attention as pa
from mixq.kernels.kv_quant import fp8_max, quantize_kv
from tests.kernels.test_extend_attention import build, mixed_batch
from tests.kernels.test_paged_attention import make_cache

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
pytestmark = pytest.mark.skipif(pa.triton is None, reason="triton not installed")
FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]
QDTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # the query dtype's budget
SCALES = (0.37, 2.5)  # k_scale, v_scale: any positive numbers; 1.0 would hide a missing factor


def fp8_cache(k: torch.Tensor, v: torch.Tensor, kv_dtype: torch.dtype):
    """Random caches as the store path leaves them: quantized x / scale (values ~N(0, 3))."""
    return quantize_kv(3 * k.float(), SCALES[0], kv_dtype), quantize_kv(3 * v.float(), SCALES[1], kv_dtype)


@pytest.mark.parametrize("kv_dtype", FP8, ids=str)
@pytest.mark.parametrize("qdtype", QDTYPES, ids=str)
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_reads_fp8_with_scales(kv_dtype, qdtype, num_splits):
    gen = torch.Generator().manual_seed(7 + num_splits)
    h, hkv, d, page = 8, 2, 64, 16
    ctx = [1, 17, 64, 200, 5]
    k, v, tables = make_cache(gen, ctx, page, hkv, d, torch.float32)
    k, v = fp8_cache(k, v, kv_dtype)
    q = torch.randn(len(ctx), h, d, generator=gen).to(qdtype)
    lens = torch.tensor(ctx, dtype=torch.int32)
    ref = pa.paged_decode_reference(q, k, v, tables, lens, d**-0.5, *SCALES)
    out = pa.paged_decode_attention(*(t.to(DEV) for t in (q, k, v, tables, lens)), d**-0.5, num_splits=num_splits,
                                    k_scale=SCALES[0], v_scale=SCALES[1])
    assert out.dtype == qdtype
    row_err = (out.double().cpu() - ref).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1)
    assert row_err.max() < 4 * TOL[qdtype], row_err.tolist()
    assert (out.double().cpu() - ref).norm() / ref.norm() < TOL[qdtype]


@pytest.mark.parametrize("kv_dtype", FP8, ids=str)
@pytest.mark.parametrize("qdtype", QDTYPES, ids=str)
def test_extend_reads_fp8_with_scales(kv_dtype, qdtype):
    h, hkv, d, page = 8, 2, 32, 16
    bm = ea.extend_config(h // hkv, d, DEV).block_m
    seqs = mixed_batch(bm // (h // hkv))
    q, k, v, tables, qs, ctx = build(seqs, h, hkv, d, page, torch.float32, seed=11)
    k, v = fp8_cache(k, v, kv_dtype)
    q = q.to(qdtype)
    qs_t, ctx_t = torch.tensor(qs), torch.tensor(ctx, dtype=torch.int32)
    ref = ea.paged_extend_reference(q, k, v, tables, qs_t, ctx_t, d**-0.5, *SCALES)
    out = ea.paged_extend_attention(*(t.to(DEV) for t in (q, k, v, tables, qs_t, ctx_t)), d**-0.5,
                                    k_scale=SCALES[0], v_scale=SCALES[1])
    assert out.dtype == qdtype
    out = out.double().cpu()
    row_err = (out - ref).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1)
    assert row_err.max() < 4 * TOL[qdtype], row_err.argmax()
    assert (out - ref).norm() / ref.norm() < TOL[qdtype]


def interpreter_rounding(got: torch.Tensor, want: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Where the Triton interpreter's fp32 -> fp8 cast is known to differ from round to
    nearest even: it may round toward zero (`got` is the fp8 value just below `want` in
    magnitude), and where x rounds up to a power of two (the mantissa carries into the
    exponent) it drops the carry, giving half the value. The GPU's cast
    (cvt.rn.satfinite) rounds correctly: on CUDA the test demands exact equality."""
    w = want.float().abs()
    below = (want.view(torch.uint8) - 1).view(want.dtype).float()  # sign-magnitude: one step toward 0
    truncated = (w > 0) & (x.abs() < w) & (got.float() == below)
    pow2 = (w > 0) & (torch.frexp(w).mantissa == 0.5)
    carry_dropped = pow2 & (x.abs() < w) & (got.float() == want.float() / 2)
    return truncated | carry_dropped


@pytest.mark.parametrize("kv_dtype", FP8, ids=str)
def test_store_kv_quantizes_with_scales_and_saturates(kv_dtype, monkeypatch):
    monkeypatch.setenv("MIXQ_TRITON_INTERPRET_METHODS", "1")
    gen = torch.Generator().manual_seed(3)
    blocks, page, hkv, d, t = 6, 4, 2, 24, 9
    kc = torch.zeros(blocks, page, hkv, d, dtype=kv_dtype, device=DEV)
    vc = torch.zeros_like(kc)
    slots = torch.randperm(blocks * page, generator=gen)[:t]
    kv = torch.randn(t, 2 * hkv, d, generator=gen) * 40
    kv[0, 0, :4] = torch.tensor([1e6, -1e6, 1000.0, -600.0])  # past both formats' range after / 0.37
    k, v = kv[:, :hkv], kv[:, hkv:]  # views into one projection output, as the model has them
    ew.store_kv(k.to(DEV), v.to(DEV), kc, vc, slots.to(DEV), *SCALES)
    for cache, x, s in ((kc, k, SCALES[0]), (vc, v, SCALES[1])):
        got = cache.cpu().view(-1, hkv, d)[slots]
        want = quantize_kv(x, s, kv_dtype)
        assert got.float().abs().max() <= fp8_max(kv_dtype) and torch.isfinite(got.float()).all()
        same = got.float() == want.float()
        if CUDA:
            assert same.all()
        else:
            assert (same | interpreter_rounding(got, want, x * (1.0 / s))).all()
            assert same.float().mean() > 0.9
        untouched = torch.ones(blocks * page, dtype=torch.bool)
        untouched[slots] = False
        assert (cache.cpu().view(-1, hkv, d)[untouched].float() == 0).all()  # only the given slots written
    assert kc.view(-1, hkv, d)[slots[0], 0, 0].float() == fp8_max(kv_dtype)  # saturated, not inf / NaN


def test_mismatched_cache_dtypes_are_refused():
    q = torch.randn(2, 4, 16)
    k8 = torch.zeros(4, 8, 4, 16, dtype=torch.float8_e4m3fn)
    t = torch.zeros(2, 1, dtype=torch.int32)
    lens = torch.ones(2, dtype=torch.int32)
    with pytest.raises(ValueError, match="cache dtype"):
        pa.paged_decode_attention(q, k8, k8.to(torch.float8_e5m2), t, lens, 0.25)
    with pytest.raises(ValueError, match="cache dtype"):
        ea.paged_extend_attention(q, k8, torch.zeros(4, 8, 4, 16), t, torch.tensor([0, 1, 2]), lens, 0.25)
