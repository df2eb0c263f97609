"""Prometheus metrics (prometheus_client), one registry per server."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LAT = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30)


class ServerMetrics:
    def __init__(self, engine):
        self.engine = engine
        r = self.registry = CollectorRegistry()
        self.requests = Counter("mixq_requests", "completions (choices) ended, by finish reason (abort: the client "
                                "went away or the server stopped)", ["reason"], registry=r)
        self.prompt_tokens = Counter("mixq_prompt_tokens", "prompt tokens processed", registry=r)
        self.generation_tokens = Counter("mixq_generation_tokens", "tokens generated", registry=r)
        self.ttft = Histogram("mixq_time_to_first_token_seconds", "time to first token", buckets=_LAT, registry=r)
        self.itl = Histogram("mixq_inter_token_latency_seconds", "time between output tokens", buckets=_LAT,
                             registry=r)
        self.e2e = Histogram("mixq_e2e_request_latency_seconds", "request latency", buckets=_LAT + (60, 120),
                             registry=r)
        self.step_time = Histogram("mixq_step_seconds", "engine step time", buckets=_LAT, registry=r)
        gauges = {
            "mixq_num_running_requests": ("requests decoding", lambda: len(engine.scheduler.running)),
            "mixq_num_queue_requests": ("requests waiting", lambda: len(engine.scheduler.waiting)),
            "mixq_kv_cache_usage": ("fraction of KV blocks in use", engine.kv_usage),
            "mixq_kv_cache_used_blocks": ("KV blocks in use", lambda: engine.scheduler.blocks.num_used),
            # SGLang's cache_hit_rate: prompt tokens found in the prefix cache / tokens admitted
            "mixq_cache_hit_rate": ("fraction of admitted prompt tokens found in the prefix cache",
                                    lambda: engine.scheduler.cache_hit_rate),
            "mixq_cached_tokens": ("prompt tokens found in the prefix cache since start (not computed)",
                                   lambda: engine.scheduler.cached_tokens),
        }
        for name, (doc, fn) in gauges.items():
            Gauge(name, doc, registry=r).set_function(fn)
        self._last_token: dict[str, float] = {}

    def on_step(self, outputs, seconds: float) -> None:
        """Engine thread: account one step's outputs."""
        self.step_time.observe(seconds)
        now = time.monotonic()
        for o in outputs:
            n_new = sum(len(c.delta_token_ids) for c in o.outputs)
            self.generation_tokens.inc(n_new)
            last = self._last_token.get(o.request_id)
            if last is None:
                self.prompt_tokens.inc(len(o.prompt_token_ids))
                self.ttft.observe(now - o.metrics["arrival"])
            elif n_new:
                self.itl.observe(now - last)
            self._last_token[o.request_id] = now
            if o.finished:
                self._last_token.pop(o.request_id, None)
                self.e2e.observe(now - o.metrics["arrival"])
                for c in o.outputs:
                    self.requests.labels(reason=c.finish_reason or "unknown").inc()

    def on_abort(self, request_id: str, n_ended: int) -> None:
        """Engine thread: a request was aborted, ending `n_ended` of its completions."""
        self._last_token.pop(request_id, None)
        self.requests.labels(reason="abort").inc(n_ended)

    def render(self) -> bytes:
        return generate_latest(self.registry)
