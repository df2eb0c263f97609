"""A GGUF file seen like a checkpoint directory: tensor headers, sliced reads, config.

Parsing is the `gguf` package's (`GGUFReader` memory-maps the file); this module checks
what the reader takes on trust (every tensor's bytes lie inside the file, every type is
known) so a truncated or foreign file is one error naming the file and the tensor. The
model config comes from the metadata through transformers' GGUF key table
(`transformers.integrations.ggml.GGUF_CONFIG_MAPPING`), filled out by `AutoConfig`, plus
the MoE keys that table leaves out; the tokenizer through transformers' GGUF support.
"""

from __future__ import annotations

import functools
import json
import os
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from mixq.errors import CheckpointError, UnsupportedFormatError
from mixq.formats.checkpoint import TensorInfo
from mixq.formats.gguf_quants import FLOAT_TYPES, QUANT_TYPES

# GGUF architecture -> (HF architecture, HF model_type) for the families mixq has models of.
# llama.cpp stores Mixtral as "llama" with experts (see `hf_architecture`).
ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
    "qwen2moe": ("Qwen2MoeForCausalLM", "qwen2_moe"),
    "qwen3moe": ("Qwen3MoeForCausalLM", "qwen3_moe"),
}


def is_gguf(path: str | os.PathLike) -> bool:
    """A .gguf file, or a directory holding exactly one .gguf and no safetensors."""
    p = Path(path)
    if p.is_file():
        return p.suffix == ".gguf"
    return p.is_dir() and len(list(p.glob("*.gguf"))) == 1 and not any(p.glob("*.safetensors"))


def resolve_gguf(path: str | os.PathLike) -> Path:
    """The .gguf file a path names (the file itself, or the one in a directory)."""
    p = Path(path)
    if p.is_dir():
        files = sorted(p.glob("*.gguf"))
        if len(files) != 1:
            raise CheckpointError(f"gguf {p}: expected one .gguf file in the directory, found {len(files)}")
        return files[0]
    if not p.is_file():
        raise CheckpointError(f"gguf {p}: no such file")
    return p


@functools.lru_cache(maxsize=8)
def _open(path: str, size: int, mtime: float):
    """One GGUFReader per file version and process: parsing the metadata (a 49k-token
    vocabulary is ~100k fields) costs seconds, and the plan, loader and config share it."""
    from gguf import GGUFReader
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    class CheckedReader(GGUFReader):
        def _get(self, offset, dtype, count=1, override_order=None):
            # GGUFReader._get on a plain ndarray view of the map: slicing numpy's memmap
            # subclass costs ~10 us, and a 49k-token vocabulary is ~300k slices (2.6 s of
            # every start of the default model, against ~0.3 s this way)
            if self.__dict__.get("_plain_of") is not self.data:
                self._plain, self._plain_of = self.data.view(np.ndarray), self.data
            dt = np.dtype(dtype)
            arr = self._plain[offset:offset + dt.itemsize * int(count)].view(dt)[:int(count)]
            return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order))

        # the reader takes types and offsets on trust: a truncated file fails in a numpy
        # reshape and an unknown type in an enum lookup, neither naming the tensor
        def _build_tensors(self, start_offs, fields):
            for f in fields:
                name = bytes(f.parts[1]).decode("utf-8", "replace")
                raw = int(f.parts[4][0])
                try:
                    gtype = GGMLQuantizationType(raw)
                except ValueError:
                    raise UnsupportedFormatError(f"gguf {path}: tensor {name!r} has unknown GGML type {raw}") from None
                dims = [int(d) for d in f.parts[3]]
                block, nbytes = GGML_QUANT_SIZES[gtype]
                end = int(start_offs) + int(f.parts[5][0]) + int(np.prod(dims)) * nbytes // block
                if end > len(self.data):
                    raise CheckpointError(f"gguf {path}: tensor {name!r} ends at byte {end} but the file has "
                                          f"{len(self.data)}: the file is truncated")
            return super()._build_tensors(start_offs, fields)

    try:
        return CheckedReader(path)
    except CheckpointError:
        raise
    except Exception as e:  # the gguf package raises ValueError/IndexError/KeyError on bad headers
        raise CheckpointError(f"gguf {path}: cannot read the header: {type(e).__name__}: {e}") from None


class GGUFFile:
    """A GGUF file with the interface the format readers use on a `Checkpoint`:
    `tensors` / `info(name)` (TensorInfo by stored name, from the header), `read(name,
    index)` (only the indexed bytes), `file_of`, `config` (a config.json-like dict).

    Stored shapes: a float tensor as itself ([N, K], [E, N, K], [K]); a quantized one as
    uint8 blocks [..., N, K / B, T]. A reader may give a tensor another view of the same
    bytes (`set_view`, e.g. rows split per attention head)."""

    def __init__(self, path: str | os.PathLike):
        self.path = resolve_gguf(path)
        st = self.path.stat()
        self.reader = _open(str(self.path), st.st_size, st.st_mtime)
        self._views: dict[str, tuple[int, ...]] = {}
        self.quantization_config = None

    def __repr__(self) -> str:
        return f"GGUFFile({str(self.path)!r})"

    # -- metadata -------------------------------------------------------------------

    def field(self, key: str, default=None):
        """A metadata value (scalar, string or list), or `default` when absent."""
        f = self.reader.fields.get(key)
        return default if f is None else f.contents()

    @cached_property
    def arch(self) -> str:
        arch = self.field("general.architecture")
        if arch is None:
            raise CheckpointError(f"gguf {self.path}: no general.architecture in the metadata")
        return arch

    def arch_field(self, key: str, default=None):
        return self.field(f"{self.arch}.{key}", default)

    def hf_architecture(self) -> tuple[str, str]:
        """(HF architecture, model_type); UnsupportedFormatError for other architectures."""
        if self.arch not in ARCHITECTURES:
            raise UnsupportedFormatError(
                f"gguf {self.path}: architecture {self.arch!r} has no mixq model; supported: "
                + ", ".join(ARCHITECTURES))
        if self.arch == "llama" and (self.arch_field("expert_count") or 0) > 0:
            return "MixtralForCausalLM", "mixtral"
        return ARCHITECTURES[self.arch]

    @cached_property
    def config(self) -> dict:
        """The HF config.json of the model, from the metadata (see the module docstring)."""
        from transformers import AutoConfig
        from transformers.integrations.ggml import GGUF_CONFIG_DEFAULTS_MAPPING, GGUF_CONFIG_MAPPING

        archname, model_type = self.hf_architecture()
        table = GGUF_CONFIG_MAPPING.get(model_type) or GGUF_CONFIG_MAPPING[self.arch.replace("moe", "_moe")]
        # llama.cpp's semantics where they differ from the HF class defaults (qwen3_moe
        # renormalizes its top-k weights)
        cfg: dict = dict(GGUF_CONFIG_DEFAULTS_MAPPING.get(model_type, {}))
        for key, hf_key in table.items():
            value = self.arch_field(key)
            if hf_key is not None and value is not None:
                cfg[hf_key] = value
        experts = self.arch_field("expert_count") or 0
        if experts:  # the MoE sizes transformers' table does not carry for every family
            cfg["num_local_experts" if model_type == "mixtral" else "num_experts"] = experts
            cfg["num_experts_per_tok"] = self.arch_field("expert_used_count")
            if self.arch_field("expert_feed_forward_length") is not None and model_type != "mixtral":
                cfg["moe_intermediate_size"] = self.arch_field("expert_feed_forward_length")
            shexp = self.arch_field("expert_shared_feed_forward_length")
            if shexp is not None:
                cfg["shared_expert_intermediate_size"] = shexp
        if self.arch_field("rope.scaling.type") not in (None, "none") or "rope_freqs.weight" in self._by_name:
            raise UnsupportedFormatError(
                f"gguf {self.path}: rope scaling ({self.arch_field('rope.scaling.type') or 'rope_freqs.weight'}) "
                "is not read from GGUF metadata; serve it with its HF config (fp16_path + gguf_path)")
        for tok_key, hf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id")):
            value = self.field(f"tokenizer.ggml.{tok_key}")
            if value is not None:
                cfg[hf_key] = value
        if "vocab_size" not in cfg:
            tokens = self.reader.fields.get("tokenizer.ggml.tokens")
            if tokens is None:
                raise CheckpointError(f"gguf {self.path}: no {self.arch}.vocab_size and no tokenizer.ggml.tokens")
            cfg["vocab_size"] = len(tokens.data)
        cfg["tie_word_embeddings"] = "output.weight" not in self._by_name
        if model_type in ("qwen3", "qwen3_moe") and "attention.key_length" not in table:
            kl = self.arch_field("attention.key_length")
            if kl is not None:
                cfg["head_dim"] = kl
        try:
            full = AutoConfig.for_model(model_type, **cfg).to_dict()
        except Exception as e:
            raise CheckpointError(f"gguf {self.path}: cannot build a {model_type} config from the metadata: {e}") from e
        full["architectures"] = [archname]
        full.pop("_name_or_path", None)
        return full

    # -- tensors ----------------------------------------------------------------------

    @cached_property
    def _by_name(self) -> dict:
        return {t.name: t for t in self.reader.tensors}

    def qtype(self, name: str) -> str:
        """The stored GGML type of a tensor, lower case ("q4_k", "f32", ...); types mixq does
        not read are refused naming the file and the tensor."""
        t = self._tensor(name)
        q = t.tensor_type.name.lower()
        if q not in QUANT_TYPES and q not in FLOAT_TYPES:
            raise UnsupportedFormatError(
                f"gguf {self.path}: tensor {name!r} is stored as {t.tensor_type.name}, which mixq does not "
                f"read; supported: {', '.join(t.upper() for t in (*FLOAT_TYPES, *QUANT_TYPES))}")
        return q

    def _tensor(self, name: str):
        try:
            return self._by_name[name]
        except KeyError:
            raise CheckpointError(f"gguf {self.path}: no tensor {name!r}") from None

    def _natural_shape(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        t = self._tensor(name)
        q = self.qtype(name)
        dims = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF lists ne[0] (K) first
        if q in FLOAT_TYPES:
            return dims, {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[q]
        bt = QUANT_TYPES[q]
        if dims[-1] % bt.block:
            raise CheckpointError(f"gguf {self.path}: tensor {name!r} has rows of {dims[-1]} values, not a "
                                  f"multiple of the {q} block ({bt.block})")
        return (*dims[:-1], dims[-1] // bt.block, bt.nbytes), torch.uint8

    @cached_property
    def tensors(self) -> dict[str, TensorInfo]:
        out = {}
        for name in self._by_name:
            shape, dtype = self._natural_shape(name)
            out[name] = TensorInfo(name, self.path.name, dtype, self._views.get(name, shape))
        return out

    def set_view(self, name: str, shape: tuple[int, ...]) -> None:
        """Give a stored tensor another shape over the same bytes (before any read)."""
        natural, dtype = self._natural_shape(name)
        if int(np.prod(shape)) != int(np.prod(natural)):
            raise CheckpointError(f"gguf {self.path}: tensor {name!r} {list(natural)} cannot be viewed as {list(shape)}")
        self._views[name] = tuple(shape)
        self.__dict__.pop("tensors", None)

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"gguf {self.path}: no tensor {name!r}") from None

    def read(self, name: str, index: tuple | None = None) -> torch.Tensor:
        """A tensor (its view), or only `index` of it: the bytes are copied out of the map."""
        info = self.info(name)
        data = self._tensor(name).data
        if info.dtype == torch.bfloat16:  # raw 2-byte words in the map
            data = data.view(np.int16)
        data = data.reshape(info.shape)
        part = data if index is None else data[index]
        out = torch.from_numpy(np.array(part))  # a copy: never a view of the map
        return out.view(torch.bfloat16) if info.dtype == torch.bfloat16 else out

    def file_of(self, name: str) -> Path:
        self.info(name)
        return self.path


def load_tokenizer(path: str | os.PathLike):
    """The HF tokenizer of a model directory, or of a GGUF file (transformers builds it from
    the GGUF vocabulary)."""
    from transformers import AutoTokenizer

    if is_gguf(path):
        f = resolve_gguf(path)
        return AutoTokenizer.from_pretrained(str(f.parent), gguf_file=f.name)
    d = Path(path)
    tok_cfg, model_cfg = d / "tokenizer_config.json", d / "config.json"
    if tok_cfg.is_file() and model_cfg.is_file() and json.loads(tok_cfg.read_text()).get("tokenizer_class"):
        # the tokenizer names its class, so AutoTokenizer needs the model config only as a
        # fallback: hand it the generic one, which skips importing the model family's
        # config module and its chain (~0.9 s of every start of the default model)
        from transformers import PretrainedConfig

        config = PretrainedConfig.from_dict(json.loads(model_cfg.read_text()))
        return AutoTokenizer.from_pretrained(str(path), config=config)
    return AutoTokenizer.from_pretrained(str(path))
