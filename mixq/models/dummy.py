"""Random weights in real formats, without a checkpoint (SGLang's and vLLM's `--load-format
dummy`): for benchmarks, where writing a large model's checkpoints costs more disk and time
than the run (a Qwen3-30B-A3B shape is 61 GB in BF16 alone).

The model directory needs only config.json (and tokenizer files for text). The tensor list
is the model's own: every module that loads a weight, every plain parameter (norms, biases),
with the shapes mixq builds from the config. Each tensor gets a precision from an optional
weight mapping (the mixed-precision config's patterns and rules, mixq.config.resolve), and
random contents in that precision's stored layout, as a checkpoint of it would hold them:

  bf16 / fp16          the model dtype (either name); weights N(0, 0.02) as HF initializes,
                       norms 1, biases 0; embeddings, norms and biases are always this
  fp8                  e4m3 per output channel (fp32 scale [N, 1]), activations per token:
                       compressed-tensors' FP8 dynamic scheme
  int4 / gptq_int4     GPTQ 4-bit, groups of 128 (or per channel when K is not a multiple),
                       symmetric: qweight [K/8, N], qzeros [G, N/8], fp16 scales [G, N];
                       random codes (no quantization pass: cheap for tens of GB)
  int8                 compressed-tensors INT8 per channel, activations per token (W8A8)
  awq_int4             AutoAWQ GEMM, groups of 128 (64, 32 where K needs), zero points
  (int8 and awq_int4 are round-to-nearest of a N(0, 0.02) weight by mixq's checkpoint
  writers, mixq.formats.writers)

Contents are seeded per tensor name (crc32), so two engines built with the same seed hold the
same values. GGUF types are refused by name. Only one process: tensor / expert parallelism
reads shards of real files.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from mixq.config.resolve import PrecisionResolver
from mixq.errors import ConfigError
from mixq.formats import writers
from mixq.formats.packing import pack_int32
from mixq.formats.spec import QuantizedWeight, WeightSpec, dense_spec

PRECISIONS = ("bf16", "fp16", "fp8", "int8", "int4", "gptq_int4", "awq_int4")
GROUP = 128
INIT_STD = 0.02  # HF's initializer_range default


def model_tensors(model: nn.Module) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, kind) of every tensor a checkpoint of this (unloaded) model would
    hold: kind "linear" (a weight a module loads in any format), "embedding", "norm" (a
    norm's parameter, initialized to ones), "bias" or "dense" (any other parameter)."""
    from mixq.layers.embedding import Embedding
    from mixq.layers.linear import MixedPrecisionLinear

    out: dict[str, tuple[tuple[int, ...], str]] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, MixedPrecisionLinear):
            out[f"{name}.weight"] = ((mod.out_features, mod.in_features), "linear")
            if isinstance(mod.bias, nn.Parameter):
                out[f"{name}.bias"] = ((mod.out_features,), "bias")
        elif isinstance(mod, Embedding):
            out[f"{name}.weight"] = ((mod.num_embeddings, mod.dim), "embedding")
        else:
            for pname, p in mod.named_parameters(recurse=False):
                kind = "bias" if pname == "bias" else "norm" if "norm" in type(mod).__name__.lower() else "dense"
                out[f"{name}.{pname}"] = (tuple(p.shape), kind)
    return out


@dataclass
class _Base:
    path: Path


@dataclass
class DummyPlan:
    """What the engine takes from a load plan, for dummy weights: the base directory (its
    tokenizer, the served model name) and the model config. No tensors are planned."""

    base: _Base
    model_config: dict
    tensors: dict = field(default_factory=dict)

    @classmethod
    def of(cls, model_path: str | None) -> DummyPlan:
        if model_path is None:
            raise ConfigError("--load-format dummy needs --model-path: a directory with the model's config.json")
        cfg_file = Path(model_path) / "config.json"
        try:
            config = json.loads(cfg_file.read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"--load-format dummy: cannot read {cfg_file}: {e}") from None
        return cls(_Base(Path(model_path)), config)


def _generator(name: str, seed: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


def dummy_weight(name: str, shape: tuple[int, ...], kind: str, precision: str, dtype: torch.dtype,
                 device: torch.device, seed: int = 0) -> QuantizedWeight:
    """One tensor's random contents in `precision`'s stored layout (module docstring)."""
    g = _generator(name, seed, device)
    if kind != "linear" or precision in ("bf16", "fp16"):
        if kind == "norm":
            t = torch.ones(shape, dtype=dtype, device=device)
        elif kind == "bias":
            t = torch.zeros(shape, dtype=dtype, device=device)
        else:
            t = (torch.randn(shape, generator=g, device=device) * INIT_STD).to(dtype)
        if precision not in ("bf16", "fp16"):
            raise ConfigError(f"dummy weights: {name} ({kind}) is kept in the model dtype; it cannot be {precision}")
        return QuantizedWeight(name, dense_spec(dtype), shape, {"weight": t})
    n, k = shape
    if precision == "fp8":
        w = torch.randn(n, k, generator=g, device=device) * INIT_STD
        s = w.abs().amax(1, keepdim=True).clamp(min=1e-12) / 448
        spec = WeightSpec("fp8", 8, torch.float8_e4m3fn, "channel", activation="dynamic-token")
        return QuantizedWeight(name, spec, shape, {"weight": (w / s).to(torch.float8_e4m3fn), "weight_scale": s})
    if precision in ("int4", "gptq_int4"):
        group = GROUP if k % GROUP == 0 else k
        groups = k // group
        q = torch.randint(0, 16, (k, n), generator=g, device=device, dtype=torch.int32)
        # codes uniform in [0, 16) around 8: std 4.6 steps; scales spread +-25% around the
        # step that gives N(0, 0.02)'s spread
        scales = (INIT_STD / 4.6) * (0.75 + 0.5 * torch.rand(groups, n, generator=g, device=device))
        zeros = torch.full((groups, n), 7, dtype=torch.int32, device=device)  # GPTQ v1 stores zero - 1
        spec = WeightSpec("gptq", 4, torch.int32, "group" if group < k else "channel",
                          group_size=group if group < k else None, zero_offset=1)
        return QuantizedWeight(name, spec, shape, {"qweight": pack_int32(q, 4, dim=0),
                                                   "qzeros": pack_int32(zeros, 4, dim=1),
                                                   "scales": scales.half()})
    if precision in ("int8", "awq_int4"):  # RTN of a N(0, 0.02) weight, by the checkpoint writers
        w = torch.randn(n, k, generator=g, device=device) * INIT_STD
        if precision == "int8":
            t = writers.int8_tensors("m", w, scale_dtype=torch.float32)
            spec = WeightSpec("int8", 8, torch.int8, "channel", activation="dynamic-token")
        else:
            group = next((gs for gs in (GROUP, 64, 32) if k % gs == 0), None)
            if group is None:
                raise ConfigError(f"dummy weights: {name} has K={k}, which no AWQ group of 32-128 divides")
            t = writers.awq_tensors("m", w, group=group)
            spec = WeightSpec("awq", 4, torch.int32, "group", group_size=group, symmetric=False)
        return QuantizedWeight(name, spec, shape, {key.removeprefix("m."): v for key, v in t.items()})
    raise ConfigError(f"dummy weights: precision {precision!r} of {name} is not one of {', '.join(PRECISIONS)}")


def read_mapping(config_path: str | None) -> dict[str, str]:
    """The weight_mapping of a mixed-precision YAML, for dummy weights: its checkpoint paths
    are not read (there are no checkpoints), so only the mapping is taken."""
    if config_path is None:
        return {}
    import yaml

    try:
        data = yaml.safe_load(Path(config_path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"mixed-precision config {config_path}: cannot read: {e}") from None
    section = data.get("mixed_precision") if isinstance(data, dict) else None
    mapping = section.get("weight_mapping") if isinstance(section, dict) else None
    if mapping is None:
        return {}
    if not isinstance(mapping, dict):
        raise ConfigError(f"mixed-precision config {config_path}: mixed_precision.weight_mapping must be a mapping")
    return {str(k): str(v) for k, v in mapping.items()}


def dummy_weights(model: nn.Module, mapping: dict[str, str], dtype: torch.dtype, device: torch.device,
                  seed: int = 0, source: str = "<dummy>") -> Iterator[QuantizedWeight]:
    """Every tensor of `model` (model_tensors), in the precision `mapping` resolves for it
    (unmapped, bf16 and fp16: the model dtype), with random contents on `device`."""
    tensors = model_tensors(model)
    resolved = PrecisionResolver(mapping, source=source).resolve_all(list(tensors), base="the model")
    for name, (shape, kind) in tensors.items():
        res = resolved[name]
        precision = "bf16" if res.rule is None or res.precision in ("bf16", "fp16") else res.precision
        yield dummy_weight(name, shape, kind, precision, dtype, device, seed)
