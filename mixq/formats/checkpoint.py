"""A checkpoint directory: config.json, its quantization config, and safetensors headers.

Only headers are read when a checkpoint is opened (safetensors' safe_open memory-maps the
file and parses the JSON header); tensor data is read later, one tensor or one slice at
a time, by the format readers.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from safetensors import safe_open

from mixq.errors import CheckpointError

# safetensors dtype strings -> torch dtypes
_ST_DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I8": torch.int8,
    "U8": torch.uint8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "BOOL": torch.bool,
}

# Sidecar files older tools write next to (or instead of) config.json's quantization_config.
_QUANT_SIDECARS = ("quantization_config.json", "quantize_config.json", "quant_config.json")


@dataclass(frozen=True)
class TensorInfo:
    """A tensor's header entry: file, dtype, shape. No data."""

    name: str
    file: str  # file name inside the checkpoint directory
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n


class Checkpoint:
    """A directory of safetensors files plus config.json.

    `tensors` maps every stored tensor name to its TensorInfo (from headers only).
    `read(name, index)` returns a tensor, or a slice of it when `index` is given,
    reading only those bytes from the memory-mapped file.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"checkpoint {self.path}: not a directory")
        self._handles: dict[str, object] = {}

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r})"

    @cached_property
    def config(self) -> dict:
        """config.json as a dict (a CheckpointError when absent or invalid)."""
        return self._read_json("config.json", required=True)

    @cached_property
    def quantization_config(self) -> dict | None:
        """config.json's quantization_config, else a sidecar quantize_config.json, else None."""
        qc = self.config.get("quantization_config")
        if qc is None:
            for name in _QUANT_SIDECARS:
                if (self.path / name).is_file():
                    qc = self._read_json(name, required=True)
                    break
        if qc is not None and not isinstance(qc, dict):
            raise CheckpointError(f"checkpoint {self.path}: quantization_config is not a mapping")
        return qc

    def _read_json(self, name: str, required: bool) -> dict:
        f = self.path / name
        try:
            return json.loads(f.read_text())
        except FileNotFoundError:
            if required:
                raise CheckpointError(f"checkpoint {self.path}: missing {name}") from None
            return {}
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"checkpoint {f}: cannot read: {e}") from None

    @cached_property
    def files(self) -> dict[str, list[str]]:
        """safetensors file name -> tensor names it holds (from the index or the headers)."""
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = self._read_json(index.name, required=True).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"checkpoint {index}: no weight_map")
            out: dict[str, list[str]] = {}
            for tensor, fname in weight_map.items():
                out.setdefault(fname, []).append(tensor)
            for fname in out:
                if not (self.path / fname).is_file():
                    raise CheckpointError(f"checkpoint {index}: lists {fname}, which is missing")
            return out
        # HF's single-file name first: other *.safetensors beside it (consolidated
        # weights, references) are not part of the model.
        if (self.path / "model.safetensors").is_file():
            names = ["model.safetensors"]
        else:
            names = sorted(p.name for p in self.path.glob("*.safetensors"))
        if not names:
            raise CheckpointError(f"checkpoint {self.path}: no *.safetensors files")
        return {n: list(self._handle(n).keys()) for n in names}

    def _handle(self, fname: str):
        h = self._handles.get(fname)
        if h is None:
            try:
                h = safe_open(str(self.path / fname), framework="pt")
            except Exception as e:  # safetensors raises its own error types
                raise CheckpointError(f"checkpoint {self.path / fname}: cannot open: {e}") from e
            self._handles[fname] = h
        return h

    @cached_property
    def tensors(self) -> dict[str, TensorInfo]:
        """Every stored tensor's header entry."""
        out: dict[str, TensorInfo] = {}
        for fname, names in self.files.items():
            h = self._handle(fname)
            for name in names:
                try:
                    sl = h.get_slice(name)
                except Exception as e:
                    raise CheckpointError(f"checkpoint {self.path / fname}: tensor {name!r}: {e}") from e
                st = sl.get_dtype()
                if st not in _ST_DTYPES:
                    raise CheckpointError(
                        f"checkpoint {self.path / fname}: tensor {name!r} has unsupported dtype {st}"
                    )
                out[name] = TensorInfo(name, fname, _ST_DTYPES[st], tuple(sl.get_shape()))
        return out

    def info(self, name: str) -> TensorInfo:
        """Header entry of one tensor; CheckpointError naming the tensor when absent."""
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"checkpoint {self.path}: no tensor {name!r}") from None

    def read(self, name: str, index: tuple | None = None) -> torch.Tensor:
        """Read one tensor, or only `index` (a tuple of slices/ints) of it."""
        info = self.info(name)
        h = self._handle(info.file)
        try:
            if index is None and not info.shape:
                return h.get_tensor(name)  # 0-d: slices do not apply
            # get_slice, also for whole tensors: get_tensor wraps the whole file in a
            # storage first, ~20 ms per call on a multi-GB shard (seen with safetensors 0.8)
            return h.get_slice(name)[index if index is not None else slice(None)]
        except Exception as e:
            raise CheckpointError(f"checkpoint {self.path / info.file}: reading {name!r}: {e}") from e

    def file_of(self, name: str) -> Path:
        return self.path / self.info(name).file
