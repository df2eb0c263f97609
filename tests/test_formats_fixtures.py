"""Every reader against checkpoints made by tools nobody here wrote (tests/fixtures, built
by scripts/fixtures/make_fixtures.py with llm-compressor and GPTQModel): our reference
dequantization must equal the producing library's own dequantization."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from compressed_tensors.compressors.base import BaseCompressor
from compressed_tensors.quantization import QuantizationScheme
from safetensors.torch import load_file

from mixq.formats import CheckpointCatalog
from tests.ckpt_utils import is_linear

FIX = Path(__file__).parent / "fixtures"
CT_DIRS = [
    ("tiny-llama", d) for d in ("fp8-dynamic", "fp8-static", "fp8-block", "w8a8-int8", "w8a16-int8", "gptq-w4a16",
                                "gptq-w4a16-asym-actorder", "awq-w4a16")
] + [("tiny-qwen3-moe", d) for d in ("fp8-dynamic", "w8a16-int8", "gptq-w4a16")] + [("tiny-mixtral", "gptq-w4a16")]
GPTQMODEL_DIRS = [("tiny-llama", d) for d in ("gptq-legacy-4bit-desc-act", "gptq-legacy-4bit-asym", "gptq-legacy-8bit",
                                              "gptq-legacy-4bit-g-1", "awq-gemm")] + [
    ("tiny-qwen3-moe", "gptq-legacy-4bit"), ("tiny-qwen3-moe", "awq-gemm")]
EXPECTED = {
    "fp8-dynamic": ("fp8", 8, "channel", "dynamic-token"), "fp8-static": ("fp8", 8, "tensor", "static-tensor"),
    "fp8-block": ("fp8", 8, "block", "dynamic-group"), "w8a8-int8": ("int8", 8, "channel", "dynamic-token"),
    "w8a16-int8": ("int8", 8, "channel", "none"), "gptq-w4a16": ("ct-packed", 4, None, "none"),
    "gptq-w4a16-asym-actorder": ("ct-packed", 4, "group", "none"), "awq-w4a16": ("ct-packed", 4, "group", "none"),
    "gptq-legacy-4bit-desc-act": ("gptq", 4, "group", "none"), "gptq-legacy-4bit-asym": ("gptq", 4, "group", "none"),
    "gptq-legacy-8bit": ("gptq", 8, "group", "none"), "gptq-legacy-4bit-g-1": ("gptq", 4, "channel", "none"),
    "gptq-legacy-4bit": ("gptq", 4, "group", "none"), "awq-gemm": ("awq", 4, "group", "none"),
}


def _ids(dirs):
    return [f"{m}/{d}" for m, d in dirs]


def _check_catalogue(cat: CheckpointCatalog, variant: str):
    """Every decoder Linear is quantized with the expected spec; the rest is dense."""
    layout, bits, scale_layout, act = EXPECTED[variant]
    base = CheckpointCatalog(cat.path.parent / "bf16")
    assert set(cat.entries) == set(base.entries)
    for name, e in cat.entries.items():
        if is_linear(name):
            assert (e.spec.layout, e.spec.bits, e.spec.activation) == (layout, bits, act), name
            if scale_layout:
                assert e.spec.scale_layout == scale_layout, name
            assert tuple(e.shape) == tuple(base.entries[name].shape), name
        else:
            assert e.spec.layout == "dense", name


@pytest.mark.parametrize("model,variant", CT_DIRS, ids=_ids(CT_DIRS))
def test_compressed_tensors_matches_the_library_decompression(model, variant):
    cat = CheckpointCatalog(FIX / model / variant)
    _check_catalogue(cat, variant)
    qc = cat.ckpt.quantization_config
    group = next(iter(qc["config_groups"].values()))
    scheme = QuantizationScheme.model_validate(group)
    fmt = group.get("format") or qc["format"]
    compressor = BaseCompressor.get_value_from_registry(fmt)
    checked = 0
    for name, entry in cat.entries.items():
        if not entry.spec.is_quantized:
            continue
        w = cat.read(name)
        mod = name.removesuffix(".weight")
        local = {t.removeprefix(mod + "."): cat.ckpt.read(t) for t in cat.ckpt.tensors if t.startswith(mod + ".")}
        theirs = compressor.decompress(local, scheme)["weight"].float()
        ours = w.dequantize()
        # The library computes in the scale's dtype (bf16 here); ours in fp32. They agree
        # to bf16 rounding of the product: half an ulp, 2**-9 relative.
        torch.testing.assert_close(ours.to(theirs.dtype), theirs, rtol=2**-8, atol=1e-12, msg=name)
        checked += 1
    assert checked >= 14


@pytest.mark.parametrize("model,variant", GPTQMODEL_DIRS, ids=_ids(GPTQMODEL_DIRS))
def test_gptqmodel_checkpoints_match_gptqmodels_own_dequantization(model, variant):
    cat = CheckpointCatalog(FIX / model / variant)
    _check_catalogue(cat, variant)
    ref = load_file(str(FIX / model / variant / "reference.safetensors"))
    assert len(ref) == 2
    for name, theirs in ref.items():
        ours = cat.read(name).dequantize()
        # fp16/bf16 scale x small integer is exact in fp32: identical results expected
        torch.testing.assert_close(ours, theirs.float(), rtol=0, atol=0, msg=name)
    if variant == "gptq-legacy-4bit-desc-act":
        w = cat.read("model.layers.1.mlp.down_proj.weight")
        assert w.spec.act_order and not torch.equal(w.tensors["g_idx"].long(), torch.arange(256) // 32)
    if variant == "gptq-legacy-4bit-asym":  # desc_act off: the trivial g_idx is checked and dropped
        assert "g_idx" not in cat.read("model.layers.0.self_attn.q_proj.weight").tensors


def test_deepseek_block_fp8_from_its_public_spec():
    cat = CheckpointCatalog(FIX / "tiny-llama" / "fp8-block-deepseek")
    base = CheckpointCatalog(FIX / "tiny-llama" / "bf16")
    name = "model.layers.1.mlp.down_proj.weight"  # [128, 256]: two 128x128 blocks
    w = cat.read(name)
    assert w.spec.describe() == "fp8 block128x128 act:dynamic-group"
    raw = w.tensors["weight"].double()
    s = w.tensors["weight_scale"].double()
    ref = torch.cat([raw[:, :128] * s[0, 0], raw[:, 128:] * s[0, 1]], dim=1)
    torch.testing.assert_close(w.dequantize().double(), ref, rtol=1e-7, atol=0)
    # e4m3 keeps 3 mantissa bits: within 2**-4 relative of each block's scale range
    dense = base.read(name).tensors["weight"].double()
    assert ((w.dequantize().double() - dense).abs() <= 448 * s.max() * 2**-4).all()


def test_gptq_legacy_and_compressed_tensors_round_trip_the_same_dense_model():
    """Two tools, two layouts, one source model: both stay near the BF16 weights."""
    base = CheckpointCatalog(FIX / "tiny-llama" / "bf16")
    for variant in ("gptq-legacy-4bit-asym", "gptq-w4a16-asym-actorder", "awq-w4a16"):
        cat = CheckpointCatalog(FIX / "tiny-llama" / variant)
        name = "model.layers.0.mlp.gate_proj.weight"
        dense = base.read(name).tensors["weight"].float()
        err = (cat.read(name).dequantize() - dense).norm() / dense.norm()
        bound = 0.5 if variant.startswith("awq") else 0.15  # AWQ also rescales columns
        assert err < bound, (variant, float(err))


def test_compressed_tensors_pack_quantized_with_g_idx(tmp_path):
    """pack-quantized with `weight_g_idx` (actorder "group", written by compressed-tensors
    <= 0.11; today's library no longer writes or reads it). Built from GPTQModel's
    desc_act checkpoint by moving the same 4-bit codes, scales and g_idx into the
    compressed-tensors layout: our dequantization must equal GPTQModel's own."""
    import json

    from safetensors.torch import save_file

    from mixq.formats.packing import pack_int32, unpack_int32

    src = FIX / "tiny-llama" / "gptq-legacy-4bit-desc-act"
    cat = CheckpointCatalog(src)
    ref = load_file(str(src / "reference.safetensors"))
    tensors = {}
    for name in ref:
        w = cat.read(name)
        mod = name.removesuffix(".weight")
        n, k = w.shape
        q = unpack_int32(w.tensors["qweight"], 4, dim=0)[:k].t()  # [N, K], symmetric around 8
        assert not torch.equal(w.tensors["g_idx"].long(), torch.arange(k) // 32)  # a real act-order
        tensors.update({f"{mod}.weight_packed": pack_int32(q, 4, dim=1), f"{mod}.weight_scale": w.tensors["scales"].t().contiguous(),
                        f"{mod}.weight_g_idx": w.tensors["g_idx"], f"{mod}.weight_shape": torch.tensor([n, k])})
    save_file(tensors, str(tmp_path / "model.safetensors"))
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {
        "group_0": {"targets": ["Linear"], "input_activations": None, "weights": {
            "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32, "actorder": "group"}}},
        "ignore": ["lm_head"]}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    ct = CheckpointCatalog(tmp_path)
    for name, theirs in ref.items():
        w = ct.read(name)
        assert w.spec.layout == "ct-packed" and w.spec.act_order and "weight_g_idx" in w.tensors
        torch.testing.assert_close(w.dequantize(), theirs.float(), rtol=0, atol=0)  # small ints x fp16: exact
        # without g_idx the columns would take the wrong groups' scales
        plain = CheckpointCatalog(tmp_path).read(name)
        del plain.tensors["weight_g_idx"]
        assert not torch.equal(plain.dequantize(), theirs.float())
