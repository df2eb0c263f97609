"""FP8 W8A8 consumers get their input quantized by the producer (RMSNorm, SiLU-and-mul):
the same numbers as quantizing afterwards, and the fused kernels are the ones that ran.
On the CPU the Triton kernels run under the interpreter and `_scaled_mm` (CUDA only) is
replaced by a float reference of the same rowwise-scaled product."""

from __future__ import annotations

import pytest
import torch

from mixq.kernels import quant_fused, w8_methods
from mixq.kernels.w8_methods import FP8Method
from mixq.layers import activation, norm
from mixq.layers.norm import RMSNorm
from mixq.models import load_model_weights
from mixq.models.llama import MLP, Attention
from tests.kernels.moe_utils import make_weight

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")


def _scaled_mm_ref(a, sa, b, sb, bias):
    y = (a.float() * sa) @ (b.float() * sb.view(-1, 1)).t()
    return (y if bias is None else y + bias.float()).to(torch.bfloat16)


@pytest.fixture
def fp8_everywhere(monkeypatch):
    """FP8 methods on this device, W8A8 (not weight-only) from 2 rows; calls to the fused
    producers counted."""
    if not CUDA:
        monkeypatch.setenv("MIXQ_TRITON_INTERPRET_METHODS", "1")
        monkeypatch.setattr(w8_methods, "scaled_mm_ok", lambda *a: True)
        monkeypatch.setattr(w8_methods, "scaled_mm_rowwise", _scaled_mm_ref)
    monkeypatch.setattr(FP8Method, "weight_only_max_m", 1)
    calls = {"norm": 0, "silu": 0}
    real_norm, real_silu = quant_fused.add_rms_norm_fp8, quant_fused.silu_and_mul_fp8

    def count(name, fn):
        def wrapped(*a):
            calls[name] += 1
            return fn(*a)
        return wrapped
    monkeypatch.setattr(norm, "add_rms_norm_fp8", count("norm", real_norm))
    monkeypatch.setattr(activation, "silu_and_mul_fp8", count("silu", real_silu))
    return calls


def _mlp(fmts, gen):
    mlp = MLP(64, 96)
    ws = [make_weight(fmts[i], f"mlp.{n}.weight", torch.randn(*shape, generator=gen) * 0.05).to(DEV)
          for i, (n, shape) in enumerate((("gate_proj", (96, 64)), ("up_proj", (96, 64)), ("down_proj", (64, 96))))]
    model = torch.nn.Module()
    model.mlp = mlp
    load_model_weights(model, ws, torch.bfloat16)
    return mlp


def test_norm_and_activation_quantize_for_fp8_consumers(fp8_everywhere, monkeypatch):
    gen = torch.Generator().manual_seed(0)
    mlp = _mlp(["fp8-channel"] * 3, gen)
    nrm = RMSNorm(64, 1e-6).to(DEV)
    nrm.weight.data = (torch.rand(64, generator=gen) + 0.5).to(DEV)
    x = torch.randn(6, 64, generator=gen).bfloat16().to(DEV)
    r = torch.randn(6, 64, generator=gen).bfloat16().to(DEV)
    assert mlp.gate_up_proj is not None and mlp.takes_fp8_act(6, torch.bfloat16)
    assert not mlp.takes_fp8_act(1, torch.bfloat16)  # weight-only rows: no activation quantization
    a, res = nrm(x, r, quant_fp8=True)
    assert isinstance(a, quant_fused.FP8Act)
    y = mlp(a)
    assert fp8_everywhere == {"norm": 1, "silu": 1}
    # unfused: the norm's bf16 output, quantized inside each FP8 linear
    monkeypatch.setattr(FP8Method, "wants_fp8_act", lambda *a: False)
    b, res2 = nrm(x, r)
    y2 = mlp(b)
    assert fp8_everywhere == {"norm": 1, "silu": 1}
    assert torch.equal(res, res2)
    if DEV.type == "cpu":  # the same codes and scales: the same GEMMs
        assert torch.equal(y, y2)
    else:  # compiled, the fused norm may move a scale by a bf16 ulp and a code by an e4m3 step
        assert float((y.float() - y2.float()).norm() / y2.float().norm()) < 2**-4


def test_mixed_consumers_are_not_fed_fp8(fp8_everywhere):
    gen = torch.Generator().manual_seed(1)
    mlp = _mlp(["fp8-channel", "bf16", "fp8-channel"], gen)  # gate/up differ: no merge, no fused norm
    assert mlp.gate_up_proj is None and not mlp.takes_fp8_act(6, torch.bfloat16)
    x = torch.randn(6, 64, generator=gen).bfloat16().to(DEV)
    mlp(x)
    assert fp8_everywhere == {"norm": 0, "silu": 1}  # the FP8 down projection still gets its FP8Act
    blk = _mlp(["fp8-block"] * 3, gen)  # block scales quantize per 1 x 128 group: not per token
    assert not blk.takes_fp8_act(6, torch.bfloat16)


def test_attention_takes_fp8_only_when_merged(fp8_everywhere):
    from mixq.models.config import ModelConfig
    from tests.ckpt_utils import llama_config

    c = ModelConfig.from_hf(llama_config(hidden=64, inter=96))
    gen = torch.Generator().manual_seed(2)
    for fmts, want in ((["fp8-channel"] * 4, True), (["fp8-channel", "bf16", "fp8-channel", "bf16"], False)):
        attn = Attention(c).to(DEV)
        shapes = {"q_proj": (64, 64), "k_proj": (32, 64), "v_proj": (32, 64), "o_proj": (64, 64)}
        ws = [make_weight(f, f"attn.{n}.weight", torch.randn(*s, generator=gen) * 0.05).to(DEV)
              for f, (n, s) in zip(fmts, shapes.items())]
        model = torch.nn.Module()
        model.attn = attn
        load_model_weights(model, ws, torch.bfloat16)
        assert attn.takes_fp8_act(8, torch.bfloat16) == want
        if want:
            x = torch.randn(8, 64, generator=gen).bfloat16().to(DEV)
            q8 = quant_fused.FP8Act(*w8_methods.quant_fp8(x), torch.bfloat16)
            for a, b in zip(attn.qkv_proj(q8), attn.qkv_proj(x)):
                assert torch.equal(a, b)
