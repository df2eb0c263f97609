"""The mixed-precision config file (YAML), parsed and checked at the edge with pydantic.

The format is the one promised to users (see docs/config.md)::

    mixed_precision:
      fp16_path: /models/qwen3-bf16        # the base: every unmapped tensor comes from here
      fp8_path: /models/qwen3-fp8
      int4_path: /models/qwen3-gptq-int4   # also gptq_int4_path, awq_int4_path, int8_path
      gguf_path: /models/qwen3-Q4_K_M.gguf # a llama.cpp GGUF file (or a directory with one)
      weight_mapping:
        "model.layers.0.self_attn.q_proj.weight": "fp16"
        "model.layers.*.mlp.gate_proj.weight": "fp8"
    inference: {max_seq_length: 4096, max_batch_size: 32, dtype: bfloat16}
    server: {host: 127.0.0.1, port: 8080}

Unknown keys and precisions are errors that name the key; paths are checked to exist
here, their contents when the plan is built (mixq.formats.plan).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mixq.errors import ConfigError

# Precision names a user may write in weight_mapping, and the path key each reads from.
# "fp16" and "bf16" both mean "the base checkpoint": its dtype is whatever it stores.
PRECISION_PATH_KEYS: dict[str, tuple[str, ...]] = {
    "fp16": ("fp16_path",),
    "bf16": ("fp16_path",),
    "fp8": ("fp8_path",),
    "int8": ("int8_path",),
    # int4: the format (GPTQ, AWQ, compressed-tensors) is read from the checkpoint.
    "int4": ("int4_path", "gptq_int4_path", "awq_int4_path"),
    "gptq_int4": ("gptq_int4_path", "int4_path"),
    "awq_int4": ("awq_int4_path", "int4_path"),
    # gguf: whatever type the GGUF file stores for the tensor; a type name (q4_k, ...) also
    # requires the file to store exactly that type (mixq.formats.plan checks it)
    "gguf": ("gguf_path",),
    **{t: ("gguf_path",) for t in ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q4_k", "q5_k", "q6_k")},
}
PRECISIONS = tuple(PRECISION_PATH_KEYS)
PATH_KEYS = ("fp16_path", "fp8_path", "int8_path", "int4_path", "gptq_int4_path", "awq_int4_path", "gguf_path")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MixedPrecisionSection(_Strict):
    """`mixed_precision:` — where each precision's checkpoint lives and the mapping."""

    fp16_path: str | None = None
    fp8_path: str | None = None
    int8_path: str | None = None
    int4_path: str | None = None
    gptq_int4_path: str | None = None
    awq_int4_path: str | None = None
    gguf_path: str | None = None
    weight_mapping: dict[str, str] = Field(default_factory=dict)

    @field_validator("weight_mapping")
    @classmethod
    def _known_precisions(cls, mapping: dict[str, str]) -> dict[str, str]:
        for key, precision in mapping.items():
            if precision not in PRECISION_PATH_KEYS:
                raise ValueError(
                    f"weight_mapping[{key!r}]: unknown precision {precision!r}; "
                    f"expected one of {', '.join(PRECISIONS)}"
                )
        return mapping

    def paths(self) -> dict[str, str]:
        """The path keys that are set, e.g. {"fp16_path": "/models/x", ...}."""
        return {k: getattr(self, k) for k in PATH_KEYS if getattr(self, k) is not None}

    def path_key_for(self, precision: str) -> str:
        """The path key a precision reads from; ConfigError when none of its keys is set."""
        for key in PRECISION_PATH_KEYS[precision]:
            if getattr(self, key) is not None:
                return key
        keys = " or ".join(PRECISION_PATH_KEYS[precision])
        raise ConfigError(
            f"mixed_precision: precision {precision!r} is used in weight_mapping but {keys} is not set"
        )


class InferenceSection(_Strict):
    """`inference:` — defaults the launcher flags override."""

    max_seq_length: int | None = Field(default=None, gt=0)
    max_batch_size: int | None = Field(default=None, gt=0)
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"


class ServerSection(_Strict):
    """`server:` — defaults the launcher flags override."""

    host: str | None = None
    port: int | None = Field(default=None, ge=1, le=65535)


class MixedPrecisionConfig(_Strict):
    """The whole file. `source` is the file it came from, for error messages."""

    mixed_precision: MixedPrecisionSection
    inference: InferenceSection = Field(default_factory=InferenceSection)
    server: ServerSection = Field(default_factory=ServerSection)
    source: str = "<config>"

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, model_path: str | None = None) -> MixedPrecisionConfig:
        """Read and validate a YAML config file.

        `model_path` (the launcher's --model-path) is the base when the file sets no
        fp16_path. Relative checkpoint paths are resolved against the file's directory.
        """
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as e:
            raise ConfigError(f"mixed-precision config {path}: cannot read: {e.strerror}") from e
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"mixed-precision config {path}: invalid YAML: {e}") from e
        return cls.from_dict(data, source=str(path), base_dir=path.parent, model_path=model_path)

    @classmethod
    def from_dict(
        cls,
        data: object,
        source: str = "<config>",
        base_dir: str | os.PathLike | None = None,
        model_path: str | None = None,
    ) -> MixedPrecisionConfig:
        """Validate an already-parsed config (a dict as YAML gives it)."""
        if not isinstance(data, dict):
            raise ConfigError(f"mixed-precision config {source}: expected a mapping at top level")
        if "mixed_precision" not in data:
            raise ConfigError(f"mixed-precision config {source}: missing key 'mixed_precision'")
        try:
            cfg = cls.model_validate({**data, "source": source})
        except ValidationError as e:
            raise ConfigError(_describe(e, source)) from None
        mp = cfg.mixed_precision
        updates: dict[str, str] = {}
        if mp.fp16_path is None:
            if model_path is None:
                raise ConfigError(
                    f"mixed-precision config {source}: mixed_precision.fp16_path (the base "
                    "checkpoint) is not set and no --model-path was given"
                )
            updates["fp16_path"] = model_path
        for key, value in {**mp.paths(), **updates}.items():
            p = Path(os.path.expanduser(value))
            if not p.is_absolute() and base_dir is not None:
                p = Path(base_dir) / p
            if key == "gguf_path":
                if not (p.is_file() or p.is_dir()):
                    raise ConfigError(
                        f"mixed-precision config {source}: mixed_precision.{key}: {value!r} is not a GGUF file "
                        "or a directory holding one"
                    )
            elif not p.is_dir():
                raise ConfigError(
                    f"mixed-precision config {source}: mixed_precision.{key}: "
                    f"{value!r} is not a directory"
                )
            updates[key] = str(p)
        for key, precision in mp.weight_mapping.items():
            try:
                mp.model_copy(update=updates).path_key_for(precision)
            except ConfigError as e:
                raise ConfigError(f"mixed-precision config {source}: weight_mapping[{key!r}]: {e}") from None
        return cfg.model_copy(update={"mixed_precision": mp.model_copy(update=updates)})


def _describe(e: ValidationError, source: str) -> str:
    lines = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            lines.append(f"unknown key {loc!r}")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"{loc}: {msg}")
    return f"mixed-precision config {source}: " + "; ".join(lines)
