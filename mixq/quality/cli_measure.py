"""`mixq measure`: per-unit loss estimates of each candidate format -> measure.json."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mixq.errors import MixqError


def add_source_args(p: argparse.ArgumentParser) -> None:
    """The checkpoint flags `measure` and `plan` share (config path keys as flags)."""
    p.add_argument("--mixed-precision-config", help="take the checkpoint paths from this config (its mapping is "
                   "ignored)")
    p.add_argument("--model-path", help="the base (BF16/FP16) checkpoint (default: the config's fp16_path)")
    for key in ("fp8", "int8", "int4", "gptq-int4", "awq-int4"):
        p.add_argument(f"--{key}-path", help=f"the {key.upper().replace('-', ' ')} checkpoint")
    p.add_argument("--gguf-path", help="a llama.cpp GGUF of the model (candidate 'gguf': each tensor's stored type)")
    p.add_argument("--formats", nargs="+", help="precisions to choose from, e.g. 'fp8,int4' (default: one per "
                   "checkpoint given)")


def source_paths(args: argparse.Namespace) -> tuple[dict[str, str], dict]:
    """(path key -> checkpoint dir, the config's inference/server sections) from the flags."""
    from mixq.config.schema import MixedPrecisionConfig

    paths, sections = {}, {}
    if args.mixed_precision_config:
        cfg = MixedPrecisionConfig.from_yaml(args.mixed_precision_config, model_path=args.model_path)
        paths = dict(cfg.mixed_precision.paths())
        sections = {k: v for k, v in (("inference", cfg.inference.model_dump(exclude_defaults=True)),
                                      ("server", cfg.server.model_dump(exclude_defaults=True))) if v}
    for key in ("model", "fp8", "int8", "int4", "gptq_int4", "awq_int4", "gguf"):
        value = getattr(args, f"{key}_path")
        if value is not None:
            paths["fp16_path" if key == "model" else f"{key}_path"] = str(Path(value).resolve())
    return paths, sections


def formats_of(args: argparse.Namespace) -> list[str] | None:
    return [f for item in args.formats for f in item.split(",") if f] if args.formats else None


def add_parser(sub: argparse._SubParsersAction) -> None:
    from mixq.assets.text import CALIBRATION_TEXT_NAME, EVAL_TEXT_NAME

    p = sub.add_parser(
        "measure", help="estimate what each format costs each unit (layer part, expert) -> measure.json",
        description="For every unit (per layer q/k/v, o, gate/up, down; per expert gate/up and down; shared "
        "experts; a quantized LM head) and every candidate format its checkpoints offer: the bytes, and the loss "
        "of moving that unit alone from the base to the candidate. Estimators: 'exact' (mean KL divergence of "
        "the model with only that unit swapped; small models) and 'proxy' (the unit's relative output error on "
        "the calibration activations, routed experts weighted by routing frequency). Calibration text: "
        f"{CALIBRATION_TEXT_NAME}, unlike `mixq eval`'s {EVAL_TEXT_NAME}. An interrupted run resumes from "
        "OUTPUT.partial.")
    add_source_args(p)
    p.add_argument("-o", "--output", default="measure.json", help="where to write (default: measure.json)")
    p.add_argument("--estimators", default="exact,proxy", help="exact, proxy or both (default: exact,proxy)")
    p.add_argument("--text", metavar="FILE", help=f"UTF-8 calibration text (default: {CALIBRATION_TEXT_NAME})")
    p.add_argument("--max-tokens", type=int, default=512, help="calibrate on the first N tokens (default 512)")
    p.add_argument("--window", type=int, default=512, help="tokens per window (each starts fresh; default 512)")
    p.add_argument("--stats", metavar="JSON", help="expert stats (--enable-expert-tracking): routing frequency "
                   "of each expert for the proxy, instead of counting it on the calibration text")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cuda, cuda:N or cpu")
    p.add_argument("--dtype", default="auto", help="auto, bfloat16, float16 or float32 (auto: float32 on the CPU, "
                   "the engine's default on a GPU)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mixq.quality.cli_eval import read_text
    from mixq.quality.measure import measure
    from mixq.quality.units import UnitSpace

    paths, _ = source_paths(args)
    if "fp16_path" not in paths:
        raise MixqError("measure: give --model-path (the base checkpoint) or a --mixed-precision-config with "
                        "fp16_path")
    if len(paths) < 2:
        raise MixqError("measure: no candidate format; give quantized checkpoints with --fp8-path, --int4-path, "
                        "... (or a --mixed-precision-config that names them)")
    if args.text is None:
        from mixq.assets.text import CALIBRATION_TEXT_NAME, load_calibration_text

        text, text_name = load_calibration_text(), CALIBRATION_TEXT_NAME
    else:
        text, text_name = read_text(args.text)
    stats = None
    if args.stats:
        from mixq.tracking.expert_stats import read_stats

        try:
            stats = read_stats(args.stats)
        except ValueError as e:
            raise MixqError(f"--stats {e}") from None
    space = UnitSpace(paths, formats_of(args))
    out = Path(args.output)
    if out.exists() and out.is_dir():
        raise MixqError(f"-o {out}: is a directory")
    estimators = tuple(x for x in args.estimators.split(",") if x)
    doc = measure(space, text, out, text_name, args.window, args.max_tokens, estimators, stats, args.device,
                  args.dtype, say=print)
    print(f"wrote {out}: {len(doc['units'])} units, {len(doc['entries'])} (unit, format) estimates on "
          f"{doc['calibration']['tokens']} tokens of {text_name} in {doc['seconds']:.0f} s")
    c = doc["rank_correlation"]
    if c is not None:
        per = ", ".join(f"{f} {r:.3f}" for f, r in c["by_precision"].items())
        print(f"rank correlation (Spearman) of proxy vs exact: {c['spearman']:.3f} over {c['entries']} estimates"
              + (f" (per format: {per})" if per else ""))
    if args.output == "-":
        print(json.dumps(doc))
    return 0
