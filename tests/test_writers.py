"""The RTN writers make real-format checkpoints: mixq's readers dequantize them to exactly
the grid an independent float64 RTN computes, compressed-tensors' own compressors
decompress them to the same values, every element is within half a quantization step
of the dense weight, and `mixq inspect` takes a mix of them."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from compressed_tensors.compressors.base import BaseCompressor
from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme

from mixq.formats import CheckpointCatalog
from mixq.formats.writers import fp8_tensors, quantize_checkpoint
from tests.header_bytes import header_shapes, module_bytes

# (hidden, intermediate): one model of whole 128-blocks, one with partial FP8 blocks
SHAPES = {"h128": (128, 256), "h192": (192, 320)}
# (writer format, writer options, reader layout)
CASES = {
    "fp8-channel": ("fp8", {"scheme": "channel"}, "fp8"),
    "fp8-tensor": ("fp8", {"scheme": "tensor"}, "fp8"),
    "fp8-block": ("fp8", {"scheme": "block"}, "fp8"),
    "int8-w8a8": ("int8", {}, "int8"),
    "int8-w8a16": ("int8", {"activations": False}, "ct-packed"),
    "gptq-sym": ("gptq", {"group_size": 64}, "gptq"),
    "gptq-asym": ("gptq", {"group_size": 64, "sym": False}, "gptq"),
    "gptq-8bit-channel": ("gptq", {"bits": 8, "group_size": -1}, "gptq"),
    "awq": ("awq", {"group_size": 64}, "awq"),
    "ct-int4-sym": ("ct-int4", {"group_size": 64}, "ct-packed"),
    "ct-int4-asym": ("ct-int4", {"group_size": 32, "sym": False}, "ct-packed"),
}
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")


@pytest.fixture(scope="module", params=list(SHAPES))
def model(request, tmp_path_factory):
    """A tiny random Llama saved by transformers in bf16 (with a tokenizer-free dir)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter = SHAPES[request.param]
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, max_position_embeddings=128)
    m = LlamaForCausalLM(cfg).to(torch.bfloat16)
    with torch.no_grad():  # weights of different spread per row, as in trained models
        for name, p in m.named_parameters():
            if p.dim() == 2 and ".layers." in name:
                p.mul_(torch.rand(p.shape[0], 1) * 4 + 0.1)
    root = tmp_path_factory.mktemp(request.param)
    m.save_pretrained(root / "bf16")
    return root


def _linear_names(root) -> list[str]:
    layers = json.loads((root / "bf16" / "config.json").read_text())["num_hidden_layers"]
    return [f"model.layers.{i}.{p}.weight" for i in range(layers) for p in LINEARS]


@pytest.fixture(scope="module")
def written(model):
    """case -> output dir, every case written once per model."""
    return {case: quantize_checkpoint(model / "bf16", model / case, fmt, **opts)
            for case, (fmt, opts, _) in CASES.items()}


# ------------------------------------------------------------ independent float64 RTN


def _round_up_to(s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """s (float64) stored in `dtype`, never below s (the writers' documented rounding)."""
    s = torch.maximum(s, torch.tensor(torch.finfo(dtype).tiny, dtype=torch.float64))
    r = s.to(dtype)
    low = r.double() < s
    r[low] = torch.nextafter(r[low], torch.tensor(float("inf"), dtype=dtype))
    return r.double()


def ref_int(w: torch.Tensor, bits: int, group: int, sym: bool, scale_dtype, min_zero: int = 0):
    """(dequantized [N, K], step [N, K]) of float64 RTN on the integer grid."""
    n, k = w.shape
    group = k if group == -1 else group
    g = w.double().reshape(n, k // group, group)
    qmax = 2**bits - 1
    if sym:
        s = _round_up_to(g.abs().amax(-1) * 2 / qmax, scale_dtype)
        z = torch.full_like(s, 2 ** (bits - 1))
    else:
        lo, hi = torch.clamp(g.amin(-1), max=0), torch.clamp(g.amax(-1), min=0)
        s = (hi - lo) / qmax
        if min_zero:
            s = torch.maximum(s, hi / (qmax - 1))
        s = _round_up_to(s, scale_dtype)
        z = torch.clamp(torch.round(-lo / s), min_zero, qmax)
    q = torch.clamp(torch.round(g / s[..., None]) + z[..., None], 0, qmax)
    step = s[..., None].expand_as(g)
    return ((q - z[..., None]) * s[..., None]).reshape(n, k), step.reshape(n, k)


def ref_fp8(w: torch.Tensor, scheme: str):
    """(dequantized, scale broadcast to [N, K]) of float64 FP8 RTN."""
    n, k = w.shape
    a = w.double().abs()
    if scheme == "tensor":
        s = _round_up_to(a.max().reshape(1, 1) / 448, torch.bfloat16).expand(n, k)
    elif scheme == "channel":
        s = _round_up_to(a.amax(1, keepdim=True) / 448, torch.bfloat16).expand(n, k)
    else:
        s = torch.empty(n, k, dtype=torch.float64)
        for i in range(0, n, 128):
            for j in range(0, k, 128):
                blk = a[i:i + 128, j:j + 128]
                s[i:i + 128, j:j + 128] = _round_up_to(blk.max().reshape(1) / 448, torch.bfloat16)[0]
    x = (w.double() / s).clamp(-448, 448).to(torch.float8_e4m3fn).double()
    return x * s, s


def reference(case: str, w: torch.Tensor):
    fmt, opts, _ = CASES[case]
    if fmt == "fp8":
        return ref_fp8(w, opts["scheme"])
    if fmt == "int8":
        return ref_int(w, 8, -1, True, torch.bfloat16)
    if fmt == "gptq":
        sym = opts.get("sym", True)
        return ref_int(w, opts.get("bits", 4), opts["group_size"], sym, torch.float16, min_zero=0 if sym else 1)
    if fmt == "awq":
        return ref_int(w, 4, opts["group_size"], False, torch.float16)
    return ref_int(w, 4, opts["group_size"], opts.get("sym", True), torch.bfloat16)


def half_step(case: str, w: torch.Tensor, deq: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """Elements whose error exceeds half a quantization step (FP8: half an e4m3 ulp)."""
    err = (deq - w.double()).abs()
    if CASES[case][0] == "fp8":
        x = (w.double() / step).abs().clamp(min=2**-6)  # below 2**-6: subnormal ulp 2**-9
        ulp = 2.0 ** (torch.floor(torch.log2(x)) - 3)
        return err > 0.5 * ulp * step * (1 + 1e-9)
    return err > 0.5 * step * (1 + 1e-9)


# ------------------------------------------------------------------------ tests


@pytest.mark.parametrize("case", list(CASES))
def test_reader_dequantizes_to_the_independent_rtn_within_half_a_step(model, written, case):
    cat, dense = CheckpointCatalog(written[case]), CheckpointCatalog(model / "bf16")
    layout = CASES[case][2]
    for name in _linear_names(model):
        qw = cat.read(name)
        assert qw.spec.layout == layout, name
        w = dense.read(name).tensors["weight"]
        ref, step = reference(case, w)
        got = qw.dequantize().double()
        assert got.shape == w.shape
        assert torch.equal(got, ref), f"{case} {name}: {(got != ref).sum()} elements off the RTN grid"
        assert not half_step(case, w, got, step).any(), f"{case} {name}: error above half a step"
    # everything else is copied untouched
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        assert torch.equal(cat.ckpt.read(name), dense.ckpt.read(name))


# compressed-tensors case -> (llm-compressor preset of the same scheme, weight fields that differ)
PRESETS = {
    "fp8-channel": ("FP8_DYNAMIC", {}),
    "fp8-tensor": ("FP8_DYNAMIC", {"strategy": "tensor"}),
    "fp8-block": ("FP8_BLOCK", {}),
    "int8-w8a8": ("W8A8", {}),
    "int8-w8a16": ("W8A16", {"strategy": "channel", "group_size": None}),
    "ct-int4-sym": ("W4A16", {"group_size": 64}),
    "ct-int4-asym": ("W4A16_ASYM", {"group_size": 32}),
}


def _meaning(args) -> tuple | None:
    """The fields of QuantizationArgs that decide the stored values."""
    if args is None:
        return None
    return (args.num_bits, args.type, args.symmetric, args.group_size, args.strategy, args.block_structure,
            args.dynamic, args.actorder)


@pytest.mark.parametrize("case", list(PRESETS))
def test_compressed_tensors_library_decompresses_to_our_values(model, written, case):
    cat = CheckpointCatalog(written[case])
    qc = cat.ckpt.quantization_config
    # compressed-tensors validates the config, and it means to the library what the
    # llm-compressor preset of this scheme means (how each release dumps defaults differs)
    core = {k: v for k, v in qc.items() if k not in ("version", "sparsity_config", "transform_config")}
    parsed = QuantizationConfig.model_validate(core)
    assert parsed.format == qc["format"] and parsed.ignore == ["lm_head"]
    scheme = parsed.config_groups["group_0"]
    preset, overrides = PRESETS[case]
    want = preset_name_to_scheme(preset, ["Linear"])
    for k, v in overrides.items():
        setattr(want.weights, k, v)
    assert _meaning(scheme.weights) == _meaning(want.weights), case
    assert _meaning(scheme.input_activations) == _meaning(want.input_activations), case
    compressor = BaseCompressor.get_value_from_registry(qc["format"])
    for name in _linear_names(model):
        mod = name.removesuffix(".weight")
        local = {k.removeprefix(mod + "."): cat.ckpt.read(k) for k in cat.ckpt.tensors if k.startswith(mod + ".")}
        theirs = compressor.decompress(local, scheme)["weight"]
        ours = cat.read(name).dequantize()
        # they multiply in the scale's dtype (bf16): our exact product, rounded the same
        assert torch.equal(ours.to(theirs.dtype), theirs), f"{case} {name}"


def test_quantization_configs_are_the_tools_own(written):
    gptq = json.loads((written["gptq-sym"] / "config.json").read_text())["quantization_config"]
    assert gptq["quant_method"] == "gptq" and gptq["checkpoint_format"] == "gptq"
    assert (gptq["bits"], gptq["group_size"], gptq["sym"], gptq["desc_act"]) == (4, 64, True, False)
    assert json.loads((written["gptq-sym"] / "quantize_config.json").read_text()) == gptq
    awq = json.loads((written["awq"] / "config.json").read_text())["quantization_config"]
    assert awq == {"quant_method": "awq", "zero_point": True, "group_size": 64, "bits": 4, "version": "gemm",
                   "modules_to_not_convert": None}
    fp8 = json.loads((written["fp8-block"] / "config.json").read_text())["quantization_config"]
    g = fp8["config_groups"]["group_0"]
    assert g["weights"]["block_structure"] == [128, 128] and g["input_activations"]["group_size"] == 128
    assert fp8["ignore"] == ["lm_head"] and fp8["format"] == "float-quantized"
    w8a16 = json.loads((written["int8-w8a16"] / "config.json").read_text())["quantization_config"]
    assert w8a16["format"] == "pack-quantized" and w8a16["config_groups"]["group_0"]["input_activations"] is None


def test_sharded_output_reads_like_one_file(model, written):
    out = quantize_checkpoint(model / "bf16", model / "gptq-sharded", "gptq", group_size=64, shard_bytes=100_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    one, many = CheckpointCatalog(written["gptq-sym"]), CheckpointCatalog(out)
    assert one.entries.keys() == many.entries.keys()
    for name in _linear_names(model):
        assert torch.equal(one.read(name).dequantize(), many.read(name).dequantize())


def test_writers_refuse_bad_input(model, written):
    with pytest.raises(ValueError, match="unknown format"):
        quantize_checkpoint(model / "bf16", model / "x", "int3")
    with pytest.raises(ValueError, match="already quantized"):
        quantize_checkpoint(written["awq"], model / "y", "gptq")
    with pytest.raises(ValueError, match="already holds a checkpoint"):
        quantize_checkpoint(model / "bf16", written["awq"], "awq")
    with pytest.raises(ValueError, match="fp8 scheme"):
        quantize_checkpoint(model / "bf16", model / "z", "fp8", scheme="row")
    with pytest.raises(ValueError, match="multiple of group size"):
        quantize_checkpoint(model / "bf16", model / "w", "gptq", group_size=100)


def test_fp8_block_scales_cover_partial_blocks():
    w = torch.randn(200, 300, dtype=torch.bfloat16)
    t = fp8_tensors("m", w, scheme="block")
    assert t["m.weight_scale"].shape == (2, 3)
    deq, _ = ref_fp8(w, "block")
    s = t["m.weight_scale"].float().repeat_interleave(128, 0)[:200].repeat_interleave(128, 1)[:, :300]
    assert torch.equal(t["m.weight"].float().double() * s.double(), deq)


def test_inspect_a_mix_of_written_checkpoints(model, written, tmp_path, capsys):
    from mixq.cli import main

    cfg = {"mixed_precision": {
        "fp16_path": str(model / "bf16"), "fp8_path": str(written["fp8-channel"]),
        "int8_path": str(written["int8-w8a8"]), "gptq_int4_path": str(written["gptq-sym"]),
        "awq_int4_path": str(written["awq"]),
        "weight_mapping": {"model.layers.*.mlp.down_proj.weight": "fp8",
                           "model.layers.*.mlp.gate_proj.weight": "gptq_int4",
                           "model.layers.0.mlp.up_proj.weight": "gptq_int4",
                           "model.layers.1.mlp.up_proj.weight": "awq_int4",
                           "model.layers.1.mlp.down_proj.weight": "awq_int4",
                           "model.layers.0.self_attn.o_proj.weight": "int8"}}}
    path = tmp_path / "mix.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["inspect", "--mixed-precision-config", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    text = json.dumps(report)
    for fmt in ("fp8", "int8", "gptq", "awq"):
        assert fmt in text, fmt
    # per-format bytes from the written files' safetensors headers, the mapping resolved by
    # hand (an exact name beats a pattern): a GPTQ g_idx without act-order is dropped
    base = header_shapes(model / "bf16")
    source = {"model.layers.0.mlp.down_proj.weight": ("fp8", written["fp8-channel"], ()),
              "model.layers.0.self_attn.o_proj.weight": ("int8", written["int8-w8a8"], ())}
    for i in (0, 1):
        source[f"model.layers.{i}.mlp.gate_proj.weight"] = ("int4", written["gptq-sym"], ("g_idx",))
    source["model.layers.0.mlp.up_proj.weight"] = ("int4", written["gptq-sym"], ("g_idx",))
    for name in ("model.layers.1.mlp.up_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        source[name] = ("int4", written["awq"], ())
    want = {"bf16": 0, "fp8": 0, "int4": 0, "int8": 0}
    for name, (_, shape) in base.items():
        if name in source:
            fam, ckpt, drop = source[name]
            want[fam] += module_bytes(ckpt, name, drop)
        else:
            want["bf16"] += 2 * math.prod(shape)
    totals = report["totals"]
    assert {k: round(v["memory_mb"] * 2**20) for k, v in totals["by_format"].items()} == want
    bf16 = sum(2 * math.prod(shape) for _, shape in base.values())
    assert totals["compression_ratio"] == pytest.approx(bf16 / sum(want.values()), rel=1e-12)
    assert main(["inspect", "--mixed-precision-config", str(path)]) == 0
    assert "awq" in capsys.readouterr().out
