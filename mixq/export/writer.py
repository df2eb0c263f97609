"""`export_mix`: write a mixed-precision plan as one compressed-tensors checkpoint.

Streaming: tensors are read one at a time (memory-mapped slices), converted and added
to the current shard; a shard is written once it reaches `shard_bytes`, so at most one
shard plus one tensor is ever in memory. Everything goes to a hidden temporary directory
beside the output, renamed into place only once complete (config, index, tokenizer and,
with `verify`, the read-back check included): a failed or interrupted export never leaves
a directory that looks like a checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from mixq.config.schema import MixedPrecisionConfig
from mixq.errors import CheckpointError, ConfigError, MixqError
from mixq.export.convert import to_compressed_tensors
from mixq.export.engines import ENGINES, Refusal, refusals
from mixq.export.prepare import fold_smoothing, moe_layers, resolve_schemes, uniform_experts
from mixq.export.schemes import PACK, CtScheme
from mixq.formats.plan import LoadPlan, build_plan, natural_key

TARGETS = ("compressed-tensors", *ENGINES)
DEFAULT_SHARD_BYTES = 4 * 2**30
# The compressed-tensors release whose config layout the export follows.
CT_VERSION = "0.18.0"
# Files of the base checkpoint that are not carried over (weights, their index, the
# config that is rewritten, quantizer sidecars, model cards describing the BF16 model).
_SKIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".index.json", ".md")
_SKIP_NAMES = {"config.json", "quantization_config.json", "quantize_config.json", "quant_config.json", "recipe.yaml"}


@dataclass
class ExportReport:
    """What was written, and what each engine would say about it."""

    path: Path
    target: str
    groups: list[tuple[str, int]]  # (scheme description, tensors)
    shards: int
    nbytes: int  # bytes of safetensors files written
    notes: list[str] = field(default_factory=list)
    uniform: list[tuple[str, str, int]] = field(default_factory=list)  # (layer, change, bytes change)
    engine_refusals: dict[str, list[Refusal]] = field(default_factory=dict)


def _linear_module(name: str, shape) -> bool:
    """A 2-D '.weight' that is not an embedding: a Linear an engine must find a scheme
    for (quantized) or an ignore entry (dense)."""
    return name.endswith(".weight") and len(shape) == 2 and "embed" not in name


def _layer_regex(layer: str) -> str:
    # every expert Linear of one MoE layer, whatever the engine probes (vLLM asks for
    # ckpt names, SGLang 0.5.23 always for '<layer>.0.gate_proj')
    return "re:^" + layer.replace(".", r"\.") + r"\.\d+\.[^.]+$"


def quantization_config(plan: LoadPlan, schemes: dict[str, CtScheme | None]) -> dict:
    """compressed-tensors quantization_config: one config group per distinct scheme with
    exact module-name targets (plus one regex per uniform MoE layer), dense Linears under
    `ignore`."""
    groups: dict[CtScheme, list[str]] = {}
    ignore: list[str] = []
    for name in sorted(plan.tensors, key=natural_key):
        s = schemes[name]
        if s is not None:
            groups.setdefault(s, []).append(name.removesuffix(".weight"))
        elif _linear_module(name, plan.tensors[name].entry.shape):
            ignore.append(name.removesuffix(".weight"))
    moe_scheme = {}
    for layer, names in moe_layers(plan.tensors).items():
        kinds = {schemes[n] for n in names}
        if len(kinds) == 1:
            moe_scheme[layer] = kinds.pop()
    for layer, s in moe_scheme.items():
        (groups[s] if s is not None else ignore).append(_layer_regex(layer))
    if not any(n == "lm_head.weight" and schemes[n] is not None for n in plan.tensors) and "lm_head" not in ignore:
        ignore.append("lm_head")  # also when tied: engines look it up by name
    formats = {s.format for s in groups}
    if len(formats) == 1:
        top = formats.pop()
    elif any(s is not None and s.format == PACK for s in moe_scheme.values()):
        # SGLang 0.5.23's WNA16 MoE checks the top-level format; group formats win elsewhere
        top = PACK
    else:
        top = "mixed-precision"
    config_groups = {
        f"group_{i}": {"targets": targets, "weights": s.weights, "input_activations": s.input_activations,
                       "output_activations": None, "format": s.format}
        for i, (s, targets) in enumerate(groups.items())
    }
    return {"quant_method": "compressed-tensors", "format": top, "config_groups": config_groups, "ignore": ignore,
            "kv_cache_scheme": None, "quantization_status": "compressed", "sparsity_config": {},
            "transform_config": {}, "global_compression_ratio": None, "version": CT_VERSION}


class _Shards:
    """Accumulates tensors into safetensors shards of about `limit` bytes."""

    def __init__(self, root: Path, limit: int):
        self.root, self.limit = root, limit
        self.part: dict[str, torch.Tensor] = {}
        self.size = 0
        self.files: list[str] = []
        self.weight_map: dict[str, str] = {}

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        n = sum(t.numel() * t.element_size() for t in tensors.values())
        if self.part and self.size + n > self.limit:
            self.flush()
        for k, t in tensors.items():
            if k in self.weight_map or k in self.part:
                raise CheckpointError(f"export: tensor {k!r} would be written twice")
            self.part[k] = t
        self.size += n

    def flush(self) -> None:
        fname = f"part-{len(self.files)}.safetensors"
        save_file(self.part, str(self.root / fname), metadata={"format": "pt"})
        # safetensors writes 0600; a checkpoint is read by servers running as other users
        (self.root / fname).chmod(0o666 & ~_umask())
        self.files.append(fname)
        self.weight_map.update(dict.fromkeys(self.part, fname))
        self.part, self.size = {}, 0

    def finish(self) -> int:
        """Write the last shard, give the files their HF names (and an index); returns bytes."""
        if self.part or not self.files:
            self.flush()
        final = (["model.safetensors"] if len(self.files) == 1
                 else [f"model-{i + 1:05d}-of-{len(self.files):05d}.safetensors" for i in range(len(self.files))])
        rename = dict(zip(self.files, final))
        for tmp, fname in rename.items():
            (self.root / tmp).rename(self.root / fname)
        total = sum((self.root / f).stat().st_size for f in final)
        if len(final) > 1:
            index = {"metadata": {"total_size": total},
                     "weight_map": {k: rename[v] for k, v in sorted(self.weight_map.items())}}
            (self.root / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return total


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _check_output(out: Path, overwrite: bool, sources: list[Path]) -> None:
    for src in sources:
        if out == src or out in src.parents or src in out.parents:
            raise MixqError(f"output {out} overlaps the source checkpoint {src}; choose another directory")
    if out.exists():
        if not out.is_dir():
            raise MixqError(f"output {out} exists and is not a directory")
        if any(out.iterdir()) and not overwrite:
            raise MixqError(f"output {out} exists and is not empty; pass --overwrite to replace it")


def _copy_side_files(src: Path, dst: Path) -> None:
    """Tokenizer, generation config, chat template, remote code: as the base has them."""
    for f in sorted(src.iterdir()):
        if f.is_file() and not f.name.startswith(".") and f.name not in _SKIP_NAMES \
                and not f.name.endswith(_SKIP_SUFFIXES):
            shutil.copy2(f, dst / f.name)


def _verify(plan: LoadPlan, root: Path) -> None:
    """Read the written checkpoint back: every tensor must dequantize bit-identically."""
    from mixq.formats.registry import CheckpointCatalog

    written = CheckpointCatalog(root)
    for name, t in plan.tensors.items():
        ours = plan.catalog(t).read(name).dequantize()
        back = written.read(name).dequantize()
        if ours.shape != back.shape or not torch.equal(ours, back):
            raise CheckpointError(f"export verify: {name} reads back different from its source {t.file}")


def _install(tmp: Path, out: Path) -> None:
    """Move the finished temporary directory to `out`, replacing what is there."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.mixq-old-{os.getpid()}")
        out.rename(old)
    try:
        tmp.rename(out)
    except OSError:
        if old is not None:
            old.rename(out)
        raise
    if old is not None:
        shutil.rmtree(old)


def export_mix(cfg: MixedPrecisionConfig, output: str | os.PathLike, target: str = "compressed-tensors",
               uniform: str | None = None, overwrite: bool = False, shard_bytes: int = DEFAULT_SHARD_BYTES,
               verify: bool = False, progress: bool = True, log: Callable[[str], None] = print) -> ExportReport:
    """Write the mix `cfg` to `output` as one compressed-tensors checkpoint.

    target: "compressed-tensors" writes every tensor in its own scheme; "vllm"/"sglang"
    first refuse (ConfigError listing them) what that engine would refuse or mis-load.
    uniform: "higher"/"lower" lifts each MoE layer whose experts differ to one format.
    """
    if target not in TARGETS:
        raise ConfigError(f"--target must be one of {', '.join(TARGETS)}, got {target!r}")
    if shard_bytes <= 0:
        raise ConfigError(f"the shard size must be > 0 bytes, got {shard_bytes}")
    out = Path(output).resolve()
    sources = [Path(p).resolve() for p in cfg.mixed_precision.paths().values()]
    _check_output(out, overwrite, sources)

    plan = build_plan(cfg)
    schemes = resolve_schemes(plan)
    report = ExportReport(out, target, [], 0, 0)
    if uniform is not None:
        report.uniform = uniform_experts(plan, schemes, uniform)
    report.notes = fold_smoothing(plan)
    report.engine_refusals = {e: refusals(plan, schemes, e) for e in ENGINES}
    if target in ENGINES and report.engine_refusals[target]:
        found = report.engine_refusals[target]
        hint = ("; --uniform-experts higher|lower gives each MoE layer one format"
                if any(r.moe_mix for r in found) else "")
        raise ConfigError(f"--target {target}: {ENGINES[target]} would refuse or mis-load {len(found)} part(s) of "
                          f"this mix{hint}:\n" + "\n".join(f"  - {r}" for r in found))

    qc = quantization_config(plan, schemes)
    report.groups = [(s.describe(), sum(1 for v in schemes.values() if v == s)) for s in dict.fromkeys(
        v for v in schemes.values() if v is not None)]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.mixq-export-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _write(plan, schemes, qc, tmp, shard_bytes, progress, report)
        if verify:
            _verify(plan, tmp)
        _install(tmp, out)
    except OSError as e:  # a full disk, permissions: nothing half-written is left behind
        raise MixqError(f"writing {out}: {e}; nothing was written there") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(render_report(report))
    return report


def _write(plan: LoadPlan, schemes, qc: dict, root: Path, shard_bytes: int, progress: bool,
           report: ExportReport) -> None:
    from tqdm import tqdm

    if plan.input_scales:  # fold_smoothing clears them or refuses; never write without them
        raise CheckpointError(f"export: smoothing compensation left for {sorted(plan.input_scales)[0]}")
    shards = _Shards(root, shard_bytes)
    total = sum(t.nbytes for t in plan.tensors.values())
    with tqdm(total=total, unit="B", unit_scale=True, desc="mixq export", disable=not progress or None,
              leave=False) as bar:
        for name, t in plan.tensors.items():
            shards.add(to_compressed_tensors(plan.catalog(t).read(name), schemes[name]))
            bar.update(t.nbytes)
    report.nbytes = shards.finish()
    report.shards = len(shards.files)
    config = {k: v for k, v in plan.model_config.items() if k != "quantization_config"}
    config["quantization_config"] = qc
    (root / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    _copy_side_files(plan.base.path, root)


def render_report(r: ExportReport) -> str:
    """What the CLI prints after an export."""
    mib = 2**20
    lines = [f"wrote {r.path} ({r.nbytes / mib:.2f} MiB in {r.shards} shard{'s' * (r.shards != 1)}, "
             f"{len(r.groups)} config group{'s' * (len(r.groups) != 1)})"]
    lines += [f"  {n:>6} x {desc}" for desc, n in r.groups]
    if r.uniform:
        total = sum(d for _, _, d in r.uniform)
        lines.append(f"--uniform-experts: {len(r.uniform)} MoE layer(s) lifted to one format, "
                     f"{'+' if total >= 0 else '-'}{abs(total) / mib:.2f} MiB:")
        lines += [f"  {layer}: {change}, {'+' if d >= 0 else '-'}{abs(d) / mib:.2f} MiB" for layer, change, d in r.uniform]
    lines += [f"note: {n}" for n in r.notes]
    if r.target == "compressed-tensors":
        for engine, found in r.engine_refusals.items():
            if found:
                lines.append(f"{ENGINES[engine]} would refuse or mis-load (--target {engine} refuses to write):")
                lines += [f"  - {x}" for x in found]
            else:
                lines.append(f"{ENGINES[engine]}: accepts every scheme of this export")
    return "\n".join(lines)
