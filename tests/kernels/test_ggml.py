"""GGUF block types in the Triton kernels (interpreter on CPU, real on CUDA) against float64
references built from the gguf package's own dequantization of the same bytes.

q4_0 / q4_1 / q8_0 run the wna16 kernel (q4_1 through its floating offset), q5_0 / q5_1 /
q4_k / q5_k / q6_k the ggml kernel. Blocks come from gguf's quantizers where it has them,
else (K-quants) random bytes with fp16 scales in range, which exercise every bit.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mixq.formats.gguf import gguf_spec
from mixq.formats.gguf_quants import QUANT_TYPES, decode
from mixq.formats.spec import QuantizedWeight
from mixq.kernels import ggml, wna16
from mixq.kernels.methods import GGMLMethod, WNA16Method

gguf = pytest.importorskip("gguf")
CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
MS = (1, 2, 3, 7, 16, 33, 100) if CUDA else (1, 3, 17)
pytestmark = pytest.mark.skipif(wna16.triton is None, reason="triton not installed")


def gguf_blocks(qtype: str, n: int, k: int, seed: int) -> np.ndarray:
    """uint8 [N, K/B, T] blocks of `qtype` for a random [N, K] weight."""
    rng = np.random.default_rng(seed)
    t = QUANT_TYPES[qtype]
    qt = gguf.GGMLQuantizationType[qtype.upper()]
    try:
        raw = gguf.quants.quantize((rng.standard_normal((n, k)) * 0.05).astype(np.float32), qt)
    except NotImplementedError:  # K-quants: gguf-py dequantizes them but has no quantizer
        raw = rng.integers(0, 256, (n, k // t.block * t.nbytes), dtype=np.uint8)
        b = raw.reshape(n, -1, t.nbytes)
        for pos in {"q4_k": (0, 2), "q5_k": (0, 2), "q6_k": (208,)}[qtype]:  # d (and dmin)
            d = (rng.random(b.shape[:2]) * 2e-3 + 1e-4).astype(np.float16)
            b[..., pos:pos + 2] = d.view(np.uint8).reshape(*b.shape[:2], 2)
    return raw.reshape(n, k // t.block, t.nbytes)


def reference(blocks: np.ndarray, qtype: str) -> torch.Tensor:
    """float64 [N, K] from gguf's own numpy dequantization."""
    n = blocks.shape[0]
    w = gguf.quants.dequantize(blocks.reshape(n, -1), gguf.GGMLQuantizationType[qtype.upper()])
    return torch.from_numpy(w).double()


@pytest.mark.parametrize("qtype", ["q5_0", "q5_1", "q4_k", "q5_k", "q6_k"])
def test_ggml_pack_holds_the_same_weight(qtype):
    """The kernel layout dequantizes (float64, exact) to gguf's weight (float32: two roundings
    of d*sc*q - dmin*mn): nothing is lost; a wrong bit would be off by far more than 1e-6."""
    blocks = gguf_blocks(qtype, 24, 512, seed=1)
    t = ggml.pack_ggml(decode(torch.from_numpy(blocks), qtype), qtype)
    w = ggml.unpack_ggml(t, qtype, 512)
    torch.testing.assert_close(w, reference(blocks, qtype), rtol=1e-6, atol=1e-9)
    held = sum(x.numel() * x.element_size() for x in t.values())
    # the same bits as the file, but for the 6-bit scales and mins widened to bytes
    # (q4_k/q5_k: 16 bytes instead of 12 per 256-value super-block)
    extra = {"q4_k": 24 * 2 * 4, "q5_k": 24 * 2 * 4}.get(qtype, 0)
    assert held == blocks.size + extra


# every type in bf16; fp16 once per kernel (under the interpreter the dot runs in fp32
# either way: the activation dtype only changes the input rounding)
CASES = [(q, torch.bfloat16) for q in ("q4_0", "q4_1", "q8_0", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k")]
CASES += [("q4_1", torch.float16), ("q6_k", torch.float16)]


@pytest.mark.parametrize("qtype,dtype", CASES)
@pytest.mark.parametrize("chunk", [None, 40])
def test_gemm_matches_gguf_dequantization(qtype, dtype, chunk, monkeypatch):
    """Each type in its kernel; chunk=40: the dequantize + cuBLAS path of prefill-sized M
    (wna16's for q4_0/q4_1/q8_0, ggml's for the rest) in 40-column chunks."""
    monkeypatch.setenv("MIXQ_TRITON_INTERPRET_METHODS", "1")
    monkeypatch.setattr(ggml, "CHUNK_OVERRIDE", chunk)
    monkeypatch.setattr(wna16, "CHUNK_OVERRIDE", chunk)
    n, k = (72, 512)
    blocks = gguf_blocks(qtype, n, k, seed=sum(map(ord, qtype)))
    qw = QuantizedWeight("w", gguf_spec(qtype), (n, k), {"blocks": torch.from_numpy(blocks).to(DEV)})
    method = WNA16Method() if qtype in ("q4_0", "q4_1", "q8_0") else GGMLMethod()
    ok, why = method.can_implement(qw.spec, DEV)
    assert ok, why
    prepared = method.prepare(qw, dtype)
    wd = reference(blocks, qtype).to(DEV)
    gen = torch.Generator().manual_seed(k + n)
    bias = torch.randn(n, generator=gen).to(dtype).to(DEV)
    for m in MS:
        x = torch.randn(m, k, generator=gen).to(dtype).to(DEV)
        y = method.apply(prepared, x, bias)
        ref = x.double() @ wd.t() + bias.double()
        assert y.dtype == dtype and y.shape == (m, n) and not y.isnan().any()
        # the weight is rounded once to the activation dtype before the dot (2**-11 fp16,
        # 2**-8 bf16 relative), fp32 accumulation, the output rounded once more
        err = (y.double() - ref).norm() / ref.norm()
        assert err < (2e-2 if dtype == torch.bfloat16 else 5e-3), (qtype, m, float(err))


@pytest.mark.parametrize("chunk", [None, 48])
def test_wna16_offset_matches_reference(chunk, monkeypatch):
    """The floating offset (w = q s + o) in both wna16 kernels, and (chunk) in the
    dequantize + cuBLAS path that large batches take, without GGUF in the way."""
    monkeypatch.setattr(wna16, "CHUNK_OVERRIDE", chunk)
    gen = torch.Generator().manual_seed(3)
    n, k = 80, 256
    q = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.int32).to(torch.uint8)
    s = (torch.rand(n, k // 32, generator=gen) * 0.02 + 0.005).half()
    o = (torch.randn(n, k // 32, generator=gen) * 0.05).half()
    w = wna16.pack_wna16(q, s, None, 4, 32, offsets=o)
    w = wna16.WNA16Weight(*(t.to(DEV) for t in (w.qweight, w.scales)), None, None, 4, 32, n, k, None,
                          w.offsets.to(DEV))
    dense = q.double() * s.double().repeat_interleave(32, 1) + o.double().repeat_interleave(32, 1)
    for m in (1, 5):
        x = torch.randn(m, k, generator=gen).half().to(DEV)
        y = wna16.wna16_gemm(x, w)
        torch.testing.assert_close(wna16.wna16_reference(x, w), x.double() @ dense.t().to(DEV))
        err = (y.double() - x.double() @ dense.t().to(DEV)).norm() / (x.double() @ dense.t().to(DEV)).norm()
        assert err < 5e-3, (m, float(err))
    with pytest.raises(ValueError, match="offsets"):
        wna16.pack_wna16(q, s, torch.zeros(n, k // 32, dtype=torch.int32), 4, 32, offsets=o)


def test_ggml_kernel_refuses_bad_input():
    blocks = gguf_blocks("q4_k", 8, 256, seed=0)
    t = ggml.pack_ggml(decode(torch.from_numpy(blocks), "q4_k"), "q4_k")
    with pytest.raises(ValueError, match="does not fit"):
        ggml.ggml_gemm(torch.zeros(2, 512), t, "q4_k", 8)
    with pytest.raises(ValueError, match="no kernel"):
        ggml.ggml_gemm(torch.zeros(2, 256), t, "q2_k", 8)
    ok, why = GGMLMethod().can_implement(gguf_spec("q4_0"), DEV)
    assert not ok and "not a gguf" in why


@pytest.mark.parametrize("qtype", ["q4_1", "q4_k"])
def test_merged_gguf_projections_equal_the_separate_ones(qtype, monkeypatch):
    """q/k/v in one GGUF type merge into one GEMM (wna16 with offsets, or ggml) whose
    outputs are the separate projections' own."""
    from mixq.layers.linear import MixedPrecisionLinear
    from mixq.layers.merged import merge_linears

    monkeypatch.setenv("MIXQ_TRITON_INTERPRET_METHODS", "1")
    k, outs = 256, (64, 32, 32)
    ps = []
    for i, n in enumerate(outs):
        lin = MixedPrecisionLinear(k, n)
        blocks = torch.from_numpy(gguf_blocks(qtype, n, k, seed=i)).to(DEV)
        lin.load(QuantizedWeight(f"p{i}.weight", gguf_spec(qtype), (n, k), {"blocks": blocks}), torch.float32)
        ps.append(lin)
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(5)).to(DEV)
    sep = [p(x) for p in ps]
    m = merge_linears(ps, "qkv")
    assert m is not None, "GGUF projections of one type should merge"
    for a, b in zip(m(x), sep):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)  # the same kernel on the same bits
