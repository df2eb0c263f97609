"""The fused per-token kernels (mixq.kernels.elementwise) against float64 references and
against the layers' torch code they replace, under the interpreter on the CPU and for real
on CUDA; then a whole model through them against the torch path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mixq.kernels import elementwise as ew

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
pytestmark = pytest.mark.skipif(ew.triton is None, reason="triton not installed")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# One rounding of the output to the dtype (half an ulp relative: 2^-24, 2^-11, 2^-8), plus
# the rounding of an intermediate torch materialises (x+residual, the normalised x before the
# weight, silu(gate) before the product): twice that, with a little room for fp32 sums.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# Triton 3.9's interpreter truncates fp32 -> bf16 where the GPU (and torch) round to
# nearest: a unit more per bf16 rounding there.
SLACK = 0 if CUDA else 1


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double().cpu() - want).abs().max() / want.abs().max())


def ulps_apart(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor | None = None) -> float:
    """Largest difference in units of b's dtype at each element's magnitude (or at `scale`,
    the magnitude of the terms an element was computed from, where they cancel)."""
    eps = torch.finfo(b.dtype).eps
    a, b64 = a.double().cpu(), b.double().cpu()
    mag = b64.abs() if scale is None else scale.double().cpu()
    return float(((a - b64).abs() / (mag * eps).clamp_min(torch.finfo(b.dtype).tiny)).max())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,n", [(1, 48), (7, 200), (33, 64)])
def test_add_rms_norm(dtype, rows, n):
    from mixq.layers.norm import RMSNorm

    g = torch.Generator().manual_seed(rows * n)
    x, r = (torch.randn(rows, n, generator=g) * 3).to(dtype), torch.randn(rows, n, generator=g).to(dtype)
    w = (torch.rand(n, generator=g) + 0.5).to(dtype)
    eps = 1e-6
    out, res = ew.add_rms_norm(x.to(DEV), r.to(DEV), w.to(DEV), eps)
    s = x.double() + r.double()
    want = w.double() * s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + eps)
    assert res.dtype == dtype and out.dtype == dtype
    assert rel_err(res, s) <= TOL[dtype] and rel_err(out, want) <= TOL[dtype]
    # and what the torch layer computes: the same roundings, at most one unit apart
    norm = RMSNorm(n, eps)
    norm.weight.data = w
    assert not ew.use_kernels(x)
    t_out, t_res = norm(x, r)  # CPU tensors: the torch code
    slack = SLACK if dtype == torch.bfloat16 else 0
    assert ulps_apart(res, t_res) <= slack
    # fp32: the mean of squares summed in another order moves rstd by an ulp or two
    assert ulps_apart(out, t_out) <= (4 if dtype == torch.float32 else 2 + 2 * slack)
    # no residual: the first layer's input norm
    out1, _ = ew.add_rms_norm(x.to(DEV), None, w.to(DEV), eps)
    want1 = w.double() * x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + eps)
    assert rel_err(out1, want1) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("h,hkv,d", [(4, 2, 16), (6, 6, 48), (3, 1, 64)])
def test_rotary_neox(dtype, h, hkv, d):
    from mixq.layers.rotary import RotaryEmbedding

    g = torch.Generator().manual_seed(h * d)
    t = 9
    rope = RotaryEmbedding(d, 512, {"rope_theta": 10000.0})
    pos = torch.randint(0, 512, (t,), generator=g)
    # q as a strided view (heads of a wider projection), k contiguous
    q = torch.randn(t, h, d + 8, generator=g).to(dtype)[:, :, :d]
    k = torch.randn(t, hkv, d, generator=g).to(dtype)
    qo, ko = ew.rotary_neox(pos.to(DEV), q.to(DEV), k.to(DEV), rope.cos.to(DEV), rope.sin.to(DEV))
    cos, sin = rope.cos.double()[pos][:, None], rope.sin.double()[pos][:, None]

    def ref(x):
        x1, x2 = x.double().chunk(2, -1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1)

    assert qo.is_contiguous() and qo.dtype == dtype
    assert rel_err(qo, ref(q)) <= TOL[dtype] and rel_err(ko, ref(k)) <= TOL[dtype]
    tq, tk = rope.forward(pos, q, k)  # the CPU's torch code (use_kernels is off for these tensors)

    def terms(x):  # |x1 cos| + |x2 sin|: what each output is a difference/sum of
        x1, x2 = x.double().abs().chunk(2, -1)
        t = x1 * cos.abs() + x2 * sin.abs()
        return torch.cat((t, t), -1)

    # a fused multiply-add (GPU) vs two roundings (torch): ulps of the terms, not of a
    # result that may cancel to near zero; then one rounding to the dtype
    slack = SLACK if dtype == torch.bfloat16 else 0
    for got, want, x in ((qo, tq, q), (ko, tk, k)):
        assert ulps_apart(got, want, torch.maximum(terms(x), want.double().abs())) <= 2 + slack


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,n", [(1, 40), (5, 300), (17, 64)])
def test_silu_and_mul(dtype, rows, n):
    g = torch.Generator().manual_seed(rows + n)
    both = torch.randn(rows, 2 * n, generator=g).mul(4).to(dtype)
    gate, up = both[:, :n], both[:, n:]  # strided rows, as a merged gate_up output would be
    out = ew.silu_and_mul(gate.to(DEV), up.to(DEV))
    want = F.silu(gate.double()) * up.double()
    assert rel_err(out, want) <= TOL[dtype]
    # fp32: Triton's exp and torch's differ by an ulp or two, which the product carries
    room = {torch.float32: 4, torch.float16: 1, torch.bfloat16: 1 + 2 * SLACK}[dtype]
    assert ulps_apart(out, F.silu(gate) * up) <= room


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
def test_store_kv(cache_dtype):
    g = torch.Generator().manual_seed(5)
    blocks, page, hkv, d, t = 6, 4, 2, 24, 7
    kc = torch.zeros(blocks, page, hkv, d, dtype=cache_dtype)
    vc = torch.zeros_like(kc)
    slots = torch.randperm(blocks * page, generator=g)[:t]
    kv = torch.randn(t, 2 * hkv, d, generator=g)
    k, v = kv[:, :hkv], kv[:, hkv:]  # views into one projection output
    kc_d, vc_d = kc.to(DEV), vc.to(DEV)
    ew.store_kv(k.to(DEV), v.to(DEV), kc_d, vc_d, slots.to(DEV))
    want_k, want_v = kc.view(-1, hkv, d).clone(), vc.view(-1, hkv, d).clone()
    want_k[slots], want_v[slots] = k.to(cache_dtype), v.to(cache_dtype)
    got_k, got_v = kc_d.cpu().view(-1, hkv, d), vc_d.cpu().view(-1, hkv, d)
    if cache_dtype == torch.float32 or CUDA:  # a copy, or the GPU's round-to-nearest cast: exact
        assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)
    else:  # the interpreter truncates fp32 -> bf16
        assert ulps_apart(got_k, want_k) <= SLACK and ulps_apart(got_v, want_v) <= SLACK
        assert torch.equal(got_k == 0, want_k == 0)  # and wrote exactly the slots it was given


def test_fake_impls_match():
    x = torch.randn(3, 32, device=DEV)
    torch.library.opcheck(torch.ops.mixq.add_rms_norm.default, (x, x.clone(), torch.ones(32, device=DEV), 1e-6))
    torch.library.opcheck(torch.ops.mixq.silu_and_mul.default, (x, x.clone()))
    cos = torch.rand(16, 8, device=DEV)
    q, k = torch.randn(3, 2, 16, device=DEV), torch.randn(3, 1, 16, device=DEV)
    torch.library.opcheck(torch.ops.mixq.rotary_neox.default, (torch.tensor([0, 5, 15], device=DEV), q, k, cos, cos))


def test_model_through_the_kernels_matches_the_torch_path(monkeypatch):
    """The tiny Llama fixture's logits with every norm, rotary, SiLU-and-mul and KV write in
    the kernels vs the torch code, in float32: the same math up to fp32 sum order."""
    from mixq.engine.engine import LLM
    from mixq.engine.sampling_params import SamplingParams
    from tests.engine.test_engine import FIX, prompts

    calls = []
    for name in ("add_rms_norm", "rotary_neox", "silu_and_mul", "store_kv"):
        fn = getattr(ew, name)
        monkeypatch.setattr(ew, name, lambda *a, _fn=fn, _n=name: calls.append(_n) or _fn(*a))
    kw = dict(model_path=str(FIX / "bf16"), max_total_tokens=512, page_size=8, device=DEV.type, dtype="float32",
              disable_cuda_graph=True)
    params = SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True, logprobs=1)
    ps = prompts(3, seed=4)
    if CUDA:
        got = LLM(**kw).generate(ps, params)
        monkeypatch.setattr(ew, "use_kernels", lambda x: False)
        ref = LLM(**kw).generate(ps, params)
    else:
        ref = LLM(**kw).generate(ps, params)
        monkeypatch.setenv("MIXQ_TRITON_INTERPRET_METHODS", "1")
        got = LLM(**kw).generate(ps, params)
    assert {"add_rms_norm", "rotary_neox", "silu_and_mul", "store_kv"} <= set(calls)
    for a, b in zip(ref, got):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert max(abs(x - y) for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs)) < 1e-4
