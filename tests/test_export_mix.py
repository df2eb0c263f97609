"""`mixq export` of real mixes: the export loaded back computes the same logits as the YAML
mix, transformers loads it to the same dense weights, `mixq inspect` shows the same
totals, and per-expert MoE mixes are written faithfully or refused for vLLM/SGLang."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from mixq.config.schema import MixedPrecisionConfig
from mixq.engine.model_runner import ModelRunner, SeqChunk
from mixq.errors import ConfigError
from mixq.export import export_mix
from mixq.formats import CheckpointCatalog, build_plan, load_weights
from mixq.inspect_plan import plan_report
from mixq.models import build_model, load_model_weights

FIX = Path(__file__).parent / "fixtures"


def cfg_of(model: str, mapping: dict, **paths: str) -> MixedPrecisionConfig:
    mp = {"fp16_path": str(FIX / model / "bf16"), **{k: str(FIX / model / v) for k, v in paths.items()},
          "weight_mapping": mapping}
    return MixedPrecisionConfig.from_dict({"mixed_precision": mp})


def export(cfg, out, **kw):
    return export_mix(cfg, out, progress=False, log=lambda s: None, **kw)


def logits_of(plan, prompts) -> torch.Tensor:
    """mixq's logits for the last token of each prompt (CPU, fp32, reference kernels)."""
    model = build_model(plan.model_config, "cpu")
    load_model_weights(model, load_weights(plan).values(), torch.float32)
    runner = ModelRunner(model, num_blocks=16, block_size=8, dtype=torch.float32, device="cpu")
    return runner.forward([SeqChunk(p, 0, [2 * i, 2 * i + 1]) for i, p in enumerate(prompts)])


PROMPTS = [[5, 17, 3, 99, 42, 7, 1, 64, 8], [11, 2, 77, 30]]
LLAMA_PATHS = dict(fp8_path="fp8-static", int8_path="w8a16-int8", int4_path="gptq-w4a16",
                   gptq_int4_path="gptq-legacy-4bit-asym", awq_int4_path="awq-gemm")
LLAMA_MIX = {
    "model.layers.0.self_attn.*_proj.weight": "fp8",  # static per-tensor activation scales
    "model.layers.0.self_attn.o_proj.weight": "int4",  # compressed-tensors W4A16
    "model.layers.0.mlp.*_proj.weight": "int8",  # weight-only INT8 -> pack-quantized 8-bit
    "model.layers.1.self_attn.*_proj.weight": "gptq_int4",  # GPTQ v1, asymmetric
    "model.layers.1.mlp.*_proj.weight": "awq_int4",  # AWQ GEMM; its smoothed norm comes along
    "model.layers.1.post_attention_layernorm.weight": "awq_int4",
}


def test_llama_mix_same_logits_and_same_totals_as_the_yaml(tmp_path, capsys):
    from mixq.cli import main

    cfg = cfg_of("tiny-llama", LLAMA_MIX, **LLAMA_PATHS)
    out = tmp_path / "out"
    report = export(cfg, out, target="vllm")  # every scheme here runs in vLLM and SGLang
    plan, back = build_plan(cfg), build_plan(model_path=str(out))
    assert {t.spec.family for t in plan.tensors.values()} == {"bf16", "fp8", "int4", "int8"}
    # GPTQ asym g64 and AWQ g64 are the same compressed-tensors scheme: one group
    assert sorted(report.groups) == [("float-quantized fp8 per-tensor a:static-tensor", 3),
                                     ("pack-quantized int4 g128", 1), ("pack-quantized int4 g64 asym", 7),
                                     ("pack-quantized int8 per-channel", 3)]
    assert not report.engine_refusals["sglang"]

    # the export computes exactly what the YAML mix computes
    assert torch.equal(logits_of(back, PROMPTS), logits_of(plan, PROMPTS))

    # `mixq inspect DIR` shows the YAML's totals per format (no symmetric GPTQ here)
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)["totals"]
    want = plan_report(plan)["totals"]
    assert shown["by_format"] == want["by_format"] and shown["memory_mb"] == want["memory_mb"]


def test_transformers_loads_the_export_to_mixqs_dense_weights(tmp_path):
    """transformers + compressed-tensors load the export (one scheme per module, by exact
    name) and decompress it to mixq's reference weights, bit for bit. Symmetric schemes
    only: transformers 5.25 with compressed-tensors 0.20 cannot load asymmetric
    pack-quantized zero points at all (llm-compressor's own AWQ output neither)."""
    from transformers import AutoModelForCausalLM

    mix = {"model.layers.0.self_attn.*_proj.weight": "fp8", "model.layers.0.self_attn.o_proj.weight": "int4",
           "model.layers.0.mlp.*_proj.weight": "int8", "model.layers.1.self_attn.*_proj.weight": "gptq_int4",
           "model.layers.1.mlp.*_proj.weight": "fp8"}
    cfg = cfg_of("tiny-llama", mix, fp8_path="fp8-block", int8_path="w8a16-int8", int4_path="gptq-w4a16",
                 gptq_int4_path="gptq-legacy-4bit-g-1")
    report = export(cfg, tmp_path / "out")
    assert len(report.groups) == 4
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert hf.model.layers[1].self_attn.q_proj.quantization_scheme.weights.strategy == "channel"
    hf.hf_quantizer.compressor.decompress_model(hf)
    state = hf.state_dict()
    plan = build_plan(cfg)
    for name, t in plan.tensors.items():
        assert torch.equal(state[name].float(), plan.catalog(t).read(name).dequantize()), name


def test_symmetric_gptq_totals_differ_by_exactly_the_zero_points_not_written(tmp_path):
    """compressed-tensors' symmetric schemes have no zero-point tensor (the zero is 2**(b-1)),
    so a symmetric GPTQ weight exports without its qzeros: the one byte difference."""
    cfg = cfg_of("tiny-llama", {"model.layers.*.self_attn.*_proj.weight": "gptq_int4"},
                 gptq_int4_path="gptq-legacy-4bit-desc-act")
    export(cfg, tmp_path / "out")
    plan = build_plan(cfg)
    want, got = (plan_report(p)["totals"]["by_format"] for p in (plan, build_plan(model_path=str(tmp_path / "out"))))
    src = CheckpointCatalog(FIX / "tiny-llama" / "gptq-legacy-4bit-desc-act").ckpt
    qzeros = sum(src.info(n.replace(".weight", ".qzeros")).nbytes for n, t in plan.tensors.items()
                 if t.spec.layout == "gptq")
    assert {k: v["tensors"] for k, v in want.items()} == {k: v["tensors"] for k, v in got.items()}
    assert want["bf16"] == got["bf16"]
    assert round((want["int4"]["memory_mb"] - got["int4"]["memory_mb"]) * 2**20) == qzeros > 0


MOE_PATHS = dict(fp8_path="fp8-dynamic", int8_path="w8a16-int8", gptq_int4_path="gptq-legacy-4bit",
                 int4_path="gptq-w4a16")
E0 = "model.layers.0.mlp.experts"
MOE_MIX = {
    f"{E0}.0.*.weight": "gptq_int4",
    f"{E0}.1.gate_proj.weight": "fp8", f"{E0}.1.up_proj.weight": "fp8", f"{E0}.1.down_proj.weight": "gptq_int4",
    f"{E0}.3.*.weight": "int8",  # expert 2 stays bf16
    "model.layers.1.mlp.experts.*.weight": "int4",  # a uniform layer
    "model.layers.0.self_attn.*_proj.weight": "fp8",
}


def test_moe_per_expert_mix_is_written_faithfully_and_refused_for_vllm_by_layer(tmp_path):
    cfg = cfg_of("tiny-qwen3-moe", MOE_MIX, **MOE_PATHS)
    report = export(cfg, tmp_path / "ct")  # --target compressed-tensors: every expert its own scheme
    plan, back = build_plan(cfg), build_plan(model_path=str(tmp_path / "ct"))
    for name, t in plan.tensors.items():
        assert torch.equal(back.catalog(back.tensors[name]).read(name).dequantize(),
                           plan.catalog(t).read(name).dequantize()), name
    kinds = [back.tensors[f"{E0}.{e}.{p}.weight"].spec.describe() for e in range(4) for p in ("gate_proj", "down_proj")]
    assert kinds == ["ct-packed int4 g64", "ct-packed int4 g64", "fp8 per-channel act:dynamic-token",
                     "ct-packed int4 g64", "bf16", "bf16", "ct-packed int8 per-channel", "ct-packed int8 per-channel"]
    assert torch.equal(logits_of(back, PROMPTS), logits_of(plan, PROMPTS))
    vllm = report.engine_refusals["vllm"]
    assert [r.where for r in vllm] == [E0] and vllm[0].moe_mix and "4 schemes" in vllm[0].reason

    for target in ("vllm", "sglang"):
        with pytest.raises(ConfigError, match=rf"(?s)--target {target}: .*--uniform-experts.*- {re.escape(E0)}: experts in 4"):
            export(cfg, tmp_path / target, target=target)
        assert not (tmp_path / target).exists()


@pytest.mark.parametrize("mode", ["higher", "lower"])
def test_uniform_experts_lifts_each_mixed_layer_to_one_source_and_reports_the_bytes(mode, tmp_path):
    cfg = cfg_of("tiny-qwen3-moe", MOE_MIX, **MOE_PATHS)
    printed = []
    report = export_mix(cfg, tmp_path / "out", target="vllm", uniform=mode, progress=False, log=printed.append)
    plan = build_plan(cfg)
    names = [n for n in plan.tensors if n.startswith(E0 + ".")]
    # the source with the most (fewest) bits among those layer 0 uses: the BF16 base (GPTQ int4)
    src = {"higher": FIX / "tiny-qwen3-moe" / "bf16", "lower": FIX / "tiny-qwen3-moe" / "gptq-legacy-4bit"}[mode]
    cat = CheckpointCatalog(src)
    delta = sum(cat.entries[n].nbytes for n in names) - sum(plan.tensors[n].nbytes for n in names)
    assert [(layer, d) for layer, _, d in report.uniform] == [(E0, delta)]
    sign = "+" if delta > 0 else "-"
    assert f"--uniform-experts: 1 MoE layer(s) lifted to one format, {sign}{abs(delta) / 2**20:.2f} MiB:" in printed[0]
    back = CheckpointCatalog(tmp_path / "out")
    for n in names:
        assert torch.equal(back.read(n).dequantize(), cat.read(n).dequantize()), n
    # vLLM and SGLang probe expert 0 of each MoE layer; every expert answers with one group
    qc = back.ckpt.quantization_config
    probes = [f"{E0}.0.{p}" for p in ("gate_proj", "up_proj", "down_proj")] + [f"{E0}.3.w1"]
    regex = "re:^" + E0.replace(".", r"\.") + r"\.\d+\.[^.]+$"
    if mode == "higher":
        assert regex in qc["ignore"] and all(n.removesuffix(".weight") in qc["ignore"] for n in names)
    else:
        holders = {g for g, grp in qc["config_groups"].items() for p in probes
                   if any(t == p or (t.startswith("re:") and re.match(t[3:], p)) for t in grp["targets"])}
        assert len(holders) == 1 and regex in qc["config_groups"][holders.pop()]["targets"]


def test_fused_projections_in_different_schemes_are_refused_for_engines(tmp_path):
    cfg = cfg_of("tiny-llama", {"model.layers.1.self_attn.q_proj.weight": "fp8", "model.layers.1.mlp.up_proj.weight": "fp8"},
                 fp8_path="fp8-dynamic")
    with pytest.raises(ConfigError) as e:
        export(cfg, tmp_path / "v", target="sglang")
    msg = str(e.value)
    fp8 = "float-quantized fp8 per-channel a:dynamic-token"
    assert f"- model.layers.1.self_attn: q_proj={fp8}, k_proj=bf16, v_proj=bf16: SGLang 0.5.23 fuses" in msg
    assert f"- model.layers.1.mlp: gate_proj=bf16, up_proj={fp8}: SGLang 0.5.23 fuses" in msg
    assert "--uniform-experts" not in msg  # nothing a flag can fix
    report = export(cfg, tmp_path / "ct")  # written as asked, with the engines' verdict printed
    assert len(report.engine_refusals["vllm"]) == 2


def test_awq_smoothing_is_folded_into_the_norm_its_linears_expect(tmp_path):
    """Every Linear fed by a norm comes from the AWQ checkpoint, which smoothed that norm:
    the export writes the AWQ checkpoint's norm (what its Linears were quantized for)."""
    cfg = cfg_of("tiny-llama", {"re:model\\.layers\\.\\d+\\..*_proj\\.weight": "awq_int4"}, awq_int4_path="awq-gemm")
    report = export(cfg, tmp_path / "out")
    assert len(report.notes) == 4  # two norms in each of two layers
    back, awq = CheckpointCatalog(tmp_path / "out"), CheckpointCatalog(FIX / "tiny-llama" / "awq-gemm")
    base = CheckpointCatalog(FIX / "tiny-llama" / "bf16")
    norm = "model.layers.0.input_layernorm.weight"
    assert torch.equal(back.read(norm).tensors["weight"], awq.read(norm).tensors["weight"])
    assert not torch.equal(back.read(norm).tensors["weight"], base.read(norm).tensors["weight"])
    # mixq computes the YAML mix as x * (norm_awq / norm_base) on the base norm: the same
    # function up to the rounding of that ratio
    torch.testing.assert_close(logits_of(build_plan(model_path=str(tmp_path / "out")), PROMPTS),
                               logits_of(build_plan(cfg), PROMPTS), rtol=1e-4, atol=1e-4)

    split = cfg_of("tiny-llama", {"re:model\\.layers\\.0\\.self_attn\\.[qk]_proj\\.weight": "awq_int4"},
                   awq_int4_path="awq-gemm")
    with pytest.raises(ConfigError, match=r"model\.layers\.0\.input_layernorm\.weight feeds .*v_proj \(fp16\)"):
        export(split, tmp_path / "split")
