"""`mixq plan`: a mixed-precision config under a memory budget, from measured losses
(`--measure`, the knapsack) or, for MoE users without a measure file, from expert loads
alone (`--stats`, the frequency-only greedy planner of mixq.tracking.planner)."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from mixq.errors import MixqError
from mixq.quality.cli_measure import add_source_args, formats_of, source_paths


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan", help="write a mixed-precision config under a memory budget (from measured losses or expert loads)",
        description="With --measure (from `mixq measure`): choose each unit's format to minimise the summed "
        "estimated loss with the weights within --budget-gb or --bits-per-weight (a multiple-choice knapsack; "
        "fused q/k/v and gate/up stay in one format; --stats reweights routed experts by their load). Without it: "
        "rank experts by the tokens routed to them (--stats, from --enable-expert-tracking) and give attention, "
        "dense MLPs, shared experts, then the hottest experts the best format that fits. Checkpoint paths come "
        "from the measure file, --mixed-precision-config (its mapping is ignored) and/or the --*-path flags.")
    p.add_argument("--measure", metavar="JSON", help="per-unit loss estimates from `mixq measure`")
    p.add_argument("--estimator", choices=("exact", "proxy"), help="which estimates to use (default: exact when "
                   "measured, else proxy)")
    p.add_argument("--stats", action="append", metavar="JSON",
                   help="expert stats file (exported by the server or mixq generate); repeat to sum several")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--budget-gb", type=float, help="weight memory budget in GiB (2^30 bytes), as mixq "
                        "inspect reports it")
    budget.add_argument("--bits-per-weight", type=float, help="budget as bits per parameter over every weight "
                        "(8 x bytes / parameters)")
    p.add_argument("-o", "--output", required=True, help="the YAML config to write")
    p.add_argument("--disable-verify", action="store_true", help="with --measure: write the knapsack's plan "
                   "without scoring it (by default the plan, every single format that fits the budget and a few "
                   "runners-up are scored by KL divergence from the base on calibration tokens measure did not use, "
                   "never the evaluation text, and the best is written)")
    p.add_argument("--verify-tokens", type=int, default=1024, help="calibration tokens after the measured ones to "
                   "verify on (default 1024)")
    p.add_argument("--verify-neighbors", type=int, default=2, help="runners-up of the knapsack to verify too "
                   "(default 2)")
    p.add_argument("--device", help="where to verify (default: the device measure ran on)")
    add_source_args(p)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)


def _budget(args, params: int) -> int:
    if args.budget_gb is not None:
        if args.budget_gb <= 0:
            raise MixqError(f"--budget-gb must be > 0, got {args.budget_gb}")
        return int(args.budget_gb * 2**30)
    if args.bits_per_weight <= 0:
        raise MixqError(f"--bits-per-weight must be > 0, got {args.bits_per_weight}")
    return int(args.bits_per_weight * params / 8)


def _read_stats(paths: list[str]) -> list[dict]:
    from mixq.tracking.expert_stats import read_stats

    try:
        return [read_stats(p) for p in paths]
    except ValueError as e:
        raise MixqError(f"--stats {e}") from None


def run(args: argparse.Namespace) -> int:
    given, sections = source_paths(args)
    if args.measure is None:
        return _frequency_only(args, given, sections)
    from mixq.quality import planner
    from mixq.quality.measure import _stats_frequency
    from mixq.quality.units import UnitSpace

    doc = planner.read_measure(args.measure)
    paths = planner.sources_for(doc, given)
    planner.check_base(doc, paths["fp16_path"], args.measure)
    measured = [f for f in doc["sources"] if f != doc["base_precision"]]
    space = UnitSpace(paths, formats_of(args) or measured)
    planner.check_space(doc, space, args.measure)
    stats_freq = None
    if args.stats:
        from mixq.tracking.expert_stats import merge_stats

        docs = _read_stats(args.stats)
        stats_freq = _stats_frequency(merge_stats(*docs) if len(docs) > 1 else docs[0], space,
                                      _top_k(space))
    params = sum(t.numel for t in space.base_plan.tensors.values())
    verify = None
    if not args.disable_verify:
        from mixq.quality.verify import VerifySettings

        if args.verify_neighbors < 0:
            raise MixqError(f"--verify-neighbors must be >= 0, got {args.verify_neighbors}")
        verify = VerifySettings(args.verify_tokens, args.verify_neighbors, args.device)
    result = planner.plan_from_measure(doc, space, _budget(args, params), args.output, args.estimator, stats_freq,
                                       sections, measure_path=args.measure, verify=verify)
    print(json.dumps(asdict(result), indent=2) if args.json else planner.render(result))
    return 0


def _top_k(space) -> int:
    cfg = space.base_plan.model_config
    return int(cfg.get("num_experts_per_tok") or cfg.get("top_k") or 1)


def _frequency_only(args, paths: dict, sections: dict) -> int:
    from mixq.tracking.planner import make_plan, render_plan

    if not args.stats:
        raise MixqError("plan: give --measure (from `mixq measure`) or --stats (expert loads, for the "
                        "frequency-only planner)")
    if "fp16_path" not in paths:
        raise MixqError("plan: give --model-path (the base checkpoint) or a --mixed-precision-config with fp16_path")
    params = 0
    if args.bits_per_weight is not None:
        from mixq.config.schema import MixedPrecisionConfig
        from mixq.formats.plan import build_plan

        base = build_plan(MixedPrecisionConfig.from_dict({"mixed_precision": {"fp16_path": paths["fp16_path"]}}))
        params = sum(t.numel for t in base.tensors.values())
    result = make_plan(_read_stats(args.stats), paths, _budget(args, params), args.output, formats_of(args),
                       sections)
    print(json.dumps(asdict(result), indent=2) if args.json else render_plan(result))
    return 0
