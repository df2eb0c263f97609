"""Every config/plan error of a real YAML file names its culprits: the config file, the
mapping key (or path key), the tensor, and the checkpoint file or directory involved."""

from __future__ import annotations

import pytest
import torch
import yaml

from mixq.config.schema import MixedPrecisionConfig
from mixq.errors import MixqError
from mixq.formats import build_plan
from tests.ckpt_utils import dense_tensors, llama_config, quantize_checkpoint, write_checkpoint

CFG = llama_config(hidden=64, inter=128, layers=2)
GATE1 = "model.layers.1.mlp.gate_proj.weight"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("errs")
    dense = dense_tensors(CFG)
    write_checkpoint(root / "bf16", dense, CFG, shards=2)
    tensors, qc = quantize_checkpoint(dense, "ct-fp8")
    write_checkpoint(root / "fp8", tensors, CFG, qc)
    # an FP8 checkpoint without layer 1's gate_proj
    write_checkpoint(root / "fp8-partial", {k: v for k, v in tensors.items() if not k.startswith(GATE1[:-7])}, CFG, qc)
    # an FP8 checkpoint of a model with another intermediate size
    other = llama_config(hidden=64, inter=96, layers=2)
    tensors, qc = quantize_checkpoint(dense_tensors(other), "ct-fp8")
    write_checkpoint(root / "fp8-other", tensors, other, qc)
    tensors, qc = quantize_checkpoint(dense, "awq", group=32)
    write_checkpoint(root / "awq", tensors, CFG, qc)
    # unreadable checkpoints: a corrupt safetensors file; a directory without config.json
    (root / "corrupt").mkdir()
    (root / "corrupt" / "config.json").write_text("{}")
    (root / "corrupt" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header")
    (root / "noconfig").mkdir()
    (root / "noconfig" / "model.safetensors").write_bytes((root / "fp8" / "model.safetensors").read_bytes())
    return root


# case -> (mixed_precision section with ROOT for the fixture dir, fragments the message must hold)
CASES = {
    "tie": ({"fp8_path": "ROOT/fp8", "awq_int4_path": "ROOT/awq",
             "weight_mapping": {"model.layers.*.mlp.gate_proj.weight": "fp8", "model.layers.1.mlp.gate_proj.weigh?": "awq_int4"}},
            ["'model.layers.*.mlp.gate_proj.weight'", "'model.layers.1.mlp.gate_proj.weigh?'", f"'{GATE1}'",
             "equal specificity"]),
    "pattern-matches-nothing": ({"fp8_path": "ROOT/fp8", "weight_mapping": {"model.layers.*.mlp.gate.weight": "fp8"}},
                                ["weight_mapping['model.layers.*.mlp.gate.weight']", "pattern matches no tensor",
                                 "ROOT/bf16"]),
    "exact-key-matches-nothing": ({"fp8_path": "ROOT/fp8", "weight_mapping": {"model.layers.7.mlp.up_proj.weight": "fp8"}},
                                  ["weight_mapping['model.layers.7.mlp.up_proj.weight']", "no such tensor", "ROOT/bf16"]),
    "unknown-precision": ({"weight_mapping": {GATE1: "fp4"}}, [f"weight_mapping['{GATE1}']", "unknown precision 'fp4'"]),
    "precision-path-unset": ({"weight_mapping": {GATE1: "int8"}}, [f"weight_mapping['{GATE1}']", "int8_path is not set"]),
    "missing-path": ({"fp8_path": "ROOT/nope", "weight_mapping": {GATE1: "fp8"}},
                     ["mixed_precision.fp8_path", "ROOT/nope", "is not a directory"]),
    "unreadable-path": ({"fp8_path": "ROOT/corrupt", "weight_mapping": {GATE1: "fp8"}},
                        ["mixed_precision.fp8_path", "ROOT/corrupt/model.safetensors", "cannot open"]),
    "no-config-json": ({"fp8_path": "ROOT/noconfig", "weight_mapping": {GATE1: "fp8"}},
                       ["mixed_precision.fp8_path", "ROOT/noconfig", "missing config.json"]),
    "tensor-absent": ({"fp8_path": "ROOT/fp8-partial", "weight_mapping": {"model.layers.*.mlp.gate_proj.weight": "fp8"}},
                      ["weight_mapping['model.layers.*.mlp.gate_proj.weight']", f"'{GATE1}'", "ROOT/fp8-partial",
                       "mixed_precision.fp8_path"]),
    "shape-mismatch": ({"fp8_path": "ROOT/fp8-other", "weight_mapping": {GATE1: "fp8"}},
                       [f"weight_mapping['{GATE1}']", f"'{GATE1}'", "[96, 64] in ROOT/fp8-other/model.safetensors",
                        "[128, 64] in the base ROOT/bf16/model-0000"]),
    "wrong-format-for-precision": ({"gptq_int4_path": "ROOT/awq", "weight_mapping": {GATE1: "gptq_int4"}},
                                   [f"weight_mapping['{GATE1}']", f"'{GATE1}'", "ROOT/awq/model.safetensors",
                                    "awq int4 g32", "mixed_precision.gptq_int4_path"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_error_names_key_tensor_and_file(root, tmp_path, case):
    section, fragments = CASES[case]
    text = yaml.safe_dump({"mixed_precision": {"fp16_path": "ROOT/bf16", **section}}).replace("ROOT", str(root))
    path = tmp_path / f"{case}.yaml"
    path.write_text(text)
    with pytest.raises(MixqError) as e:
        build_plan(MixedPrecisionConfig.from_yaml(path))
    msg = str(e.value)
    assert f"mixed-precision config {path}" in msg, msg
    for f in fragments:
        assert f.replace("ROOT", str(root)) in msg, (f, msg)
    assert "\n" not in msg  # one line


def test_the_fixture_checkpoints_themselves_are_fine(root):
    """The error cases above fail for their one reason: the same files load otherwise."""
    cfg = MixedPrecisionConfig.from_dict({"mixed_precision": {
        "fp16_path": str(root / "bf16"), "fp8_path": str(root / "fp8"), "awq_int4_path": str(root / "awq"),
        "weight_mapping": {"model.layers.*.mlp.gate_proj.weight": "fp8", "model.layers.0.mlp.up_proj.weight": "awq_int4",
                           "model.layers.0.mlp.down_proj.weight": "awq_int4"}}})
    plan = build_plan(cfg)
    assert plan.tensors[GATE1].spec.dtype == torch.float8_e4m3fn
