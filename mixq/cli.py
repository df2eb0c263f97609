"""The `mixq` command line: one place that reads arguments; each subcommand receives a
config object. Errors the user can fix print one line and exit non-zero."""

from __future__ import annotations

import argparse
import sys

from mixq.errors import MixqError
from mixq.export.cli import add_parser as add_export_parser
from mixq.quality import cli_eval, cli_measure, cli_plan


def _add_inspect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect",
        help="show each tensor's precision, source and bytes for a config (headers only)",
        description="Print, per layer, each tensor's precision, source checkpoint, format and "
        "bytes, then totals per format and the memory saved against BF16. Reads only "
        "safetensors headers: no GPU, seconds even for a 235B-class index.",
    )
    p.add_argument("path", nargs="?", help="a checkpoint directory (same as --model-path), e.g. a mixq export")
    p.add_argument("--model-path", help="the base checkpoint (default: the config's fp16_path)")
    p.add_argument("--mixed-precision-config", help="mixed-precision YAML config")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--tp-size", type=int, default=1, help="also predict each TP rank's weight bytes")
    p.add_argument("--ep-size", type=int, default=1, help="expert-parallel size inside the TP group (SGLang's)")
    p.set_defaults(func=_cmd_inspect)


def _cmd_inspect(args: argparse.Namespace) -> int:
    from mixq.config.schema import MixedPrecisionConfig
    from mixq.formats.plan import build_plan
    from mixq.inspect_plan import plan_report, render_json, render_text

    if args.path is not None:
        if args.model_path is not None:
            raise MixqError("inspect: give the checkpoint either as PATH or as --model-path, not both")
        args.model_path = args.path
    if args.mixed_precision_config is None and args.model_path is None:
        raise MixqError("inspect: give --model-path and/or --mixed-precision-config")
    cfg = None
    if args.mixed_precision_config is not None:
        cfg = MixedPrecisionConfig.from_yaml(args.mixed_precision_config, model_path=args.model_path)
    plan = build_plan(cfg, model_path=args.model_path)
    parallel = None
    if args.tp_size > 1 or args.ep_size > 1:
        from mixq.distributed.config import ParallelConfig

        parallel = ParallelConfig(tp_size=args.tp_size, ep_size=args.ep_size)
    report = plan_report(plan, parallel)
    print(render_json(report) if args.json else render_text(report))
    return 0


def _model_args(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """(model path, config) from flags; neither given means the embedded default mix."""
    if args.model_path is None and args.mixed_precision_config is None:
        from mixq.assets.default_model import default_config_path

        return None, str(default_config_path())
    return args.model_path, args.mixed_precision_config


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="complete prompts (default: the embedded SmolLM2 mix)",
                       description="Load a (mixed-precision) model and print completions, tokens/s and "
                       "the memory stats. With no --model-path and no config: the embedded default mix "
                       "(prepared into ~/.cache/mixq on first use, about a minute).")
    p.add_argument("--model-path", help="model directory (the base checkpoint)")
    p.add_argument("--mixed-precision-config", help="mixed-precision YAML (docs/config.md)")
    p.add_argument("--prompt", action="append", help="prompt (repeat for a batch) (default: 'The capital of "
                   "France is')")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template and "
                   "print the answer under it")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per prompt at most")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 is greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1]")
    p.add_argument("--seed", type=int, help="seed for sampling (64-bit signed integer)")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cuda, cuda:N or cpu")
    p.add_argument("--dtype", default="auto", help="auto, bfloat16, float16 or float32 (auto: on CPU bfloat16 "
                   "where it has native bf16, else float32; on GPU the checkpoint's 16-bit dtype)")
    p.add_argument("--enable-expert-tracking", action="store_true", help="count MoE expert activations")
    p.add_argument("--expert-stats-out", metavar="PATH", help="write the expert stats JSON here (implies tracking)")
    p.add_argument("--tp-size", type=int, default=1, help="tensor-parallel ranks (this process is rank 0)")
    p.add_argument("--ep-size", type=int, default=1, help="expert-parallel size inside the TP group")
    p.set_defaults(func=_cmd_generate)


def _cmd_generate(args: argparse.Namespace) -> int:
    from mixq.engine.engine import LLM, EngineConfig, load_plan, tokenizer_path
    from mixq.formats.gguf_file import load_tokenizer
    from mixq.server.args import check_generate_args

    sp = check_generate_args(args)  # every flag checked before anything is prepared or loaded
    model_path, cfg = _model_args(args)
    track = args.enable_expert_tracking or args.expert_stats_out is not None
    # the KV cache holds exactly this work (every prompt with its new tokens, all at once):
    # tokenize first, then size the engine
    ecfg = EngineConfig(model_path=model_path, mixed_precision_config=cfg)
    tok_path = tokenizer_path(ecfg, load_plan(ecfg)[0])
    tok = load_tokenizer(tok_path)
    prompts = args.prompt or ["The capital of France is"]
    if args.chat:
        # the template writes the special tokens itself: encode it without adding more
        ids = [tok.encode(tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                  add_generation_prompt=True), add_special_tokens=False)
               for p in prompts]
    else:
        ids = [tok.encode(p) for p in prompts]
    page = ecfg.page_size
    blocks = sum(-(-(len(i) + sp.max_new_tokens) // page) for i in ids)
    llm = LLM(model_path=model_path, mixed_precision_config=cfg, tokenizer_path=tok_path, device=args.device,
              dtype=args.dtype, show_progress=True, enable_expert_tracking=track, tp_size=args.tp_size,
              ep_size=args.ep_size, max_total_tokens=blocks * page, max_running_requests=len(ids))
    try:
        return _generate(llm, args, sp, prompts, ids)
    finally:
        llm.close()


def _generate(llm, args: argparse.Namespace, sp, prompts: list[str], ids: list[list[int]]) -> int:
    import resource
    import time

    from mixq.tracking.memory import get_mixed_precision_memory_stats

    t0 = time.monotonic()  # the engine stamps first tokens with time.monotonic
    outs = llm.generate(ids, sp)
    t1 = time.monotonic()
    dt = t1 - t0
    n_tok = sum(len(o.outputs[0].token_ids) for o in outs)
    for p, o in zip(prompts, outs):
        # a completion continues its prompt; a chat answer is a reply, printed under it
        print(f"{p}\n{o.outputs[0].text}" if args.chat else f"{p}{o.outputs[0].text}")
        print("-" * 40)
    eng = llm.engine
    if eng.dist is not None:  # tensor/expert parallel: what each rank holds
        from mixq.distributed.report import format_layout

        print(format_layout(eng.dist.layout, eng.dist.rank_stats))
    s = get_mixed_precision_memory_stats()
    fmts = ", ".join(f"{k} {v['memory_mb']:.1f} MB" for k, v in s["by_format"].items())
    print(f"{n_tok} tokens in {dt:.2f} s ({n_tok / dt:.1f} tokens/s) on {eng.device}")
    firsts = [o.metrics.get("first_token_time") for o in outs if o.outputs[0].token_ids]
    if firsts and None not in firsts:
        # the wall-clock rate above includes the prompt's prefill and first-call costs; once
        # every prompt has its first token, the rest is decode
        ttft, rest = max(firsts) - t0, n_tok - len(firsts)
        decode = f", then {rest} tokens at {rest / (t1 - max(firsts)):.1f} tokens/s" if rest and t1 > max(firsts) else ""
        print(f"first token after {ttft:.2f} s ({sum(map(len, ids))} prompt tokens){decode}")
    print(f"weights {s['memory_mb']:.1f} MB ({fmts}); saved {s['memory_saved_mb']:.1f} MB vs BF16, "
          f"compression {s['compression_ratio']:.2f}x")
    # ru_maxrss is KiB on Linux
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"KV cache {eng.kv_cache_tokens} tokens ({eng.kv_cache_bytes / 2**20:.1f} MiB); peak RSS {peak:.0f} MiB")
    if llm.engine.expert_tracker is not None:
        doc = llm.engine.expert_tracker.stats(top_k=5)
        for lid, b in doc["load_balance"].items():
            if b["max_over_mean"] is not None:
                print(f"MoE layer {lid}: max/mean load {b['max_over_mean']:.2f}, "
                      f"normalized entropy {b['normalized_entropy']:.3f}")
        print("top experts: " + ", ".join(f"L{t['layer_id']}/E{t['expert_id']} {t['total_tokens_processed']} tokens"
                                          for t in doc["top_experts"]))
        if args.expert_stats_out:
            llm.engine.expert_tracker.export_stats(args.expert_stats_out)
            print(f"expert stats written to {args.expert_stats_out}")
    return 0


def _add_plot_experts(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot-experts", help="draw the layer x expert activation heatmap of a stats file",
                       description="Heatmap of an expert stats JSON: one row per MoE layer, one column per expert.")
    p.add_argument("stats", help="expert stats JSON")
    p.add_argument("-o", "--output", default="experts.png", help="image to write (png, svg, pdf)")
    p.add_argument("--metric", choices=("tokens", "activations"), default="tokens",
                   help="tokens routed (default) or forward passes with >= 1 token")
    p.add_argument("--absolute", action="store_true", help="raw counts instead of each layer's share")
    p.set_defaults(func=_cmd_plot_experts)


def _cmd_plot_experts(args: argparse.Namespace) -> int:
    from mixq.tracking.expert_stats import read_stats
    from mixq.tracking.plot import plot_expert_heatmap

    try:
        doc = read_stats(args.stats)
    except ValueError as e:
        raise MixqError(str(e)) from None
    plot_expert_heatmap(doc, args.output, metric=args.metric, normalize=not args.absolute)
    print(f"wrote {args.output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from mixq.argparsing import Parser

    parser = Parser(prog="mixq", description="LLM inference in true mixed precision.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_inspect(sub)
    _add_generate(sub)
    cli_eval.add_parser(sub)
    cli_measure.add_parser(sub)
    cli_plan.add_parser(sub)
    _add_plot_experts(sub)
    add_export_parser(sub)
    serve = sub.add_parser("serve", help="OpenAI-compatible server (SGLang's launch flags)", add_help=False)
    serve.set_defaults(func=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:  # the launcher owns its flags (and --help)
        from mixq.server.launch import main as serve_main

        return serve_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except MixqError as e:
        print(f"mixq {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
