"""Shared helpers of the quality tests: configs over the tiny fixtures, and HF transformers
in float64 on a plan's dequantized weights as the independent reference."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

FIX = Path(__file__).resolve().parents[1] / "fixtures"
LLAMA = FIX / "tiny-llama"


def write_cfg(path: Path, paths: dict, mapping: dict) -> Path:
    path.write_text(yaml.safe_dump({"mixed_precision": {**{k: str(v) for k, v in paths.items()},
                                                        "weight_mapping": mapping}}))
    return path


@torch.no_grad()
def hf_logprobs(cfg_path: Path | None, model_dir: Path, windows: list[list[int]], tmp: Path) -> list[torch.Tensor]:
    """log_softmax of HF transformers' float64 logits on each window (positions 0..T-2), for
    the model a config assembles (its tensors dequantized by the plan's readers, each
    Linear's input_scale folded into its columns) or for model_dir alone."""
    import transformers
    from safetensors.torch import save_file

    from mixq.config.schema import MixedPrecisionConfig
    from mixq.formats import build_plan, load_weights

    if cfg_path is not None:
        plan = build_plan(MixedPrecisionConfig.from_yaml(cfg_path))
        tensors = {}
        for n, w in load_weights(plan).items():
            t = w.dequantize().double()
            if w.input_scale is not None:
                t = t * w.input_scale.double()[None, :]
            tensors[n] = t.float().contiguous()
        ref = tmp / f"ref-{cfg_path.stem}"
        ref.mkdir(exist_ok=True)
        save_file(tensors, str(ref / "model.safetensors"))
        (ref / "config.json").write_text((model_dir / "config.json").read_text())
        model_dir = ref
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    return [torch.log_softmax(hf(torch.tensor([w])).logits[0, :-1], -1) for w in windows]


@pytest.fixture
def llama_paths():
    return {"fp16_path": LLAMA / "bf16", "int8_path": LLAMA / "w8a16-int8", "gptq_int4_path": LLAMA / "gptq-w4a16",
            "awq_int4_path": LLAMA / "awq-gemm", "fp8_path": LLAMA / "fp8-dynamic"}
