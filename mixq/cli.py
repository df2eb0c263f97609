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
    p.add_argument("--tp-size", type=int, default=1, help="also predict each TP rank's weight bytes")
    p.add_argument("--ep-size", type=int, default=1, help="expert-parallel size inside the TP group (SGLang's)")
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
                       "the memory stats. With no --model-path and no config: the embedded default mix.")
    p.add_argument("--model-path")
    p.add_argument("--mixed-precision-config")
    p.add_argument("--prompt", action="append", help="prompt (repeat for a batch)")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--enable-expert-tracking", action="store_true", help="count MoE expert activations")
    p.add_argument("--expert-stats-out", metavar="PATH", help="write the expert stats JSON here (implies tracking)")
    p.add_argument("--tp-size", type=int, default=1, help="tensor-parallel ranks (this process is rank 0)")
    p.add_argument("--ep-size", type=int, default=1, help="expert-parallel size inside the TP group")
    p.set_defaults(func=_cmd_generate)


def _cmd_generate(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from mixq.engine.engine import LLM, EngineConfig, load_plan, tokenizer_path

    model_path, cfg = _model_args(args)
    track = args.enable_expert_tracking or args.expert_stats_out is not None
    # the KV cache holds exactly this work (every prompt with its new tokens, all at once):
    # tokenize first, then size the engine
    ecfg = EngineConfig(model_path=model_path, mixed_precision_config=cfg)
    tok_path = tokenizer_path(ecfg, load_plan(ecfg)[0])
    tok = AutoTokenizer.from_pretrained(tok_path)
    prompts = args.prompt or ["The capital of France is"]
    if args.chat:
        prompts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True) for p in prompts]
    ids = [tok.encode(p) for p in prompts]
    page = ecfg.page_size
    blocks = sum(-(-(len(i) + args.max_new_tokens) // page) for i in ids)
    llm = LLM(model_path=model_path, mixed_precision_config=cfg, tokenizer_path=tok_path, device=args.device,
              dtype=args.dtype, show_progress=True, enable_expert_tracking=track, tp_size=args.tp_size,
              ep_size=args.ep_size, max_total_tokens=blocks * page, max_running_requests=len(ids))
    try:
        return _generate(llm, args, ids)
    finally:
        llm.close()


def _generate(llm, args: argparse.Namespace, ids: list[list[int]]) -> int:
    import resource
    import time

    from mixq.engine.sampling_params import SamplingParams
    from mixq.tracking.memory import get_mixed_precision_memory_stats

    sp = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                        seed=args.seed)
    t0 = time.perf_counter()
    outs = llm.generate(ids, sp)
    dt = time.perf_counter() - t0
    n_tok = sum(len(o.outputs[0].token_ids) for o in outs)
    for p, o in zip(args.prompt or ["The capital of France is"], outs):
        print(f"{p}{o.outputs[0].text}")
        print("-" * 40)
    eng = llm.engine
    if eng.dist is not None:  # tensor/expert parallel: what each rank holds
        from mixq.distributed.report import format_layout

        print(format_layout(eng.dist.layout, eng.dist.rank_stats))
    s = get_mixed_precision_memory_stats()
    fmts = ", ".join(f"{k} {v['memory_mb']:.1f} MB" for k, v in s["by_format"].items())
    print(f"{n_tok} tokens in {dt:.2f} s ({n_tok / dt:.1f} tokens/s) on {eng.device}")
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


def _add_plan(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan", help="write a mixed-precision config from expert activation stats and a memory budget",
        description="Rank experts by the tokens routed to them (stats from --enable-expert-tracking) and write a "
        "mixed-precision YAML that fits --budget-gb of weights: attention, dense MLPs and shared experts get the "
        "best format first, then routed experts from the most to the least loaded. Checkpoint paths come from "
        "--mixed-precision-config (its mapping is ignored) and/or the --*-path flags.")
    p.add_argument("--stats", action="append", required=True, metavar="JSON",
                   help="expert stats file (exported by the server or mixq generate); repeat to sum several")
    p.add_argument("--budget-gb", type=float, required=True, help="weight memory budget in GiB (2^30 bytes), "
                   "as mixq inspect reports it")
    p.add_argument("-o", "--output", required=True, help="the YAML config to write")
    p.add_argument("--mixed-precision-config", help="take the checkpoint paths (and inference/server sections) "
                   "from this config")
    p.add_argument("--model-path", help="the base (BF16/FP16) checkpoint (default: the config's fp16_path)")
    for key in ("fp8", "int8", "int4", "gptq-int4", "awq-int4"):
        p.add_argument(f"--{key}-path", help=f"the {key.upper().replace('-', ' ')} checkpoint")
    p.add_argument("--formats", nargs="+", help="precisions to use, e.g. 'bf16,fp8,int4' (default: the base and "
                   "one per checkpoint given)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_cmd_plan)


def _cmd_plan(args: argparse.Namespace) -> int:
    import json
    from dataclasses import asdict
    from pathlib import Path

    from mixq.config.schema import MixedPrecisionConfig
    from mixq.tracking.expert_stats import read_stats
    from mixq.tracking.planner import make_plan, render_plan

    paths, sections = {}, {}
    if args.mixed_precision_config:
        cfg = MixedPrecisionConfig.from_yaml(args.mixed_precision_config, model_path=args.model_path)
        paths = cfg.mixed_precision.paths()
        sections = {k: v for k, v in (("inference", cfg.inference.model_dump(exclude_defaults=True)),
                                      ("server", cfg.server.model_dump(exclude_defaults=True))) if v}
    for key in ("model", "fp8", "int8", "int4", "gptq_int4", "awq_int4"):
        value = getattr(args, f"{key}_path")
        if value is not None:
            paths["fp16_path" if key == "model" else f"{key}_path"] = str(Path(value).resolve())
    if "fp16_path" not in paths:
        raise MixqError("plan: give --model-path (the base checkpoint) or a --mixed-precision-config with fp16_path")
    if args.budget_gb <= 0:
        raise MixqError(f"--budget-gb must be > 0, got {args.budget_gb}")
    formats = [f for item in args.formats for f in item.split(",") if f] if args.formats else None
    try:
        stats = [read_stats(p) for p in args.stats]
    except ValueError as e:
        raise MixqError(f"--stats {e}") from None
    result = make_plan(stats, paths, int(args.budget_gb * 2**30), args.output, formats, sections)
    print(json.dumps(asdict(result), indent=2) if args.json else render_plan(result))
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


def _add_eval_ppl(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval-ppl", help="perplexity on real English text, per format and for the mix",
                       description="Perplexity on Shakespeare's The Tempest (shipped with mixq). With no model "
                       "flags: the embedded default model in BF16, in each single format, and its default mix.")
    p.add_argument("--model-path")
    p.add_argument("--mixed-precision-config")
    p.add_argument("--max-tokens", type=int, default=4096)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_eval_ppl)


def _cmd_eval_ppl(args: argparse.Namespace) -> int:
    import json

    from mixq.assets.text import load_eval_text
    from mixq.engine.engine import LLM
    from mixq.engine.perplexity import perplexity

    if args.model_path is None and args.mixed_precision_config is None:
        from mixq.assets.default_model import default_eval_configs

        runs = [(name, None, cfg) for name, cfg in default_eval_configs().items()]
    else:
        runs = [("model", args.model_path, args.mixed_precision_config)]
    text = load_eval_text()
    results = {}
    for name, model_path, cfg in runs:
        llm = LLM(model_path=model_path, mixed_precision_config=cfg, device=args.device, dtype=args.dtype,
                  max_total_tokens=args.window + 64)
        results[name] = perplexity(llm.engine, text, args.window, args.max_tokens)
        if not args.json:
            r = results[name]
            print(f"{name:<10} perplexity {r['perplexity']:8.3f}  ({r['tokens']} tokens, window {r['window']})",
                  flush=True)
        del llm
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mixq", description="LLM inference in true mixed precision.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_inspect(sub)
    _add_generate(sub)
    _add_eval_ppl(sub)
    _add_plan(sub)
    _add_plot_experts(sub)
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
