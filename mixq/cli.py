"""The `mixq` command line: one place that reads arguments; each subcommand receives a
config object. Errors the user can fix print one line and exit non-zero."""

from __future__ import annotations

import argparse
import sys

from mixq.errors import MixqError


def _add_inspect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect",
        help="show each tensor's precision, source and bytes for a config (headers only)",
        description="Print, per layer, each tensor's precision, source checkpoint, format and "
        "bytes, then totals per format and the memory saved against BF16. Reads only "
        "safetensors headers: no GPU, seconds even for a 235B-class index.",
    )
    p.add_argument("--model-path", help="the base checkpoint (default: the config's fp16_path)")
    p.add_argument("--mixed-precision-config", help="mixed-precision YAML config")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_inspect)


def _cmd_inspect(args: argparse.Namespace) -> int:
    from mixq.config.schema import MixedPrecisionConfig
    from mixq.formats.plan import build_plan
    from mixq.inspect_plan import plan_report, render_json, render_text

    if args.mixed_precision_config is None and args.model_path is None:
        raise MixqError("inspect: give --model-path and/or --mixed-precision-config")
    cfg = None
    if args.mixed_precision_config is not None:
        cfg = MixedPrecisionConfig.from_yaml(args.mixed_precision_config, model_path=args.model_path)
    plan = build_plan(cfg, model_path=args.model_path)
    report = plan_report(plan)
    print(render_json(report) if args.json else render_text(report))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mixq", description="LLM inference in true mixed precision.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_inspect(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except MixqError as e:
        print(f"mixq {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
