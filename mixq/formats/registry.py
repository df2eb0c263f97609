"""Which reader serves a checkpoint, and the catalogue of its logical tensors.

One reader per format, picked from ``quantization_config.quant_method``; every tensor the
quantized reader does not claim (embeddings, norms, ignored layers) is dense. A GGUF file
(or a directory holding one) is read whole by the GGUF reader, float tensors included.
"""

from __future__ import annotations

import os
from functools import cached_property

from mixq.errors import CheckpointError, UnsupportedFormatError
from mixq.formats.awq import AWQReader
from mixq.formats.base import Entry, FormatReader, Shard, shard_nbytes
from mixq.formats.checkpoint import Checkpoint
from mixq.formats.compressed_tensors import CompressedTensorsReader, CtPackedDequant
from mixq.formats.dense import DenseReader
from mixq.formats.fp8 import FP8BlockReader, FP8Dequant
from mixq.formats.gguf import GGUFReader
from mixq.formats.gguf_file import GGUFFile, is_gguf
from mixq.formats.gptq import GPTQReader
from mixq.formats.int8 import Int8Dequant
from mixq.formats.kv_scales import is_kv_scale
from mixq.formats.spec import QuantizedWeight

QUANT_METHODS = ("compressed-tensors", "gptq", "awq", "fp8")

_DEQUANT: dict[str, FormatReader] = {
    r.layout: r for r in (DenseReader(), FP8Dequant(), Int8Dequant(), CtPackedDequant(), GPTQReader(), AWQReader(),
                          GGUFReader())
}


def reader_for_layout(layout: str) -> FormatReader:
    """The reader that dequantizes a layout (reference path)."""
    return _DEQUANT[layout]


def _quant_reader(ckpt: Checkpoint) -> FormatReader | None:
    qc = ckpt.quantization_config
    if qc is None:
        return None
    method = qc.get("quant_method")
    source = f"checkpoint {ckpt.path}"
    if method == "compressed-tensors":
        return CompressedTensorsReader(qc, source)
    if method == "gptq":
        return GPTQReader(qc, source)
    if method == "awq":
        return AWQReader(qc, source)
    if method == "fp8":
        return FP8BlockReader(qc, source)
    raise UnsupportedFormatError(
        f"{source}: quant_method {method!r} is not supported; supported: {', '.join(QUANT_METHODS)}"
    )


class CheckpointCatalog:
    """A checkpoint seen as logical tensors: ``entries[name]`` -> Entry (spec, shape, bytes)."""

    def __init__(self, path: str | os.PathLike):
        self.gguf = is_gguf(path)
        if self.gguf:  # one reader for every tensor: names, row order and types are its own
            self.ckpt = GGUFFile(path)
            self.quant_reader = GGUFReader()
        else:
            self.ckpt = Checkpoint(path)
            self.quant_reader = _quant_reader(self.ckpt)
        self.dense = DenseReader()

    @property
    def path(self):
        return self.ckpt.path

    @property
    def quant_method(self) -> str | None:
        if self.gguf:
            return "gguf"
        return None if self.quant_reader is None else self.ckpt.quantization_config.get("quant_method")

    @cached_property
    def entries(self) -> dict[str, Entry]:
        # KV-cache scales are not weights: mixq.formats.kv_scales reads them
        unclaimed = {n for n in self.ckpt.tensors if not is_kv_scale(n)}
        out: list[Entry] = []
        if self.quant_reader is not None:
            out += self.quant_reader.claim(self.ckpt, unclaimed)
        out += self.dense.claim(self.ckpt, unclaimed)
        entries: dict[str, Entry] = {}
        for e in out:
            if e.name in entries:
                raise CheckpointError(f"checkpoint {self.path}: tensor {e.name!r} is stored twice")
            entries[e.name] = e
        return entries

    def entry(self, name: str) -> Entry:
        try:
            return self.entries[name]
        except KeyError:
            raise CheckpointError(f"checkpoint {self.path}: no tensor {name!r}") from None

    def reader_of(self, entry: Entry) -> FormatReader:
        if self.gguf:
            return self.quant_reader
        return self.dense if entry.spec.layout == "dense" else self.quant_reader

    def read(self, name: str, shard: Shard | None = None) -> QuantizedWeight:
        """Read one logical tensor (its stored tensors, or their shard slices)."""
        entry = self.entry(name)
        return self.reader_of(entry).read(self.ckpt, entry, shard)

    def nbytes(self, name: str, shard: Shard | None = None) -> int:
        """Bytes reading a logical tensor (or its shard) would return, from headers only."""
        return shard_nbytes(self.ckpt, self.entry(name), shard)

    def file_of(self, name: str) -> str:
        """The file holding a logical tensor's main stored tensor."""
        entry = self.entry(name)
        first = next(iter(entry.roles.values()))
        return str(self.ckpt.file_of(first.tensor))
