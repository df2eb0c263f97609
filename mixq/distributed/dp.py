"""Data parallelism: D replicas of the TP group behind one server.

Each replica is its own process running an `LLMEngine` (rank 0 of its own TP group, with
its own rendezvous, GPUs [i*tp, (i+1)*tp) on the node). The server process keeps one
`RemoteEngine` per replica: the same step-driven interface as `LLMEngine` (add_request /
step / abort), each call one message over a multiprocessing pipe, so the server's
`AsyncEngine` drives a replica exactly as it drives a local engine. `DataParallelEngine`
sends each request to the replica with the fewest requests in flight and `DPMetrics`
serves every replica's metrics under a `dp_rank` label.
"""

from __future__ import annotations

import logging
import multiprocessing
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric

from mixq.engine.engine import RequestOutput
from mixq.engine.engine_config import EngineConfig
from mixq.engine.grammar import Grammar, GrammarBackend
from mixq.engine.sampling_params import SamplingParams
from mixq.errors import MixqError

log = logging.getLogger("mixq.distributed")


# -- the replica process ------------------------------------------------------------------


def _status(engine) -> dict:
    s = engine.scheduler
    return {"unfinished": engine.has_unfinished(), "running": [q.request_id for q in s.running],
            "waiting": [q.request_id for q in s.waiting], "kv_used": s.blocks.num_used,
            "admitted_tokens": s.admitted_tokens, "cached_tokens": s.cached_tokens}


def _info(engine) -> dict:
    """What the server needs to know about a replica's engine (picklable, no tensors)."""
    return {"max_model_len": engine.max_model_len, "model_config": engine.model_config,
            "base_path": str(engine.plan.base.path), "device": str(engine.device), "dtype": engine.dtype,
            "num_blocks": engine.scheduler.blocks.num_blocks, "block_size": engine.scheduler.blocks.block_size,
            "eos_token_ids": engine.eos_token_ids, "kv_cache": engine.kv_cache_stats(),
            "weights": {n: w.to("meta") for n, w in engine.weights.items()}}  # shapes and dtypes only


def replica_main(conn, cfg: EngineConfig, cpu_threads: int) -> None:
    """A replica: load the engine, then serve the server's calls until it says close (or
    goes away: the pipe closes and the replica exits with it)."""
    import torch

    from mixq.engine.engine import LLMEngine
    from mixq.engine.engine_config import resolve_device

    if resolve_device(cfg.device).type == "cpu":  # replicas share the CPU's cores
        torch.set_num_threads(cpu_threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s dp %(name)s: %(message)s")
    try:
        engine = LLMEngine(cfg)
    except Exception as e:
        log.exception("replica failed to start")
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    try:
        conn.send(("ready", _info(engine)))
        while True:
            try:
                method, args = conn.recv()
            except EOFError:
                return
            if method == "close":
                return
            try:
                result = getattr(engine, method)(*args)
            except ValueError as e:  # a bad request: the replica keeps serving the others
                conn.send(("value_error", str(e), _status(engine)))
            else:
                conn.send(("ok", result, _status(engine)))
    finally:
        engine.close()


# -- the server side ----------------------------------------------------------------------


@dataclass
class _Blocks:
    num_blocks: int
    block_size: int
    num_used: int = 0


@dataclass
class _SchedulerView:
    """A replica scheduler's state as of its last reply (what metrics and the API read)."""

    blocks: _Blocks
    running: list = field(default_factory=list)
    waiting: list = field(default_factory=list)
    admitted_tokens: int = 0
    cached_tokens: int = 0

    @property
    def cache_hit_rate(self) -> float:
        return self.cached_tokens / self.admitted_tokens if self.admitted_tokens else 0.0


@dataclass
class _Base:
    path: Path


@dataclass
class _PlanView:
    base: _Base


class RemoteEngine:
    """LLMEngine's step interface for a replica in another process (one caller at a time:
    the replica's AsyncEngine thread)."""

    def __init__(self, index: int, cfg: EngineConfig, tokenizer, cpu_threads: int = 1):
        ctx = multiprocessing.get_context("spawn")
        self.index = index
        self.conn, child = ctx.Pipe()
        # not a daemon: a replica starts its own TP rank processes
        self.proc = ctx.Process(target=replica_main, args=(child, cfg, cpu_threads), name=f"mixq-dp{index}")
        self.proc.start()
        child.close()
        self.tokenizer = tokenizer
        self.requests: dict[str, None] = {}
        self._unfinished = False
        self._closing = False

    def wait_ready(self) -> None:
        try:
            kind, info = self.conn.recv()
        except EOFError:
            raise MixqError(f"data-parallel replica {self.index} exited while starting") from None
        if kind != "ready":
            raise MixqError(f"data-parallel replica {self.index}: {info}")
        self.max_model_len, self.model_config = info["max_model_len"], info["model_config"]
        self.plan = _PlanView(_Base(Path(info["base_path"])))
        self.device, self.dtype, self.weights = info["device"], info["dtype"], info["weights"]
        self.eos_token_ids = info["eos_token_ids"]
        # structured outputs: compiled here too, so a refused grammar is the server's 400
        self.grammar = GrammarBackend(self.tokenizer, self.model_config.vocab_size, self.eos_token_ids)
        self._kv_cache = info["kv_cache"]
        self.scheduler = _SchedulerView(_Blocks(info["num_blocks"], info["block_size"]))

    def _call(self, method: str, *args):
        self.conn.send((method, args))
        kind, result, status = self.conn.recv()
        if status is not None:
            self._unfinished = status["unfinished"]
            s = self.scheduler
            s.running, s.waiting, s.blocks.num_used = status["running"], status["waiting"], status["kv_used"]
            s.admitted_tokens, s.cached_tokens = status["admitted_tokens"], status["cached_tokens"]
        if kind == "value_error":
            raise ValueError(result)
        return result

    # the LLMEngine interface AsyncEngine and the API use
    def encode(self, prompt: str | list[int]) -> list[int]:
        return self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)

    def add_request(self, request_id: str, prompt, params: SamplingParams, grammar: Grammar | None = None) -> None:
        # a compiled grammar does not cross processes: the replica compiles (and caches) its own,
        # between two of its steps (a few to tens of ms once per schema)
        self._call("add_request", request_id, prompt, params)
        self.requests[request_id] = None

    def abort(self, request_id: str) -> bool:
        self.requests.pop(request_id, None)
        return self._call("abort", request_id)

    def has_unfinished(self) -> bool:
        return self._unfinished

    def step(self) -> list[RequestOutput]:
        outs = self._call("step")
        for o in outs:
            if o.finished:
                self.requests.pop(o.request_id, None)
        return outs

    def kv_cache_stats(self) -> dict:
        return self._kv_cache

    def kv_usage(self) -> float:
        b = self.scheduler.blocks
        return b.num_used / b.num_blocks

    def ask_to_close(self) -> None:
        """Tell the replica to stop (it closes its engine and TP ranks, then exits)."""
        if self.proc.is_alive() and not self._closing:
            self._closing = True
            try:
                self.conn.send(("close", ()))
            except (OSError, BrokenPipeError):
                pass

    def close(self, timeout: float = 30.0) -> None:
        """ask_to_close, then reap the process (terminated if it does not exit in time)."""
        self.ask_to_close()
        self.proc.join(timeout)
        if self.proc.is_alive():
            log.warning("replica %d did not exit; terminating it", self.index)
            self.proc.terminate()
            self.proc.join(5)
        self.conn.close()


class DataParallelEngine:
    """The server's engine when --dp-size > 1: AsyncEngine's interface over D replicas."""

    def __init__(self, cfg: EngineConfig, dp_size: int, metrics_factory=None):
        import torch

        from mixq.engine.engine_config import load_plan
        from mixq.formats.gguf_file import load_tokenizer
        from mixq.server.async_engine import AsyncEngine

        plan, _ = load_plan(cfg)  # headers only: fails fast, names the tokenizer's home
        tokenizer = load_tokenizer(cfg.tokenizer_path or plan.base.path)
        tp = cfg.tp_size
        # one progress bar per replica would interleave: replicas load quietly
        threads = max(1, torch.get_num_threads() // dp_size)
        self.replicas = [RemoteEngine(i, replace(cfg, base_gpu_id=cfg.base_gpu_id + i * tp, show_progress=False),
                                      tokenizer, threads) for i in range(dp_size)]
        try:
            for r in self.replicas:
                r.wait_ready()
        except BaseException:
            for r in self.replicas:
                r.ask_to_close()
            for r in self.replicas:
                r.close(5.0)
            raise
        self.engine = self.replicas[0]  # what the API reads: tokenizer, limits, model info
        for r in self.replicas[1:]:  # one grammar cache: a schema is checked once, whichever replica serves it
            r.grammar = self.engine.grammar
        metrics = [metrics_factory(r) if metrics_factory else None for r in self.replicas]
        self.async_engines = [AsyncEngine(r, metrics=m) for r, m in zip(self.replicas, metrics)]
        self.in_flight = [0] * dp_size  # requests sent to each replica and not finished
        self.owner: dict[str, int] = {}

    def start(self) -> None:
        for a in self.async_engines:
            a.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        for a in self.async_engines:
            a.shutdown(timeout)
        for r in self.replicas:  # all at once: each replica's exit takes a while
            r.ask_to_close()
        for r in self.replicas:
            r.close()

    @property
    def alive(self) -> bool:
        return all(a.alive for a in self.async_engines)

    @property
    def num_in_flight(self) -> int:
        return sum(a.num_in_flight for a in self.async_engines)

    def fail_all(self, message: str) -> int:
        return sum(a.fail_all(message) for a in self.async_engines)

    async def generate(self, request_id: str, prompt, params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """The replica with the fewest requests in flight (shortest queue) serves it."""
        i = min(range(len(self.in_flight)), key=self.in_flight.__getitem__)
        self.in_flight[i] += 1
        self.owner[request_id] = i
        try:
            async for o in self.async_engines[i].generate(request_id, prompt, params):
                yield o
        finally:
            self.in_flight[i] -= 1
            self.owner.pop(request_id, None)

    def abort(self, request_id: str) -> None:
        i = self.owner.get(request_id)
        if i is not None:
            self.async_engines[i].abort(request_id)


class _Relabel:
    """A collector: every replica's metric families, each sample labelled dp_rank."""

    def __init__(self, per_replica):
        self.per_replica = per_replica

    def collect(self):
        merged: dict[str, Metric] = {}
        for i, m in enumerate(self.per_replica):
            for fam in m.registry.collect():
                out = merged.get(fam.name)
                if out is None:
                    out = merged[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
                for s in fam.samples:
                    out.add_sample(s.name, {**s.labels, "dp_rank": str(i)}, s.value, s.timestamp, s.exemplar)
        yield from merged.values()


class DPMetrics:
    """/metrics over all replicas: the single-engine metrics, labelled by dp_rank."""

    def __init__(self, per_replica: list):
        self.per_replica = per_replica
        self.registry = CollectorRegistry()
        self.registry.register(_Relabel(per_replica))

    def render(self) -> bytes:
        return generate_latest(self.registry)
