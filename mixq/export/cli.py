"""`mixq export --mixed-precision-config mix.yaml -o DIR [--target ...]`."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `mixq export`."""
    p = sub.add_parser(
        "export", help="write a mix as one compressed-tensors checkpoint (vLLM, SGLang, transformers)",
        description="Write the mixed-precision config as one compressed-tensors checkpoint: safetensors shards, "
        "config.json with one config group per scheme (exact module names; dense Linears under ignore), "
        "tokenizer and generation config. Packed formats are converted losslessly (GPTQ, AWQ -> pack-quantized; "
        "FP8 -> float-quantized; INT8 -> int-quantized, or pack-quantized when weight-only). "
        "--target vllm/sglang first refuses, by name, what that engine would refuse or load wrongly. "
        "See docs/export.md.")
    p.add_argument("--mixed-precision-config", required=True, help="the mix (YAML)")
    p.add_argument("-o", "--output", required=True, help="directory to write (must be new or empty)")
    p.add_argument("--target", choices=("compressed-tensors", "vllm", "sglang"), default="compressed-tensors",
                   help="compressed-tensors (default): every tensor in its own scheme, per-expert mixes "
                   "included; vllm / sglang: refuse what that engine would refuse")
    p.add_argument("--uniform-experts", choices=("higher", "lower"),
                   help="give each MoE layer whose experts differ one format: the highest- or lowest-precision "
                   "source among those it uses (prints the bytes change)")
    p.add_argument("--model-path", help="the base checkpoint (default: the config's fp16_path)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--max-shard-size", type=float, default=4.0, metavar="GIB",
                   help="safetensors shard size in GiB (default 4)")
    p.add_argument("--verify", action="store_true",
                   help="read the export back before moving it into place: every tensor must dequantize "
                   "bit-identically to its source (reads everything twice)")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    from mixq.config.schema import MixedPrecisionConfig
    from mixq.errors import MixqError
    from mixq.export.writer import export_mix

    if not args.max_shard_size > 0:
        raise MixqError(f"--max-shard-size must be > 0 GiB, got {args.max_shard_size}")
    cfg = MixedPrecisionConfig.from_yaml(args.mixed_precision_config, model_path=args.model_path)
    export_mix(cfg, args.output, target=args.target, uniform=args.uniform_experts, overwrite=args.overwrite,
               shard_bytes=int(args.max_shard_size * 2**30), verify=args.verify)
    return 0
