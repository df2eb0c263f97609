"""The load plan: for every tensor of the model, its precision, source checkpoint and spec.

Built from headers only (no tensor data), so it is cheap even for a 235B-class index; it
is what ``mixq inspect`` prints and what the loader streams. Every inconsistency is a
ConfigError/CheckpointError naming the mapping key, the tensor and the file.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from mixq.config.resolve import PrecisionResolver
from mixq.config.schema import MixedPrecisionConfig
from mixq.errors import CheckpointError, ConfigError
from mixq.formats.base import Entry
from mixq.formats.registry import CheckpointCatalog
from mixq.formats.smoothing import check_pairs, input_scales

# Which stored layouts/bit widths each path key may hold.
_ALLOWED = {
    "fp8_path": ({"fp8"}, {8}),
    "int8_path": ({"int8", "ct-packed", "gptq"}, {8}),
    "int4_path": ({"ct-packed", "gptq", "awq"}, {4}),
    "gptq_int4_path": ({"ct-packed", "gptq"}, {4}),
    "awq_int4_path": ({"ct-packed", "awq"}, {4}),
}
_ALLOWED_BY_PRECISION = {"gptq_int4": {"ct-packed", "gptq"}, "awq_int4": {"ct-packed", "awq"}}
# gguf_path is a GGUF: "gguf" takes the stored type; a type name must be the stored type
_GGUF_PRECISIONS = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q4_k", "q5_k", "q6_k")

# Projections a model fuses into one GEMM when their specs agree.
_FUSIBLE = [
    ("q_proj", "k_proj", "v_proj"),
    ("gate_proj", "up_proj"),
    ("w1", "w3"),  # Mixtral experts: gate, up
]


@dataclass(frozen=True)
class PlannedTensor:
    """One tensor of the model: where it comes from and how it is stored there."""

    name: str
    precision: str  # as requested in the config ("fp16" for the base)
    rule: str | None  # the weight_mapping key that chose it; None = base
    path_key: str  # "fp16_path", "fp8_path", ...
    entry: Entry
    file: str

    @property
    def spec(self):
        return self.entry.spec

    @property
    def nbytes(self) -> int:
        return self.entry.nbytes

    @property
    def numel(self) -> int:
        n = 1
        for d in self.entry.shape:
            n *= d
        return n


@dataclass
class LoadPlan:
    """Ordered plan over the base checkpoint's tensors (names as in the base)."""

    tensors: dict[str, PlannedTensor]
    catalogs: dict[str, CheckpointCatalog]
    warnings: list[str] = field(default_factory=list)
    # Linears fed by a norm their source smoothed differently: x is scaled by this first
    input_scales: dict = field(default_factory=dict)

    @property
    def base(self) -> CheckpointCatalog:
        return self.catalogs["fp16_path"]

    @property
    def model_config(self) -> dict:
        return self.base.ckpt.config

    def catalog(self, t: PlannedTensor) -> CheckpointCatalog:
        return self.catalogs[t.path_key]

    def fusable(self, names: Iterable[str]) -> bool:
        """Whether these tensors share one spec (so a fused GEMM can hold them)."""
        specs = {self.tensors[n].spec for n in names}
        return len(specs) == 1

    def fusion_groups(self) -> list[list[str]]:
        """Groups of sibling projections a model would fuse (q/k/v, gate/up, w1/w3)."""
        groups = []
        for members in _FUSIBLE:
            first = members[0]
            for name in self.tensors:
                if not name.endswith(f".{first}.weight"):
                    continue
                prefix = name[: -len(f"{first}.weight")]
                group = [f"{prefix}{m}.weight" for m in members]
                if all(g in self.tensors for g in group):
                    groups.append(group)
        return groups


def _path_catalogs(cfg: MixedPrecisionConfig) -> dict[str, CheckpointCatalog]:
    cats = {}
    for key, path in cfg.mixed_precision.paths().items():
        try:
            cats[key] = CheckpointCatalog(path)
            _ = cats[key].entries  # list the headers now, so a broken checkpoint names its key
        except CheckpointError as e:
            raise ConfigError(f"mixed-precision config {cfg.source}: mixed_precision.{key}: {e}") from None
    return cats


def build_plan(cfg: MixedPrecisionConfig | None = None, model_path: str | None = None) -> LoadPlan:
    """Resolve every base tensor to (precision, checkpoint, spec); validate the whole mix.

    With no config, the plan loads everything from `model_path` as stored (which may be a
    single quantized checkpoint: serving one format is the degenerate mix).
    """
    if cfg is None:
        if model_path is None:
            raise ConfigError("build_plan: give a mixed-precision config or a model path")
        cat = CheckpointCatalog(model_path)
        tensors = {
            name: PlannedTensor(name, cat.entries[name].spec.family, None, "fp16_path",
                                cat.entries[name], cat.file_of(name))
            for name in sorted(cat.entries, key=natural_key)
        }
        return LoadPlan(tensors, {"fp16_path": cat})

    catalogs = _path_catalogs(cfg)
    base = catalogs["fp16_path"]
    src = cfg.source
    if base.quant_reader is not None:
        raise ConfigError(
            f"mixed-precision config {src}: mixed_precision.fp16_path {base.path} is a quantized "
            f"checkpoint (quant_method {base.quant_method!r}); the base must be dense (BF16/FP16/FP32)"
        )
    mp = cfg.mixed_precision
    resolutions = PrecisionResolver(mp.weight_mapping, source=src).resolve_all(
        sorted(base.entries, key=natural_key), base=f"the base checkpoint {base.path}"
    )
    tensors: dict[str, PlannedTensor] = {}
    warnings: list[str] = []
    for name, res in resolutions.items():
        base_entry = base.entries[name]
        path_key = mp.path_key_for(res.precision)
        cat = catalogs[path_key]
        where = f"mixed-precision config {src}: weight_mapping[{res.rule!r}]" if res.rule else f"base {base.path}"
        if name not in cat.entries:
            raise CheckpointError(
                f"{where}: tensor {name!r} is not in the {res.precision} checkpoint {cat.path} "
                f"(mixed_precision.{path_key})"
            )
        entry = cat.entries[name]
        file = cat.file_of(name)
        if tuple(entry.shape) != tuple(base_entry.shape):
            raise CheckpointError(
                f"{where}: tensor {name!r} has shape {list(entry.shape)} in {file} but "
                f"{list(base_entry.shape)} in the base {base.file_of(name)}"
            )
        if path_key == "gguf_path" or cat.gguf:
            _check_gguf(where, name, res.precision, path_key, entry, file, cat.gguf)
        if entry.spec.is_quantized:
            if not cat.gguf:
                _check_allowed(where, name, res.precision, path_key, entry, file)
        elif path_key != "fp16_path" and len(entry.shape) == 2 and name.endswith(".weight"):
            warnings.append(
                f"{name}: mapped to {res.precision} but stored dense ({entry.spec.family}) in "
                f"{cat.path}; it saves no memory"
            )
        tensors[name] = PlannedTensor(name, res.precision, res.rule, path_key, entry, file)
    plan = LoadPlan(tensors, catalogs, warnings)
    check_pairs(plan)
    plan.input_scales = input_scales(plan)
    for group in plan.fusion_groups():
        if not plan.fusable(group):
            descr = ", ".join(f"{g.rsplit('.', 2)[-2]}={tensors[g].spec.describe()}" for g in group)
            warnings.append(f"{group[0].rsplit('.', 2)[0]}: {descr} differ; kept as separate projections")
    return plan


def _check_gguf(where: str, name: str, precision: str, path_key: str, entry: Entry, file: str, is_gguf: bool) -> None:
    if path_key != "gguf_path":
        raise CheckpointError(f"{where}: tensor {name!r} is mapped to {precision} but {file} is a GGUF file "
                              "(give it as mixed_precision.gguf_path)")
    if not is_gguf:
        raise CheckpointError(f"{where}: tensor {name!r} is mapped to {precision} but {file} is not a GGUF file")
    stored = entry.spec.qtype if entry.spec.layout == "gguf" else entry.spec.family
    if precision in _GGUF_PRECISIONS and stored != precision:
        raise CheckpointError(f"{where}: tensor {name!r} is mapped to {precision} but {file} stores it as {stored} "
                              "(map it to 'gguf' to take the stored type)")


def _check_allowed(where: str, name: str, precision: str, path_key: str, entry: Entry, file: str) -> None:
    layouts, bits = _ALLOWED.get(path_key, (set(), set()))
    layouts = layouts & _ALLOWED_BY_PRECISION.get(precision, layouts)
    if entry.spec.layout not in layouts or entry.spec.bits not in bits:
        raise CheckpointError(
            f"{where}: tensor {name!r} is mapped to {precision} but {file} stores it as "
            f"{entry.spec.describe()} (mixed_precision.{path_key} must hold "
            f"{'/'.join(sorted(layouts))} {'/'.join(map(str, sorted(bits)))}-bit weights)"
        )


def natural_key(name: str) -> tuple:
    """Model order: embeddings, layers (2 before 10), the rest, the LM head."""
    rank = {"embed": 0, "other": 2, "lm_head": 3}.get(layer_of(name), 1)
    return (rank, *(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)))


_LAYER = re.compile(r"\.layers\.(\d+)\.")


def layer_of(name: str) -> str:
    """'model.layers.3.mlp...' -> '3'; embeddings/head/final norm -> their own buckets."""
    m = _LAYER.search(name)
    if m:
        return m.group(1)
    if "embed" in name:
        return "embed"
    if "lm_head" in name:
        return "lm_head"
    return "other"
