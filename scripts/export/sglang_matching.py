"""Run SGLang's own compressed-tensors target/ignore matching on mixq exports.

SGLang 0.5.23's `compressed_tensors/utils.py` (should_ignore_layer, find_matched_target)
needs only `re`, torch and compressed-tensors, so it can run here without SGLang:

    pip download --no-deps --only-binary :all: sglang==0.5.23 -d /tmp/sgl
    unzip -o -d /tmp/sgl /tmp/sgl/sglang-0.5.23-*.whl \
        'sglang/srt/layers/quantization/compressed_tensors/utils.py'
    PYTHONPATH=. python scripts/export/sglang_matching.py \
        /tmp/sgl/sglang/srt/layers/quantization/compressed_tensors/utils.py /tmp/sgl-out

For each export (a dense mix, uniform MoE layers in Qwen3 and Mixtral naming, an all-BF16
MoE layer) it asks SGLang's functions, with the layer names SGLang builds (qkv_proj,
gate_up_proj, and '<moe>.0.gate_proj' probes for MoE layers), which scheme each module
gets, and checks it is the one the export wrote.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys

from torch import nn

from mixq.export import export_mix
from tests.test_export_mix import LLAMA_MIX, LLAMA_PATHS, MOE_MIX, MOE_PATHS, cfg_of

spec = importlib.util.spec_from_file_location("sglang_ct_utils", sys.argv[1])
U = importlib.util.module_from_spec(spec)
spec.loader.exec_module(U)
OUT = sys.argv[2]
FUSED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}


class QKVParallelLinear(nn.Module):
    """Stands in for SGLang's Linear classes (matched by name, never by class here)."""


class FusedMoE(nn.Module):
    """Stands in for SGLang's FusedMoE."""


def scheme_dict(qc: dict, layer_name: str, module: nn.Module) -> str | None:
    """SGLang's CompressedTensorsConfig.get_scheme_dict, through its own utils: the weight
    args of the target the layer matches (as JSON), None when ignored."""
    targets = {t: g for g in qc["config_groups"].values() for t in g["targets"]}
    if U.should_ignore_layer(layer_name, ignore=qc["ignore"], fused_mapping=FUSED):
        return None
    t = U.find_matched_target(layer_name=layer_name, module=module, targets=targets.keys(), fused_mapping=FUSED)
    return json.dumps(targets[t]["weights"], sort_keys=True)


def check(out: str, layers: int, moe: str | None, expert_leaves: tuple[str, ...] = ()) -> None:
    """Every Linear SGLang builds, and each MoE layer's probe, gets the scheme written."""
    qc = json.load(open(f"{out}/config.json"))["quantization_config"]
    written = {t: json.dumps(g["weights"], sort_keys=True) for g in qc["config_groups"].values() for t in g["targets"]}
    linears = [("self_attn.qkv_proj", "self_attn.q_proj"), ("self_attn.o_proj", "self_attn.o_proj")]
    if moe is None:
        linears += [("mlp.gate_up_proj", "mlp.gate_proj"), ("mlp.down_proj", "mlp.down_proj")]
    for n in range(layers):
        p = f"model.layers.{n}"
        for sglang_name, ckpt_name in linears:
            got = scheme_dict(qc, f"{p}.{sglang_name}", QKVParallelLinear())
            assert got == written.get(f"{p}.{ckpt_name}"), (out, sglang_name)
        if moe is not None:  # SGLang 0.5.23 probes expert 0's gate/up/down, by these names
            probes = {scheme_dict(qc, f"{p}.{moe}.0.{x}", FusedMoE()) for x in ("gate_proj", "up_proj", "down_proj")}
            experts = {written.get(f"{p}.{moe}.{e}.{x}") for e in range(4) for x in expert_leaves}
            assert len(probes) == 1 and probes == experts, (out, p)
    print(f"{out}: SGLang's matching gives every module the scheme the export wrote")


def run(cfg, out: str, **kw) -> None:
    shutil.rmtree(out, ignore_errors=True)
    export_mix(cfg, out, progress=False, log=lambda s: None, **kw)


def main() -> int:
    qwen_leaves = ("gate_proj", "up_proj", "down_proj")
    run(cfg_of("tiny-llama", LLAMA_MIX, **LLAMA_PATHS), f"{OUT}/dense", target="sglang")
    check(f"{OUT}/dense", 2, None)
    for mode in ("lower", "higher"):  # uniform INT4 experts; all-BF16 (ignored) experts
        run(cfg_of("tiny-qwen3-moe", MOE_MIX, **MOE_PATHS), f"{OUT}/qwen-{mode}", target="sglang", uniform=mode)
        check(f"{OUT}/qwen-{mode}", 2, "mlp.experts", qwen_leaves)
    mix = {"model.layers.0.block_sparse_moe.experts.*.weight": "int4", "model.layers.1.self_attn.*.weight": "int4"}
    run(cfg_of("tiny-mixtral", mix, int4_path="gptq-w4a16"), f"{OUT}/mixtral", target="sglang")
    check(f"{OUT}/mixtral", 2, "block_sparse_moe.experts", ("w1", "w3", "w2"))
    # the per-expert mix, written for compressed-tensors: SGLang sees expert 0 only, so
    # experts 1-3 (FP8, BF16, INT8) would load with expert 0's INT4 scheme
    run(cfg_of("tiny-qwen3-moe", MOE_MIX, **MOE_PATHS), f"{OUT}/per-expert")
    qc = json.load(open(f"{OUT}/per-expert/config.json"))["quantization_config"]
    probes = {scheme_dict(qc, f"model.layers.0.mlp.experts.0.{x}", FusedMoE()) for x in qwen_leaves}
    print(f"per-expert mix: SGLang resolves layer 0's experts to {len(probes)} scheme (expert 0's)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
