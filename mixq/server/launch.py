"""Start the HTTP server: validate flags, load the engine, serve until SIGINT/SIGTERM."""

from __future__ import annotations

import logging
import sys

from mixq.errors import MixqError
from mixq.server.args import ServerArgs

log = logging.getLogger("mixq.server")


def _gpu_count(device: str) -> int | None:
    if device == "cpu":
        return None
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else (0 if device == "cuda" else None)


def _server_class():
    import contextlib
    import signal

    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn re-raises the signal after its graceful shutdown, killing the process
        before the engine thread is stopped; handle SIGINT/SIGTERM here instead: the first
        asks for a graceful exit, a second forces it."""

        @contextlib.contextmanager
        def capture_signals(self):
            def handler(sig, frame):
                if self.should_exit:
                    self.force_exit = True
                self.should_exit = True

            old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, h in old.items():
                    signal.signal(s, h)

    return Server


def _Server(config):
    return _server_class()(config)


def check_args(args: ServerArgs) -> None:
    """Every refusal that needs no weights: runs before anything is loaded."""
    from mixq.distributed.config import ParallelConfig

    args.validate(_gpu_count(args.device))
    # the parallel layout's own refusals, still before any loading
    ParallelConfig(args.tp_size, args.ep_size, args.nnodes, args.node_rank, args.dist_init_addr, args.moe_dispatch)


def engine_config(args: ServerArgs):
    """The EngineConfig the flags describe (no flags: the embedded default mix)."""
    from mixq.engine.engine import EngineConfig

    model_path, cfg = args.model_path, args.mixed_precision_config
    if model_path is None and cfg is None:
        from mixq.assets.default_model import default_config_path

        cfg = str(default_config_path())
    return EngineConfig(
        model_path=model_path, mixed_precision_config=cfg, tokenizer_path=args.tokenizer_path, dtype=args.dtype,
        device=args.device, max_model_len=args.context_length, max_running_requests=args.max_running_requests,
        chunked_prefill_size=args.chunked_prefill_size, max_total_tokens=args.max_total_tokens,
        page_size=args.page_size, mem_fraction_static=args.mem_fraction_static,
        cpu_kv_cache_space=args.cpu_kv_cache_space, show_progress=True,
        attention_backend=args.attention_backend, kv_cache_dtype=args.kv_cache_dtype,
        disable_cuda_graph=args.disable_cuda_graph, cuda_graph_max_bs=args.cuda_graph_max_bs,
        cuda_graph_bs=args.cuda_graph_bs,
        enable_expert_tracking=args.enable_expert_tracking, tp_size=args.tp_size, ep_size=args.ep_size, nnodes=args.nnodes, node_rank=args.node_rank,
        dist_init_addr=args.dist_init_addr, moe_dispatch=args.moe_dispatch)


def serve(args: ServerArgs) -> int:
    import uvicorn

    from mixq.server.app import build_app
    from mixq.server.async_engine import AsyncEngine
    from mixq.server.metrics import ServerMetrics

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    check_args(args)
    ecfg = engine_config(args)
    if args.node_rank > 0:  # a worker node: its TP ranks run until node 0's rank 0 stops them
        from mixq.distributed.workers import run_node

        print(f"mixq: node {args.node_rank} of {args.nnodes} serving TP ranks for {args.dist_init_addr}", flush=True)
        status = run_node(ecfg, ecfg.parallel())
        print("mixq: shut down cleanly" if status == 0 else f"mixq: node exited with status {status}", flush=True)
        return status
    default_name = None
    if args.model_path is None and args.mixed_precision_config is None:
        from mixq.assets.default_model import NAME

        default_name = NAME
    if args.dp_size > 1:
        from mixq.distributed.dp import DataParallelEngine, DPMetrics

        per_replica: list[ServerMetrics] = []

        def on_step(replica):
            per_replica.append(ServerMetrics(replica))
            return per_replica[-1].on_step

        aengine = DataParallelEngine(ecfg, args.dp_size, on_step)
        engine, metrics = aengine.engine, DPMetrics(per_replica)
    else:
        from mixq.engine.engine import LLMEngine

        engine = LLMEngine(ecfg)
        metrics = ServerMetrics(engine)
        aengine = AsyncEngine(engine, on_step=metrics.on_step)
    name = args.served_model_name or default_name or engine.plan.base.path.name
    info = {k: v for k, v in vars(args).items() if k not in ("api_key", "extra")}
    app = build_app(aengine, metrics, name, info, api_key=args.api_key, allow_auto_truncate=args.allow_auto_truncate,
                    expert_stats_dir=args.expert_stats_dir)
    aengine.start()
    url = f"http://{args.host}:{args.port}"
    print(f"mixq: serving {name!r} at {url} (OpenAI API at {url}/v1)\n"
          f"  try: curl {url}/v1/completions -H 'Content-Type: application/json' "
          f"-d '{{\"model\": \"{name}\", \"prompt\": \"The capital of France is\", \"max_tokens\": 16}}'",
          flush=True)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level.lower(),
                            timeout_graceful_shutdown=10)
    try:
        _Server(config).run()  # SIGINT/SIGTERM: stop accepting, let in-flight requests finish
    finally:
        aengine.shutdown()
        if args.dp_size == 1:
            engine.close()  # the other TP ranks, if any
    print("mixq: shut down cleanly", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    import argparse

    from mixq.server.args import add_server_flags, from_namespace

    class Parser(argparse.ArgumentParser):
        def error(self, message):  # one line naming the problem, not a screen of usage
            self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    p = Parser(prog="mixq serve", description="OpenAI-compatible mixed-precision LLM server "
               "(SGLang's launch flags).")
    add_server_flags(p)
    ns = p.parse_args(argv)
    try:
        args = from_namespace(ns)
        check_args(args)
        if ns.model_path is None and ns.mixed_precision_config is None:
            # the embedded default: its config's server/inference sections are defaults
            # under the flags, as for any config (prepared on first use, after the checks)
            from mixq.assets.default_model import NAME, default_config_path

            ns.mixed_precision_config = str(default_config_path())
            ns.served_model_name = ns.served_model_name or NAME
            args = from_namespace(ns)
        return serve(args)
    except MixqError as e:
        print(f"mixq serve: error: {e}", file=sys.stderr)
        return 2
