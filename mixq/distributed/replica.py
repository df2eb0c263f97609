"""An engine replica in its own process, driven over a pipe (data parallelism's unit).

Each replica is its own process running an `LLMEngine` (rank 0 of its own TP group, with
its own rendezvous, GPUs [i*tp, (i+1)*tp) on the node). Its owner keeps a `RemoteEngine`:
the same step-driven interface as `LLMEngine` (add_request / step / abort), each call one
message over a multiprocessing pipe, so whatever drives a local engine drives a replica
the same way. The front that spreads requests over replicas is the server's
(`mixq.server.dp`); nothing here knows the server.
"""

from __future__ import annotations

import logging
import multiprocessing
from dataclasses import dataclass, field
from pathlib import Path

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


# -- the owner's side ---------------------------------------------------------------------


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
    """LLMEngine's step interface for a replica in another process (one caller at a time,
    e.g. the thread that steps it)."""

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

    # the LLMEngine interface its driver and the API use
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

    def set_defer_text(self, on: bool) -> None:
        """The replica's engine returns token ids without text (requests without stop
        strings): the owner's detokenizer thread makes it, off the replica's loop too."""
        self._call("set_defer_text", on)

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
