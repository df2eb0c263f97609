"""`mixq export` on checkpoints made by llm-compressor and GPTQModel (tests/fixtures): every
stored format survives the conversion to compressed-tensors bit for bit.

Three independent readings of each exported weight must agree: mixq's reader of the
export against mixq's reader of the source (bit-identical dequantize), compressed-tensors'
own decompression of the export against the source, and, where the fixture ships one,
GPTQModel's own dequantization (reference.safetensors) against the export."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from compressed_tensors.compressors.base import BaseCompressor
from compressed_tensors.quantization import QuantizationScheme
from safetensors.torch import load_file

from mixq.config.schema import MixedPrecisionConfig
from mixq.export import export_mix
from mixq.formats import CheckpointCatalog, build_plan

FIX = Path(__file__).parent / "fixtures"
LINEARS = r"re:model\.layers\.\d+\..*(_proj|\.w[123])\.weight"
# fixture -> (path key, precision)
SOURCES = {
    "fp8-dynamic": ("fp8_path", "fp8"), "fp8-static": ("fp8_path", "fp8"), "fp8-block": ("fp8_path", "fp8"),
    "fp8-block-deepseek": ("fp8_path", "fp8"), "w8a8-int8": ("int8_path", "int8"),
    "w8a16-int8": ("int8_path", "int8"), "gptq-legacy-8bit": ("int8_path", "int8"),
    "gptq-w4a16": ("int4_path", "int4"), "gptq-w4a16-asym-actorder": ("int4_path", "int4"),
    "awq-w4a16": ("awq_int4_path", "awq_int4"), "gptq-legacy-4bit-asym": ("gptq_int4_path", "gptq_int4"),
    "gptq-legacy-4bit-desc-act": ("gptq_int4_path", "gptq_int4"), "gptq-legacy-4bit-g-1": ("gptq_int4_path", "gptq_int4"),
    "gptq-legacy-4bit": ("gptq_int4_path", "gptq_int4"), "awq-gemm": ("awq_int4_path", "awq_int4"),
}
CASES = [("tiny-llama", v) for v in (
    "fp8-dynamic", "fp8-static", "fp8-block", "fp8-block-deepseek", "w8a8-int8", "w8a16-int8", "gptq-legacy-8bit",
    "gptq-w4a16", "gptq-w4a16-asym-actorder", "awq-w4a16", "gptq-legacy-4bit-asym", "gptq-legacy-4bit-desc-act",
    "gptq-legacy-4bit-g-1", "awq-gemm")] + [
    # MoE expert naming (Qwen3 and Mixtral); the other MoE sources are exported, expert by
    # expert, in test_export_mix.py
    ("tiny-qwen3-moe", "awq-gemm"), ("tiny-mixtral", "gptq-w4a16")]


def single_source_config(model: str, variant: str) -> MixedPrecisionConfig:
    """Every decoder Linear from `variant`, the rest from the BF16 base. The AWQ sources
    smoothed their norms (and the MoE router reads the same norm), so those come along."""
    key, precision = SOURCES[variant]
    mapping = {LINEARS: precision}
    if variant.startswith("awq"):
        mapping["re:model\\.layers\\.\\d+\\..*layernorm\\.weight"] = precision
        if model == "tiny-qwen3-moe":
            mapping["model.layers.*.mlp.gate.weight"] = precision
    mp = {"fp16_path": str(FIX / model / "bf16"), key: str(FIX / model / variant), "weight_mapping": mapping}
    return MixedPrecisionConfig.from_dict({"mixed_precision": mp})


def export(cfg, out, **kw):
    return export_mix(cfg, out, progress=False, log=lambda s: None, **kw)


def ct_decompress(ckpt_dir: Path, cat: CheckpointCatalog, module: str) -> torch.Tensor | None:
    """compressed-tensors' own decompression of one exported module (None: a scheme the
    installed compressed-tensors no longer parses, i.e. act-order 'group')."""
    qc = cat.ckpt.quantization_config
    group = next(g for g in qc["config_groups"].values() if module in g["targets"])
    if group["weights"].get("actorder") == "group":
        return None
    scheme = QuantizationScheme.model_validate(group)
    local = {t.removeprefix(module + "."): cat.ckpt.read(t) for t in cat.ckpt.tensors if t.startswith(module + ".")}
    return BaseCompressor.get_value_from_registry(group["format"]).decompress(local, scheme)["weight"]


@pytest.mark.parametrize("model,variant", CASES, ids=[f"{m}/{v}" for m, v in CASES])
def test_every_fixture_format_round_trips_exactly(model, variant, tmp_path):
    cfg = single_source_config(model, variant)
    export(cfg, tmp_path / "out")
    plan = build_plan(cfg)  # the mix as mixq loads it from the YAML, built independently
    back = CheckpointCatalog(tmp_path / "out")
    assert set(back.entries) == set(plan.tensors)
    quantized = 0
    for name, t in plan.tensors.items():
        src = plan.catalog(t).read(name)
        got = back.read(name)
        if not t.spec.is_quantized:
            assert got.spec == t.spec and torch.equal(got.tensors["weight"], src.tensors["weight"]), name
            continue
        quantized += 1
        s, g = t.spec, got.spec
        assert (g.family, g.bits, g.group_size, g.block_size, g.symmetric, g.activation) == (
            s.family, s.bits, s.group_size, s.block_size, s.symmetric, s.activation), name
        ours = src.dequantize()
        assert torch.equal(got.dequantize(), ours), name  # bit-identical, every element
        theirs = ct_decompress(tmp_path / "out", back, name.removesuffix(".weight"))
        if theirs is not None:
            # compressed-tensors multiplies in the scale's dtype: one rounding of the exact
            # product, the same rounding our fp32 result takes when cast to that dtype
            assert torch.equal(ours.to(theirs.dtype), theirs), name
        else:
            assert g.act_order and variant == "gptq-legacy-4bit-desc-act", name
    assert quantized >= 14
    ref = FIX / model / variant / "reference.safetensors"
    if ref.is_file():  # GPTQModel's own dequantization of two of its tensors
        for name, theirs in load_file(str(ref)).items():
            assert torch.equal(back.read(name).dequantize(), theirs.float()), name


def test_act_order_keeps_its_g_idx_and_trivial_g_idx_is_dropped(tmp_path):
    """desc_act GPTQ -> pack-quantized with weight_g_idx (actorder 'group'); a g_idx equal
    to k // group_size carries no information and is not written."""
    cfg = single_source_config("tiny-llama", "gptq-legacy-4bit-desc-act")
    export(cfg, tmp_path / "out")
    back = CheckpointCatalog(tmp_path / "out")
    src = CheckpointCatalog(FIX / "tiny-llama" / "gptq-legacy-4bit-desc-act")
    name = "model.layers.1.mlp.down_proj.weight"
    w = back.read(name)
    assert w.spec.act_order and torch.equal(w.tensors["weight_g_idx"], src.read(name).tensors["g_idx"])
    group = next(g for g in back.ckpt.quantization_config["config_groups"].values()
                 if "model.layers.1.mlp.down_proj" in g["targets"])
    assert group["weights"]["actorder"] == "group" and group["format"] == "pack-quantized"
    # without the g_idx the columns would take other groups' scales
    plain = back.read(name)
    del plain.tensors["weight_g_idx"]
    assert not torch.equal(plain.dequantize(), w.dequantize())

    cfg = single_source_config("tiny-llama", "gptq-legacy-4bit-asym")  # stores the trivial g_idx
    export(cfg, tmp_path / "plain")
    back = CheckpointCatalog(tmp_path / "plain")
    assert not any(t.endswith("weight_g_idx") for t in back.ckpt.tensors)
    assert all(g["weights"]["actorder"] is None for g in back.ckpt.quantization_config["config_groups"].values())
