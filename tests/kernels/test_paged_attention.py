"""Paged decode attention (one launch for every sequence) against a float64 reference,
under the Triton interpreter on the CPU and for real on CUDA."""

from __future__ import annotations

import pytest
import torch

from mixq.kernels import paged_attention as pa

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
pytestmark = pytest.mark.skipif(pa.triton is None, reason="triton not installed")
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
# fp32: exact softmax and fp32 dots; fp16/bf16 on the GPU round q, k, v to the input dtype
# (their own error is in the reference too) and the probabilities to it before p @ v
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def make_cache(gen, ctx_lens, page, hkv, d, dtype, spare=3):
    """Caches with pages handed out in a shuffled order, so block tables are not ranges."""
    need = [-(-n // page) for n in ctx_lens]
    num_blocks = sum(need) + spare
    order = torch.randperm(num_blocks, generator=gen)
    tables = torch.zeros(len(ctx_lens), max(need) + 1, dtype=torch.int32)
    at = 0
    for i, nb in enumerate(need):
        tables[i, :nb] = order[at:at + nb]
        at += nb
    k = torch.randn(num_blocks, page, hkv, d, generator=gen).to(dtype)
    v = torch.randn(num_blocks, page, hkv, d, generator=gen).to(dtype)
    return k, v, tables


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("h,hkv,d,page", [(8, 2, 64, 16), (4, 4, 32, 8), (12, 4, 80, 16), (2, 1, 128, 32)])
def test_matches_float64_reference(dtype, h, hkv, d, page):
    gen = torch.Generator().manual_seed(h * 100 + d + page)
    ctx = [1, 2, page - 1, page, page + 1, 3 * page + 5] + ([257, 1000] if CUDA else [70])
    k, v, tables = make_cache(gen, ctx, page, hkv, d, dtype)
    q = torch.randn(len(ctx), h, d, generator=gen).to(dtype)
    lens = torch.tensor(ctx, dtype=torch.int32)
    scale = d**-0.5
    ref = pa.paged_decode_reference(q, k, v, tables, lens, scale)
    out = pa.paged_decode_attention(*(t.to(DEV) for t in (q, k, v, tables, lens)), scale)
    assert out.dtype == dtype and out.shape == q.shape
    err = (out.double().cpu() - ref).norm() / ref.norm()
    assert err < TOL[dtype], float(err)
    # each sequence on its own equals its row of the batched call (no cross-talk)
    one = pa.paged_decode_attention(*(t[3:4].to(DEV) for t in (q,)), k.to(DEV), v.to(DEV), tables[3:4].to(DEV),
                                    lens[3:4].to(DEV), scale)
    assert torch.equal(one[0].cpu(), out[3].cpu())


def test_contract_violations_are_refused():
    q = torch.randn(2, 6, 16)
    k = torch.randn(4, 8, 4, 16)
    t = torch.zeros(2, 1, dtype=torch.int32)
    lens = torch.ones(2, dtype=torch.int32)
    with pytest.raises(ValueError, match="do not fit"):
        pa.paged_decode_attention(q, k, k, t, lens, 0.25)  # 6 heads over 4 KV heads
    with pytest.raises(ValueError, match="must match"):
        pa.paged_decode_attention(torch.randn(3, 4, 16), k, k, t, lens, 0.25)
    with pytest.raises(ValueError, match="cache dtype"):
        pa.paged_decode_attention(torch.randn(2, 4, 16), k.half(), k.half(), t, lens, 0.25)
