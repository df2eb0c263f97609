"""--load-format dummy (mixq.models.dummy): random weights in real formats, no checkpoint.

The tensor list is the model's own, checked against the fixtures' real checkpoints (names
and shapes); the weights in each mapped format compute what HF transformers computes on
their dequantization (the formats' own readers); a whole engine serves from a directory
holding only config.json and tokenizer files; what it refuses names the cause."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from mixq.engine.engine import LLM
from mixq.engine.model_runner import ModelRunner, SeqChunk
from mixq.errors import ConfigError
from mixq.formats.registry import reader_for_layout
from mixq.models import build_model, load_model_weights
from mixq.models.dummy import dummy_weights, model_tensors
from mixq.tracking.memory import get_mixed_precision_memory_stats
from tests.test_models_hf import hf_logits

FIX = Path(__file__).parents[1] / "fixtures"


def checkpoint_tensors(path: Path) -> dict[str, tuple[int, ...]]:
    out = {}
    for f in path.glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            out.update({k: tuple(h.get_slice(k).get_shape()) for k in h.keys()})
    return out


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-qwen3-moe", "tiny-mixtral"])
def test_tensor_list_is_a_real_checkpoints(model):
    cfg = json.loads((FIX / model / "bf16" / "config.json").read_text())
    tensors = model_tensors(build_model(cfg, "meta"))
    assert {n: shape for n, (shape, _) in tensors.items()} == checkpoint_tensors(FIX / model / "bf16")
    # norms start at one; everything else (MoE routers included) is random
    for n, (_, kind) in tensors.items():
        assert (kind == "norm") == n.rsplit(".", 2)[-2].endswith("norm"), (n, kind)
    if "moe" in model:
        assert tensors["model.layers.0.mlp.gate.weight"][1] == "linear"


MIXES = [
    ({"model.layers.*.mlp.*_proj.weight": "int4", "model.layers.*.self_attn.*_proj.weight": "fp8",
      "model.layers.1.self_attn.o_proj.weight": "bf16"}, {"mlp": "gptq", "self_attn": "fp8"}),
    ({"model.layers.*.mlp.*_proj.weight": "awq_int4", "model.layers.*.self_attn.*_proj.weight": "int8",
      "model.layers.1.self_attn.o_proj.weight": "fp16"}, {"mlp": "awq", "self_attn": "int8"}),
]


@pytest.mark.parametrize("mapping,layouts_by_block", MIXES)
def test_mapped_formats_compute_what_hf_computes_on_their_dequantization(mapping, layouts_by_block):
    import transformers

    cfg = json.loads((FIX / "tiny-llama" / "bf16" / "config.json").read_text())
    model = build_model(cfg, "cpu")
    weights = list(dummy_weights(model, mapping, torch.float32, torch.device("cpu"), seed=3))
    layouts = {w.name: w.spec.layout for w in weights}
    assert layouts["model.layers.0.mlp.down_proj.weight"] == layouts_by_block["mlp"]
    assert layouts["model.layers.0.self_attn.q_proj.weight"] == layouts_by_block["self_attn"]
    assert layouts["model.layers.1.self_attn.o_proj.weight"] == layouts["model.norm.weight"] == "dense"
    load_model_weights(model, weights, torch.float32)
    # the same seed gives the same values
    again = {w.name: w for w in dummy_weights(build_model(cfg, "meta"), mapping, torch.float32,
                                              torch.device("cpu"), seed=3)}
    assert all(torch.equal(a, again[w.name].tensors[r]) for w in weights for r, a in w.tensors.items())
    # ... and each tensor its own values (seeded by name): two same-shape layers differ
    by_name = {w.name: w for w in weights}
    assert not torch.equal(by_name["model.layers.0.mlp.up_proj.weight"].tensors["qweight"],  # GPTQ and AWQ
                           by_name["model.layers.1.mlp.up_proj.weight"].tensors["qweight"])
    dense = {w.name: (reader_for_layout(w.spec.layout).dequantize(w) if w.spec.is_quantized else w.tensors["weight"])
             .float() for w in weights}
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).eval()
    missing, unexpected = hf.load_state_dict(dense, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied: the head is the embedding
    # the HF reference quantizes nothing: the FP8 / INT8 layers' per-token activation
    # quantization (W8A8, on the CPU at every M) is the difference, so compare weight-only
    for w in weights:
        if w.spec.activation != "none":
            w.spec = dataclasses.replace(w.spec, activation="none")
    model = build_model(cfg, "cpu")
    load_model_weights(model, weights, torch.float32)
    runner = ModelRunner(model, num_blocks=8, block_size=8, dtype=torch.float32, device="cpu")
    prompt = [5, 17, 3, 99, 42, 7]
    logits = runner.forward([SeqChunk(prompt, 0, [0, 1])])[0]
    ref = hf_logits(hf, prompt)[-1]
    torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)
    assert float(ref.std()) > 1e-3  # random weights, not a constant


def model_dir(tmp_path: Path) -> Path:
    """config.json and the tokenizer of the tiny Llama, no weights."""
    d = tmp_path / "model"
    d.mkdir()
    for f in (FIX / "tiny-llama" / "bf16").iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, d / f.name)
    return d


def test_engine_serves_dummy_weights_in_the_mapped_formats(tmp_path):
    d = model_dir(tmp_path)
    cfg = tmp_path / "mix.yaml"
    cfg.write_text("mixed_precision:\n  fp16_path: /no/such/checkpoint\n  weight_mapping:\n"
                   "    'model.layers.*.mlp.*_proj.weight': int4\n    'model.layers.*.self_attn.*_proj.weight': fp8\n")
    from mixq.engine.sampling_params import SamplingParams

    sp = SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True)
    outs = []
    for _ in range(2):
        llm = LLM(model_path=str(d), mixed_precision_config=str(cfg), load_format="dummy", device="cpu",
                  dtype="float32", max_total_tokens=128, max_running_requests=2)
        try:
            outs.append(llm.generate([[5, 6, 7]], sp)[0].outputs[0].token_ids)
            stats = get_mixed_precision_memory_stats()["by_format"]
        finally:
            llm.close()
    assert len(outs[0]) == 6 and outs[0] == outs[1]  # seeded per tensor name
    assert {"int4", "fp8"} <= set(stats)


def test_dummy_refusals_name_the_cause(tmp_path):
    d = model_dir(tmp_path)
    with pytest.raises(ConfigError, match="--load-format must be auto or dummy"):
        LLM(model_path=str(d), load_format="random", device="cpu")
    with pytest.raises(ConfigError, match="--load-format dummy needs --model-path"):
        LLM(mixed_precision_config=str(FIX / "none.yaml"), load_format="dummy", device="cpu")
    with pytest.raises(ConfigError, match="runs in one process"):
        LLM(model_path=str(d), load_format="dummy", device="cpu", tp_size=2)
    cfg = tmp_path / "awq.yaml"
    cfg.write_text("mixed_precision:\n  weight_mapping:\n    'model.layers.*.mlp.down_proj.weight': q4_k\n")
    with pytest.raises(ConfigError, match="precision 'q4_k' of model.layers.0.mlp.down_proj.weight is not one of"):
        LLM(model_path=str(d), mixed_precision_config=str(cfg), load_format="dummy", device="cpu")
    cfg.write_text("mixed_precision:\n  weight_mapping:\n    'model.norm.weight': int4\n")
    with pytest.raises(ConfigError, match=r"model.norm.weight \(norm\) is kept in the model dtype; it cannot be int4"):
        LLM(model_path=str(d), mixed_precision_config=str(cfg), load_format="dummy", device="cpu")
    cfg.write_text("mixed_precision:\n  weight_mapping:\n    'model.layers.*.mlp.nothing.weight': int4\n")
    with pytest.raises(ConfigError, match="pattern matches no tensor in the model"):
        LLM(model_path=str(d), mixed_precision_config=str(cfg), load_format="dummy", device="cpu")


def test_launch_flag_reaches_the_engine_and_refuses_before_loading(tmp_path):
    import argparse

    from mixq.server.args import add_server_flags, from_namespace
    from mixq.server.launch import engine_config

    d = model_dir(tmp_path)
    cfg = tmp_path / "mix.yaml"  # paths that do not exist: dummy weights read none
    cfg.write_text("mixed_precision:\n  fp16_path: /no/such/checkpoint\n  weight_mapping:\n"
                   "    'model.layers.*.mlp.*_proj.weight': int4\n")
    p = argparse.ArgumentParser()
    add_server_flags(p)
    args = from_namespace(p.parse_args(["--model-path", str(d), "--mixed-precision-config", str(cfg),
                                        "--load-format", "dummy"]))
    args.validate(None)
    ecfg = engine_config(args)
    assert (ecfg.load_format, ecfg.model_path, ecfg.mixed_precision_config) == ("dummy", str(d), str(cfg))
    with pytest.raises(ConfigError, match="runs in one process per replica"):
        from_namespace(p.parse_args(["--model-path", str(d), "--load-format", "dummy", "--tp-size", "2"])).validate(None)
    with pytest.raises(SystemExit):  # argparse: not a choice
        p.parse_args(["--load-format", "pt"])
