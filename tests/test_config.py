"""The mixed-precision YAML: parsing, validation errors that name the key, resolution."""

from __future__ import annotations

import textwrap

import pytest

from mixq.config.resolve import PrecisionResolver, compile_rule
from mixq.config.schema import MixedPrecisionConfig
from mixq.errors import ConfigError


@pytest.fixture
def dirs(tmp_path):
    for d in ("bf16", "fp8", "gptq", "awq", "int8", "int4"):
        (tmp_path / d).mkdir()
    return tmp_path


def write(tmp_path, text):
    p = tmp_path / "cfg.yaml"
    p.write_text(textwrap.dedent(text))
    return p


def test_parses_the_mission_example(dirs):
    p = write(dirs, f"""
        mixed_precision:
          fp16_path: {dirs}/bf16
          fp8_path: {dirs}/fp8
          int4_path: {dirs}/gptq
          weight_mapping:
            "model.layers.0.self_attn.q_proj.weight": "fp16"
            "model.layers.*.mlp.gate_proj.weight": "fp8"
            "model.layers.*.mlp.experts.*.down_proj.weight": "gptq_int4"
        inference: {{max_seq_length: 4096, max_batch_size: 32, dtype: bfloat16}}
        server: {{host: 127.0.0.1, port: 8080}}
    """)
    cfg = MixedPrecisionConfig.from_yaml(p)
    mp = cfg.mixed_precision
    assert mp.fp16_path == str(dirs / "bf16")
    assert mp.path_key_for("gptq_int4") == "int4_path"  # falls back to the generic int4 checkpoint
    assert mp.path_key_for("fp16") == mp.path_key_for("bf16") == "fp16_path"
    assert cfg.inference.max_seq_length == 4096 and cfg.inference.dtype == "bfloat16"
    assert cfg.server.port == 8080 and cfg.server.host == "127.0.0.1"


def test_relative_paths_resolve_against_the_file_and_model_path_is_the_default_base(dirs):
    p = write(dirs, """
        mixed_precision:
          fp8_path: fp8
          weight_mapping: {"a.weight": fp8}
    """)
    cfg = MixedPrecisionConfig.from_yaml(p, model_path=str(dirs / "bf16"))
    assert cfg.mixed_precision.fp8_path == str(dirs / "fp8")
    assert cfg.mixed_precision.fp16_path == str(dirs / "bf16")


@pytest.mark.parametrize(
    "body, message",
    [
        ("mixed_precision: {fp16_path: BF16, fp8_pth: FP8}", "unknown key 'mixed_precision.fp8_pth'"),
        ("mixed_precision: {fp16_path: BF16}\nservr: {port: 1}", "unknown key 'servr'"),
        ("mixed_precision: {fp16_path: BF16, weight_mapping: {'x.weight': fp4}}",
         "weight_mapping['x.weight']: unknown precision 'fp4'"),
        ("mixed_precision: {fp16_path: BF16, weight_mapping: {'x.weight': fp8}}",
         "weight_mapping['x.weight']: mixed_precision: precision 'fp8' is used in weight_mapping but fp8_path is not set"),
        ("mixed_precision: {fp16_path: BF16, weight_mapping: {'x.weight': awq_int4}}",
         "awq_int4_path or int4_path is not set"),
        ("mixed_precision: {fp16_path: BF16, fp8_path: NOPE}", "mixed_precision.fp8_path: 'NOPE/nope' is not a directory"),
        ("mixed_precision: {fp16_path: BF16}\nserver: {port: 70000}", "server.port: Input should be less than or equal to 65535"),
        ("mixed_precision: {fp16_path: BF16}\ninference: {dtype: int3}", "inference.dtype"),
        ("inference: {dtype: bfloat16}", "missing key 'mixed_precision'"),
        ("mixed_precision: {weight_mapping: {}}", "fp16_path (the base checkpoint) is not set"),
        ("mixed_precision: [1, 2", "invalid YAML"),
    ],
)
def test_invalid_configs_name_the_culprit(dirs, body, message):
    body = body.replace("BF16", str(dirs / "bf16")).replace("FP8", str(dirs / "fp8")).replace("NOPE", "NOPE/nope")
    p = write(dirs, body)
    with pytest.raises(ConfigError) as e:
        MixedPrecisionConfig.from_yaml(p)
    assert message in str(e.value)
    assert str(p) in str(e.value)


def test_unreadable_config_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        MixedPrecisionConfig.from_yaml(tmp_path / "missing.yaml")


NAMES = [f"model.layers.{i}.{m}.weight" for i in range(12) for m in ("self_attn.q_proj", "mlp.gate_proj", "mlp.down_proj")]


def test_exact_beats_pattern_beats_base():
    r = PrecisionResolver({
        "model.layers.*.mlp.*": "int4",
        "model.layers.*.mlp.down_proj.weight": "fp8",
        "model.layers.3.mlp.down_proj.weight": "bf16",
        "re:model\\.layers\\.1[01]\\.self_attn\\..*": "int8",
    })
    res = r.resolve_all(NAMES)
    assert res["model.layers.3.mlp.down_proj.weight"].precision == "bf16"
    assert res["model.layers.4.mlp.down_proj.weight"].precision == "fp8"
    assert res["model.layers.4.mlp.down_proj.weight"].rule == "model.layers.*.mlp.down_proj.weight"
    assert res["model.layers.4.mlp.gate_proj.weight"].precision == "int4"
    assert res["model.layers.10.self_attn.q_proj.weight"].precision == "int8"
    assert res["model.layers.9.self_attn.q_proj.weight"].precision == "fp16"
    assert res["model.layers.9.self_attn.q_proj.weight"].rule is None


def test_tie_between_patterns_with_different_precisions_is_an_error():
    a, b = "model.layers.*.mlp.gate_proj.weight", "model.layers.1.mlp.gate_proj.weigh?"
    assert compile_rule(a, "fp8").specificity == compile_rule(b, "int4").specificity == 34
    r = PrecisionResolver({a: "fp8", b: "int4"})
    with pytest.raises(ConfigError, match="model.layers.1.mlp.gate_proj.weight.*equal specificity"):
        r.resolve_all(NAMES)
    # the same precision from both is not ambiguous
    same = PrecisionResolver({a: "fp8", b: "fp8"})
    assert same.resolve("model.layers.1.mlp.gate_proj.weight").precision == "fp8"


@pytest.mark.parametrize("key", ["model.layers.99.mlp.down_proj.weight", "model.layers.*.mlp.up_proj.weight",
                                 "re:.*experts.*"])
def test_keys_matching_nothing_are_errors(key):
    with pytest.raises(ConfigError, match=f"weight_mapping\\[{key!r}\\]".replace("*", "\\*").replace(".", "\\.")):
        PrecisionResolver({key: "fp8"}).resolve_all(NAMES)


def test_bad_regex_names_the_key():
    with pytest.raises(ConfigError, match=r"weight_mapping\['re:model\.\(' \]|invalid regular expression"):
        PrecisionResolver({"re:model.(": "fp8"})
