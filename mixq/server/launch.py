"""Start the HTTP server: validate flags, load the engine, serve until SIGINT/SIGTERM."""

from __future__ import annotations

import logging
import sys

from mixq.errors import MixqError
from mixq.server.args import ServerArgs

log = logging.getLogger("mixq.server")


DRAIN_SECONDS = 10.0  # requests in flight at SIGTERM may run this long before they are ended


def _server_class():
    import asyncio
    import contextlib
    import signal

    import uvicorn

    class Server(uvicorn.Server):
        """SIGINT/SIGTERM: the first starts a graceful shutdown (new requests get 503, those
        in flight run on for up to DRAIN_SECONDS), a second ends it now. Whatever still runs
        then is ended cleanly, before uvicorn closes the connections: a stream gets an error
        event and [DONE], a waiting client a 503. (uvicorn's own handler would re-raise the
        signal after its shutdown, killing the process before the engine thread stops.)"""

        def __init__(self, config, state, end_requests):
            super().__init__(config)
            self.state, self.end_requests = state, end_requests

        @contextlib.contextmanager
        def capture_signals(self):
            def handler(sig, frame):
                if self.should_exit:
                    self.force_exit = True
                self.should_exit = True
                self.state.draining = True

            old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, h in old.items():
                    signal.signal(s, h)

        async def _wait_for_requests(self, seconds: float) -> None:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + seconds
            while self.server_state.tasks and not self.force_exit and loop.time() < deadline:
                await asyncio.sleep(0.05)

        async def shutdown(self, sockets=None):
            self.state.draining = True
            await self._wait_for_requests(DRAIN_SECONDS)
            if self.end_requests("the server is shutting down"):
                # each ended request sends its last event; a second signal skips the wait
                loop = asyncio.get_running_loop()
                deadline = loop.time() + 5.0
                while self.server_state.tasks and loop.time() < deadline:
                    await asyncio.sleep(0.05)
            await super().shutdown(sockets)

    return Server


def check_args(args: ServerArgs) -> None:
    """Every refusal that needs no weights: runs before anything is loaded."""
    from mixq.distributed.config import ParallelConfig
    from mixq.server.args import check_port_free, gpu_count

    args.validate(gpu_count(args.device))
    # the parallel layout's own refusals, still before any loading
    ParallelConfig(args.tp_size, args.ep_size, args.nnodes, args.node_rank, args.dist_init_addr, args.moe_dispatch)
    if args.node_rank == 0:  # the HTTP server's node: its port must be free now, not after loading
        check_port_free(args.host, args.port)


def engine_config(args: ServerArgs):
    """The EngineConfig the flags describe (no flags: the embedded default mix)."""
    from mixq.engine.engine import EngineConfig

    model_path, cfg = args.model_path, args.mixed_precision_config
    if model_path is None and cfg is None:
        from mixq.assets.default_model import default_config_path

        cfg = str(default_config_path())
    return EngineConfig(
        model_path=model_path, mixed_precision_config=cfg, tokenizer_path=args.tokenizer_path,
        load_format=args.load_format, dtype=args.dtype,
        device=args.device, max_model_len=args.context_length, max_running_requests=args.max_running_requests,
        chunked_prefill_size=args.chunked_prefill_size, max_total_tokens=args.max_total_tokens,
        page_size=args.page_size, mem_fraction_static=args.mem_fraction_static,
        cpu_kv_cache_space=args.cpu_kv_cache_space, show_progress=True,
        attention_backend=args.attention_backend, kv_cache_dtype=args.kv_cache_dtype,
        disable_cuda_graph=args.disable_cuda_graph, disable_radix_cache=args.disable_radix_cache,
        disable_overlap_schedule=args.disable_overlap_schedule,
        cuda_graph_max_bs=args.cuda_graph_max_bs,
        cuda_graph_bs=args.cuda_graph_bs,
        enable_expert_tracking=args.enable_expert_tracking, tp_size=args.tp_size, ep_size=args.ep_size, nnodes=args.nnodes, node_rank=args.node_rank,
        dist_init_addr=args.dist_init_addr, moe_dispatch=args.moe_dispatch)


def serve(args: ServerArgs) -> int:
    import uvicorn

    from mixq.server.app import ServerLimits, build_app
    from mixq.server.async_engine import AsyncEngine
    from mixq.server.metrics import ServerMetrics
    from mixq.server.middleware import ServerState

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
        from mixq.server.dp import DataParallelEngine, DPMetrics

        per_replica: list[ServerMetrics] = []

        def replica_metrics(replica):
            per_replica.append(ServerMetrics(replica))
            return per_replica[-1]

        aengine = DataParallelEngine(ecfg, args.dp_size, replica_metrics)
        engine, metrics = aengine.engine, DPMetrics(per_replica)
    else:
        from mixq.engine.engine import LLMEngine

        engine = LLMEngine(ecfg)
        metrics = ServerMetrics(engine)
        aengine = AsyncEngine(engine, metrics=metrics)
    name = args.served_model_name or default_name or engine.plan.base.path.name
    info = {k: v for k, v in vars(args).items() if k not in ("api_key", "extra")}
    waiting = None if args.max_queued_requests is None else (
        args.max_running_requests * args.dp_size + args.max_queued_requests)
    limits = ServerLimits(max_request_body_bytes=int(args.max_request_body_mb * 2**20), max_n=args.max_n,
                          max_in_flight=waiting)
    state = ServerState()
    app = build_app(aengine, metrics, name, info, api_key=args.api_key, allow_auto_truncate=args.allow_auto_truncate,
                    expert_stats_dir=args.expert_stats_dir, limits=limits, state=state)
    aengine.start()
    url = f"http://{args.host}:{args.port}"
    print(f"mixq: serving {name!r} at {url} (OpenAI API at {url}/v1)\n"
          f"  try: curl {url}/v1/completions -H 'Content-Type: application/json' "
          f"-d '{{\"model\": \"{name}\", \"prompt\": \"The capital of France is\", \"max_tokens\": 16}}'",
          flush=True)
    # lifespan off: the app has no startup/shutdown hooks, and a forced exit would cancel
    # uvicorn's lifespan task and log its traceback
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level.lower(),
                            timeout_graceful_shutdown=10, lifespan="off")
    try:
        _server_class()(config, state, aengine.fail_all).run()  # SIGINT/SIGTERM: see Server
    finally:
        aengine.shutdown()
        if args.dp_size == 1:
            engine.close()  # the other TP ranks, if any
    print("mixq: shut down cleanly", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    from mixq.argparsing import Parser
    from mixq.server.args import add_server_flags, from_namespace

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
