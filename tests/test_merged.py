"""Merged q/k/v and gate/up GEMMs: one GEMM where the formats agree, the same numbers as
the separate projections, per-tensor memory accounting unchanged, mixes left separate."""

from __future__ import annotations

import pytest
import torch

from mixq.layers.linear import MixedPrecisionLinear
from mixq.layers.merged import MergedLinear, merge_linears, merge_problem
from mixq.models import load_model_weights
from mixq.models.llama import MLP, Attention
from mixq.models.registry import held_weights
from mixq.tracking.memory import get_mixed_precision_memory_stats
from tests.kernels.moe_utils import _env, make_weight

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")


def parts(fmts, outs, k, gen, bias=False, dtype=torch.float32):
    """Loaded projections, one per format, and their float weights."""
    ps, ws = [], []
    for i, (fmt, n) in enumerate(zip(fmts, outs)):
        w = torch.randn(n, k, generator=gen) * 0.05
        lin = MixedPrecisionLinear(k, n, bias=bias)
        if bias:
            lin.bias.data = torch.randn(n, generator=gen).to(dtype)
        lin.load(make_weight(fmt, f"layer.p{i}.weight", w).to(DEV), dtype)
        if bias:
            lin.bias.data = lin.bias.data.to(DEV)
        ps.append(lin)
        ws.append(w)
    return ps, ws


def _interp(fmt):
    """Quantized formats run their Triton kernel under the interpreter on the CPU."""
    return _env("MIXQ_TRITON_INTERPRET_METHODS", None if CUDA or fmt in ("bf16", "fp16") else "1")


@pytest.mark.parametrize("fmt", ["bf16", "gptq4", "gptq4-act", "fp8-channel"])
def test_merged_gemm_equals_the_separate_ones(fmt, monkeypatch):
    if not CUDA and fmt != "bf16":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    gen = torch.Generator().manual_seed(len(fmt))
    dtype = torch.bfloat16 if CUDA or fmt == "bf16" else torch.float32
    with _interp(fmt):
        # act-order: every part must share its permutation to merge, so one seed for all
        ps, _ = parts([fmt] * 3, (128, 64, 64), 128, gen, bias=True, dtype=dtype)
        if fmt == "gptq4-act":
            assert merge_problem(ps) is None or "perm differs" in merge_problem(ps)
        x = torch.randn(5, 128, generator=gen).to(dtype).to(DEV)
        sep = [p(x) for p in ps]
        before = {n: w.nbytes for n, w in held_weights(torch.nn.ModuleList(ps)).items()}
        m = merge_linears(ps, "qkv")
        if fmt == "gptq4-act" and merge_problem(ps) is not None:
            assert m is None  # different permutations: stays three GEMMs
            return
        assert isinstance(m, MergedLinear) and m.splits == [128, 64, 64]
        outs = m(x)
        for a, b in zip(outs, sep):
            # the same kernel on the same bytes: equal up to the GEMM's own rounding
            # (a different N may pick another launch config / reduction split)
            assert a.shape == b.shape
            assert float((a.double() - b.double()).norm() / b.double().norm()) < 1e-2
        after = {n: w.nbytes for n, w in held_weights(torch.nn.ModuleList(ps)).items()}
        assert after == before  # each part still counted with its own bytes (views)
        for p in ps:  # and the parts are views into the merged storage, not copies
            t = next(iter(p.weight.tensors.values()))
            assert t.untyped_storage().data_ptr() == next(iter(m.weight.tensors.values())).untyped_storage().data_ptr()
        with pytest.raises(RuntimeError, match="computed by the merged qkv"):
            ps[0](x)


def test_mixed_formats_stay_separate():
    gen = torch.Generator().manual_seed(3)
    with _env("MIXQ_TRITON_INTERPRET_METHODS", None if CUDA else "1"):
        ps, _ = parts(["bf16", "bf16", "fp8-channel"], (64, 64, 64), 64, gen)
        assert "differs" in merge_problem(ps)
        assert merge_linears(ps, "qkv") is None
        ps, _ = parts(["bf16", "bf16"], (64, 64), 64, gen)
        assert merge_linears(ps, "gate_up") is not None


def _model_weights(c, fmts, gen):
    ws = {}
    shapes = {"q_proj": (c.num_heads * c.head_dim, c.hidden_size), "k_proj": (c.num_kv_heads * c.head_dim, c.hidden_size),
              "v_proj": (c.num_kv_heads * c.head_dim, c.hidden_size), "o_proj": (c.hidden_size, c.num_heads * c.head_dim)}
    for name, (n, k) in shapes.items():
        ws[f"attn.{name}.weight"] = make_weight(fmts.get(name, "bf16"), f"attn.{name}.weight",
                                                torch.randn(n, k, generator=gen) * 0.05)
    for name, (n, k) in {"gate_proj": (96, c.hidden_size), "up_proj": (96, c.hidden_size),
                         "down_proj": (c.hidden_size, 96)}.items():
        ws[f"mlp.{name}.weight"] = make_weight(fmts.get(name, "bf16"), f"mlp.{name}.weight",
                                               torch.randn(n, k, generator=gen) * 0.05)
    return ws


def test_modules_merge_on_load_and_account_per_tensor():
    """Attention and MLP merge after loading when their formats agree (a mix where v is
    FP8 keeps q/k/v separate); memory stats are those of the unmerged model."""
    from mixq.models.config import ModelConfig
    from tests.ckpt_utils import llama_config

    c = ModelConfig.from_hf(llama_config(hidden=64, inter=96))
    gen = torch.Generator().manual_seed(0)
    for fmts, qkv_merged in (({}, True), ({"v_proj": "fp8-channel"}, False)):
        ws = _model_weights(c, fmts, gen)
        stats = []
        for merge in (False, True):
            model = torch.nn.Module()
            model.attn, model.mlp = Attention(c), MLP(64, 96)
            load_model_weights(model, ws.values(), torch.bfloat16, merge_projections=merge)
            assert (model.mlp.gate_up_proj is not None) == merge
            stats.append(get_mixed_precision_memory_stats(held_weights(model)))
            if merge:
                assert (model.attn.qkv_proj is not None) == qkv_merged
                assert model.mlp.gate_up_proj is not None
                x = torch.randn(3, 64, generator=gen).bfloat16()
                y = model.mlp(x)
                g, u = (x.float() @ ws[f"mlp.{n}.weight"].tensors["weight"].float().t() for n in ("gate_proj", "up_proj"))
                ref = (torch.nn.functional.silu(g) * u) @ ws["mlp.down_proj.weight"].tensors["weight"].float().t()
                assert float((y.float() - ref).norm() / ref.norm()) < 2e-2  # bf16 weights, activations, output
        assert stats[0] == stats[1]


@pytest.mark.skipif(CUDA, reason="the CPU methods")
@pytest.mark.parametrize("fmt", ["gptq4", "awq", "int8", "fp8-channel", "fp8-block", "q4_1", "q8_0"])
def test_cpu_methods_merge_and_equal_the_separate_ones(fmt):
    """The CPU methods' layouts merge along N (int4: packed rows, scale/zero columns; GGUF
    q8_0: the blocks as stored) and give the separate projections' numbers: the same
    kernels on the same bytes, and each output row depends only on its own weight row."""
    from mixq.formats.gguf import gguf_spec
    from mixq.formats.spec import QuantizedWeight

    gen = torch.Generator().manual_seed(len(fmt))
    k, outs = 128, (128, 64, 64)
    ps = []
    for i, n in enumerate(outs):
        w = torch.randn(n, k, generator=gen) * 0.05
        if fmt in ("q4_1", "q8_0"):
            import gguf

            raw = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType[fmt.upper()])
            qw = QuantizedWeight(f"p{i}.weight", gguf_spec(fmt), (n, k),
                                 {"blocks": torch.from_numpy(raw.reshape(n, k // 32, -1).copy())})
        else:
            qw = make_weight(fmt, f"p{i}.weight", w)
        lin = MixedPrecisionLinear(k, n)
        lin.load(qw, torch.bfloat16)
        assert lin.method.name.startswith("cpu-"), lin.method.name
        ps.append(lin)
    x = torch.randn(3, k, generator=gen).bfloat16()
    sep = [p(x) for p in ps]
    before = {n: w.nbytes for n, w in held_weights(torch.nn.ModuleList(ps)).items()}
    m = merge_linears(ps, "qkv")
    assert isinstance(m, MergedLinear), merge_problem(ps)
    for a, b in zip(m(x), sep):
        assert a.shape == b.shape
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-2, atol=1e-3)  # bf16 outputs, same sums
    assert {n: w.nbytes for n, w in held_weights(torch.nn.ModuleList(ps)).items()} == before


@pytest.mark.skipif(CUDA, reason="the CPU int4 packing")
@pytest.mark.parametrize("outs", [(40, 24), (96, 32), (64, 32, 32)])
def test_cpu_int4_parts_off_the_64_row_block_do_not_merge(outs):
    """torch's CPU int4 packing lays rows out in blocks of 64: a leading part that is not a
    whole number of blocks would be read with the wrong layout (the Qwen3-MoE fixture's
    q/k/v of 64/32/32 rows computed garbage for k and v before this check)."""
    gen = torch.Generator().manual_seed(1)
    ps = []
    for i, n in enumerate(outs):
        lin = MixedPrecisionLinear(64, n)
        lin.load(make_weight("gptq4", f"p{i}.weight", torch.randn(n, 64, generator=gen) * 0.05), torch.bfloat16)
        ps.append(lin)
    assert "multiple of 64" in merge_problem(ps) and merge_linears(ps, "qkv") is None
