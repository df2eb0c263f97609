"""Data parallelism at the server: D engine replicas behind one API.

Each replica is a process of its own (`mixq.distributed.replica.RemoteEngine`: rank 0 of
its own TP group, GPUs [i*tp, (i+1)*tp) on the node), driven by an `AsyncEngine` of its
own exactly like a local engine. `DataParallelEngine` sends each request to the replica
with the fewest requests in flight and `DPMetrics` serves every replica's metrics under a
`dp_rank` label.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric

from mixq.distributed.replica import RemoteEngine
from mixq.engine.engine import RequestOutput
from mixq.engine.engine_config import EngineConfig
from mixq.engine.sampling_params import SamplingParams
from mixq.server.async_engine import AsyncEngine


class DataParallelEngine:
    """The server's engine when --dp-size > 1: AsyncEngine's interface over D replicas."""

    def __init__(self, cfg: EngineConfig, dp_size: int, metrics_factory=None):
        import torch
        from transformers import AutoTokenizer

        from mixq.engine.engine_config import load_plan

        plan, _ = load_plan(cfg)  # headers only: fails fast, names the tokenizer's home
        tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer_path or str(plan.base.path))
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
