"""`mixq eval` (alias `eval-ppl`): the quality scoreboard of one or more configs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mixq.errors import MixqError


def add_parser(sub: argparse._SubParsersAction) -> None:
    from mixq.assets.text import CALIBRATION_TEXT_NAME, EVAL_TEXT_NAME

    p = sub.add_parser(
        "eval", aliases=["eval-ppl"], help="quality scoreboard: perplexity and KL divergence vs BF16, per config",
        description="For each config: weight bytes (as mixq inspect counts them), bits per weight, perplexity, "
        "ΔPPL %, mean and 99.9th-percentile KL divergence of the next-token distribution from the base (BF16) "
        "model, and how often the top token is the same. The base runs once; every config is compared with "
        f"its stored log-probabilities. Default text: {EVAL_TEXT_NAME} (held out: `mixq measure` calibrates on "
        f"{CALIBRATION_TEXT_NAME}). With no config: the embedded default model in BF16, in each single format, "
        "and its default mix.")
    p.add_argument("configs", nargs="*", metavar="[NAME=]CONFIG",
                   help="mixed-precision YAMLs (or model directories) to score; NAME= labels a row")
    p.add_argument("--mixed-precision-config", action="append", default=[], metavar="YAML",
                   help="another config to score (repeatable)")
    p.add_argument("--model-path", help="with no config: the model to score; with configs: their base checkpoint "
                   "(default: each config's fp16_path)")
    p.add_argument("--base", metavar="DIR", help="the reference model for KL divergence (default: the configs' "
                   "base checkpoint)")
    p.add_argument("--text", metavar="FILE", help=f"UTF-8 text to score (default: {EVAL_TEXT_NAME})")
    p.add_argument("--max-tokens", type=int, default=4096, help="score the first N tokens of the text")
    p.add_argument("--window", type=int, default=512, help="tokens per window (each starts fresh)")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cuda, cuda:N or cpu")
    p.add_argument("--dtype", default="auto", help="auto, bfloat16, float16 or float32 (auto: float32 on the CPU, "
                   "the engine's default on a GPU)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=("auto", "fp8_e4m3", "fp8_e5m2", "bfloat16",
                                                                 "float16", "float32"),
                   help="the KV cache every config runs with (auto: the model dtype); other than auto, the base "
                   "runs with a bfloat16 KV cache, so the KLD includes the cache's cost (a config that is the base "
                   "checkpoint shows that cost alone)")
    p.add_argument("--json", action="store_true", help="print {name: row} as JSON")
    p.add_argument("--plot", metavar="PNG", help="also draw mean KLD against bits per weight")
    p.set_defaults(func=run)


def read_text(path: str | None) -> tuple[str, str]:
    """(text, its name): a UTF-8 file, or the shipped evaluation text."""
    if path is None:
        from mixq.assets.text import EVAL_TEXT_NAME, load_eval_text

        return load_eval_text(), EVAL_TEXT_NAME
    try:
        return Path(path).read_text(encoding="utf-8"), path
    except FileNotFoundError:
        raise MixqError(f"--text {path}: no such file") from None
    except UnicodeDecodeError as e:
        raise MixqError(f"--text {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise MixqError(f"--text {path}: cannot read: {e.strerror}") from None


def targets_from_args(args: argparse.Namespace):
    from mixq.quality.evaluate import EvalTarget

    items = list(args.configs) + list(args.mixed_precision_config)
    if not items:
        if args.model_path is not None:
            return [EvalTarget("model", None, args.model_path)]
        from mixq.assets.default_model import default_eval_configs

        return [EvalTarget(name, cfg) for name, cfg in default_eval_configs().items()]
    out = []
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = Path(item).stem if Path(item).suffix in (".yaml", ".yml") else Path(item).name, item
        p = Path(path)
        if not p.exists():
            raise MixqError(f"{path}: no such config file or model directory")
        if p.is_dir():
            out.append(EvalTarget(name, None, str(p)))
        else:
            out.append(EvalTarget(name, str(p), args.model_path))
    return out


def run(args: argparse.Namespace) -> int:
    from mixq.quality.evaluate import evaluate, plot_frontier, render_table

    text, text_name = read_text(args.text)
    rows = evaluate(targets_from_args(args), text, args.window, args.max_tokens, base=args.base,
                    device=args.device, dtype=args.dtype, text_name=text_name,
                    kv_cache_dtype=args.kv_cache_dtype)
    print(json.dumps(rows, indent=2) if args.json else render_table(rows))
    if args.plot:
        plot_frontier(list(rows.values()), args.plot)
        if not args.json:
            print(f"plot written to {args.plot}")
    return 0
