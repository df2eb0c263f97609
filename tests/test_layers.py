"""Layer contracts the model tests do not reach: the method choice and its refusals, MoE
routing (softmax and sigmoid scoring, with and without renormalization), shape checks."""

from __future__ import annotations

import pytest
import torch

import mixq.layers.linear as linear
from mixq.formats.spec import QuantizedWeight, WeightSpec
from mixq.layers.moe import dispatch, route


def test_no_method_for_a_spec_lists_every_refusal(monkeypatch):
    """With the torch reference removed, a 4-bit GPTQ weight with groups of 16 (below the CPU
    int4 kernel's 32) has no method on the CPU: the error names the tensor, the spec and
    each method's reason."""
    methods = [m for m in linear.METHODS if m.name != linear.TorchDequantMethod.name]
    monkeypatch.setattr(linear, "METHODS", methods)
    spec = WeightSpec(layout="gptq", bits=4, dtype=torch.int32, scale_layout="group", group_size=16)
    with pytest.raises(ValueError) as e:
        linear.select_method(spec, torch.device("cpu"), "model.layers.3.mlp.down_proj.weight")
    msg = str(e.value)
    assert msg.startswith("model.layers.3.mlp.down_proj.weight: no kernel implements gptq int4 g16 on cpu: ")
    assert "cpu-int4pack: group size 16 is not a multiple of 32" in msg
    for m in methods:
        ok, why = m.can_implement(spec, torch.device("cpu"))
        assert not ok and f"{m.name}: {why}" in msg


def test_on_cuda_a_spec_no_kernel_takes_is_an_error_not_the_reference(monkeypatch):
    """3-bit GPTQ has no GPU kernel: on cuda the torch reference refuses too (with the
    opt-in named), so loading fails naming the tensor instead of running slowly."""
    spec = WeightSpec(layout="gptq", bits=3, dtype=torch.int32, scale_layout="group", group_size=128)
    monkeypatch.delenv("MIXQ_ALLOW_REFERENCE_COMPUTE", raising=False)
    with pytest.raises(ValueError, match=r"experts\.0\.w1\.weight: no kernel implements .*MIXQ_ALLOW_REFERENCE_COMPUTE"):
        linear.select_method(spec, torch.device("cuda"), "experts.0.w1.weight")
    assert linear.select_method(spec, torch.device("cpu")).name == linear.TorchDequantMethod.name
    monkeypatch.setenv("MIXQ_ALLOW_REFERENCE_COMPUTE", "1")
    assert linear.select_method(spec, torch.device("cuda")).name == linear.TorchDequantMethod.name


def test_linear_refuses_a_weight_of_the_wrong_shape():
    lin = linear.MixedPrecisionLinear(16, 8)
    w = QuantizedWeight("a.weight", WeightSpec(layout="dense", bits=32, dtype=torch.float32), (8, 12),
                        {"weight": torch.zeros(8, 12)})
    with pytest.raises(ValueError, match=r"a.weight: shape \[8, 12\] does not fit a Linear of \[8, 16\]"):
        lin.load(w, torch.float32)


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("renormalize", [True, False])
def test_routing_against_float64(scoring, renormalize):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(37, 16, generator=g).bfloat16()
    r = route(logits, 4, renormalize, scoring)
    x = logits.double()
    p = x.softmax(-1) if scoring == "softmax" else x.sigmoid()
    w, ids = p.topk(4, -1)
    if renormalize:
        w = w / w.sum(-1, keepdim=True)
    assert torch.equal(r.topk_ids, ids)
    torch.testing.assert_close(r.topk_weights.double(), w, rtol=1e-6, atol=0)  # float32 routing weights
    d = dispatch(r, 16)
    assert sum(d.counts) == 37 * 4 and d.counts == torch.bincount(ids.flatten(), minlength=16).tolist()
    flat = r.topk_ids.flatten()[d.order]  # pairs sorted by expert
    assert torch.equal(flat, flat.sort().values)
    with pytest.raises(ValueError, match="unknown router scoring 'tanh'"):
        route(logits, 4, renormalize, "tanh")
