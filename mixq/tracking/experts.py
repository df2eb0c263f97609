"""Expert activation tracking: which experts of each MoE layer take the tokens.

Attached from outside the model: `attach(model)` puts a route hook on every `SparseMoE`
(the layer calls its `route_hooks` with each forward's top-k routing) that adds into
counters on the model's device (mixq.tracking.counters). Nothing is installed unless
tracking is turned on (`--enable-expert-tracking`, `EngineConfig.enable_expert_tracking`),
so when it is off the forward is exactly the untracked one.

Reads (`get_*`, `export_stats`) copy the counters to the host; call them from the thread
that runs the model (the server does, through the engine thread). Counts recorded by hand
(`record_expert_activation`, `add_stats`) are kept on the host and added in.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

from torch import nn

from mixq.errors import ConfigError
from mixq.tracking.counters import ExpertCounters
from mixq.tracking.expert_stats import (
    MAX_REQUESTS_KEPT,
    ExpertTable,
    empty_requests,
    expert_key,
    merge_requests,
    read_stats,
    write_json,
)

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class ExpertActivationTracker:
    """Counts of tokens routed to each (layer, expert), by top-k slot, and of the forward
    passes each expert took part in. See docs/expert-tracking.md for the definitions."""

    def __init__(self, num_experts: int | None = None):
        self.counters: ExpertCounters | None = None
        self._hooks: list[tuple[list, Callable]] = []
        self._lock = threading.Lock()  # host-side records may come from any thread
        self._host: ExpertTable | None = None  # by-hand and loaded counts
        self._num_experts = num_experts
        self._requests = empty_requests()
        self._since = time.time()
        self._recording = True

    # -- attaching -----------------------------------------------------------------------

    @classmethod
    def for_model(cls, model: nn.Module, device=None) -> ExpertActivationTracker:
        t = cls()
        t.attach(model, device)
        return t

    def attach(self, model: nn.Module, device=None, auto_pass: bool = True) -> None:
        """Hook every SparseMoE of `model`. `device`: where its routing lives (default:
        the model's first parameter's). With `auto_pass`, each forward is one pass (the
        first MoE layer opens it); the engine instead calls `begin_pass` per step.
        ConfigError when the model has no MoE layer."""
        from mixq.layers.moe import SparseMoE

        if self.counters is not None:
            raise RuntimeError("this tracker is already attached to a model")
        moes = []
        for name, mod in model.named_modules():
            if isinstance(mod, SparseMoE):
                m = _LAYER.search(name)
                if m is None:
                    raise ValueError(f"MoE module {name!r} is not under 'layers.<i>.'; cannot tell its layer")
                moes.append((int(m.group(1)), mod))
        if not moes:
            arch = getattr(getattr(model, "config", None), "architecture", type(model).__name__)
            raise ConfigError(f"--enable-expert-tracking: the model ({arch}) has no MoE layer to track")
        shapes = {(m.num_experts, m.top_k) for _, m in moes}
        if len(shapes) != 1:
            raise ValueError(f"MoE layers differ in (num_experts, top_k): {sorted(shapes)}")
        (E, k), = shapes
        if device is None:
            device = next(iter(model.parameters()), None)
            device = device.device if device is not None else "cpu"
        moes.sort(key=lambda lm: lm[0])
        self.counters = ExpertCounters([lid for lid, _ in moes], E, k, device)
        self.counters.auto_pass = auto_pass
        self.counters.recording = self._recording
        for row, (_, mod) in enumerate(moes):
            fn = self.counters.hook(row)
            mod.route_hooks.append(fn)
            self._hooks.append((mod.route_hooks, fn))

    def detach(self) -> None:
        """Remove the hooks (counts so far stay readable)."""
        for hooks, fn in self._hooks:
            hooks.remove(fn)
        self._hooks.clear()

    def begin_pass(self, num_valid_rows: int | None = None) -> None:
        """The engine, before each forward: see ExpertCounters.begin_pass."""
        if self.counters is not None:
            self.counters.begin_pass(num_valid_rows)

    # -- recording (SGLang's start/stop) -----------------------------------------------------

    @property
    def recording(self) -> bool:
        return self._recording

    def start_record(self) -> None:
        """Clear the counts and count from now on."""
        self.reset_stats()
        self._set_recording(True)

    def stop_record(self) -> None:
        """Stop counting; the counts so far stay readable. Hooks then do no device work."""
        if self.counters is not None:
            self.counters.snapshot()  # fold the open pass in
        self._set_recording(False)

    def _set_recording(self, on: bool) -> None:
        self._recording = on
        if self.counters is not None:
            self.counters.recording = on

    # -- recording by hand, and per-request attribution ---------------------------------------

    def record_expert_activation(self, layer_id: int, expert_id: int, tokens_processed: int = 1,
                                 request_id: str | None = None) -> None:
        """Count one activation of (layer_id, expert_id) that processed `tokens_processed`
        tokens (on the host; for integrations that route outside mixq's MoE layer)."""
        if layer_id < 0 or expert_id < 0 or tokens_processed < 0:
            raise ValueError(f"record_expert_activation: negative argument ({layer_id}, {expert_id}, "
                             f"{tokens_processed})")
        if not self._recording:
            return
        with self._lock:
            E = max(expert_id + 1, self._num_experts or 0, self._host.num_experts if self._host else 0)
            one = ExpertTable.empty([layer_id], E, 0)
            one.activations[0, expert_id], one.tokens[0, expert_id] = 1, tokens_processed
            one.last_time[0, expert_id] = time.time()
            self._host = one if self._host is None else self._host.merged(one)
            if request_id is not None:
                entry = self._request_entry(request_id)
                et = entry.setdefault("expert_tokens", {})
                key = expert_key(layer_id, expert_id)
                et[key] = et.get(key, 0) + tokens_processed

    def record_request(self, request_id: str, input_length: int, output_length: int) -> None:
        """A finished (or aborted) request: its prompt and output lengths (the engine's
        finish hook calls this)."""
        if not self._recording:
            return
        with self._lock:
            r = self._requests
            r["num_requests"] += 1
            r["input_tokens"] += input_length
            r["output_tokens"] += output_length
            entry = self._request_entry(request_id)
            entry["input_length"], entry["output_length"] = input_length, output_length

    def _request_entry(self, request_id: str) -> dict:
        by = self._requests["by_request"]
        entry = by.pop(request_id, {})
        by[request_id] = entry  # most recent last
        while len(by) > MAX_REQUESTS_KEPT:
            by.pop(next(iter(by)))
        return entry

    # -- reading -----------------------------------------------------------------------------

    def table(self) -> ExpertTable:
        """Every count so far, on the host (one device-to-host copy of the counters)."""
        with self._lock:
            t = None
            if self.counters is not None:
                s = self.counters.snapshot()
                t = ExpertTable(s.layer_ids, s.activations, s.slot_tokens.sum(1), s.slot_tokens, s.last_time,
                                num_passes=s.num_passes, since=self._since)
            if self._host is not None:
                t = self._host if t is None else t.merged(self._host)
            if t is None:
                t = ExpertTable.empty([], self._num_experts or 0, 0, since=self._since)
            elif self._num_experts and t.num_experts < self._num_experts:
                t = t.merged(ExpertTable.empty([], self._num_experts, 0))
            t.since = self._since
            t.requests = {**self._requests, "by_request": {k: dict(v) for k, v in
                                                           self._requests["by_request"].items()}}
            return t

    def stats(self, layer_id: int | None = None, expert_id: int | None = None, top_k: int = 10) -> dict:
        """The export document, optionally restricted to one layer and/or expert id."""
        return self.table().to_doc(top_k, layer_id, expert_id)

    def get_expert_stats(self, layer_id: int | None = None, expert_id: int | None = None) -> dict:
        """Both ids: that expert's entry. Otherwise {"layer_L_expert_E": entry} for the
        experts matching the given id (all of them with neither)."""
        es = self.stats(layer_id, expert_id)["expert_stats"]
        if layer_id is not None and expert_id is not None:
            return es[expert_key(layer_id, expert_id)]
        return es

    def get_top_experts(self, top_k: int = 10) -> list[dict]:
        return self.table().top(top_k)

    def get_layer_stats(self) -> dict[int, dict]:
        """{layer_id: {"total_experts", "total_activations", "total_tokens",
        "experts": {expert_id: {...}}, "load_balance": {...}}} with int keys."""
        doc = self.stats()
        return {int(lid): {**{k: v for k, v in ls.items() if k != "experts"},
                           "experts": {int(e): v for e, v in ls["experts"].items()},
                           "load_balance": doc["load_balance"][lid]}
                for lid, ls in doc["layer_stats"].items()}

    def reset_stats(self) -> None:
        with self._lock:
            if self.counters is not None:
                self.counters.reset()
            self._host = None
            self._requests = empty_requests()
            self._since = time.time()

    def export_stats(self, file_path: str | Path, top_k: int = 10) -> dict:
        """Write the document as JSON (atomically) and return it."""
        doc = self.stats(top_k=top_k)
        write_json(file_path, doc)
        return doc

    # -- importing ---------------------------------------------------------------------------

    def add_stats(self, doc: dict) -> None:
        """Add the counts of an exported document (e.g. another rank's) to this tracker."""
        t = ExpertTable.from_doc(doc)
        with self._lock:
            host = ExpertTable(t.layer_ids, t.activations, t.tokens, t.slot_tokens, t.last_time, t.num_passes)
            self._host = host if self._host is None else self._host.merged(host)
            self._requests = merge_requests(self._requests, t.requests)
            if t.since:
                self._since = min(self._since, t.since)

    @classmethod
    def from_stats(cls, doc: dict) -> ExpertActivationTracker:
        tr = cls()
        tr.add_stats(doc)
        return tr

    @classmethod
    def load_stats(cls, path: str | Path) -> ExpertActivationTracker:
        """A tracker holding the counts of an exported JSON file."""
        return cls.from_stats(read_stats(path))


# -- the process's tracker and the module-level API ------------------------------------------------

_global: ExpertActivationTracker | None = None

DISABLED = ("expert activation tracking is off: enable it with --enable-expert-tracking (mixq serve, "
            "mixq generate) or EngineConfig(enable_expert_tracking=True)")


def set_global_expert_tracker(tracker: ExpertActivationTracker | None) -> None:
    global _global
    _global = tracker


def get_global_expert_tracker() -> ExpertActivationTracker | None:
    """The tracker of the engine loaded in this process with tracking on, or None."""
    return _global


def _tracker() -> ExpertActivationTracker:
    if _global is None:
        raise RuntimeError(DISABLED)
    return _global


def get_expert_activation_stats(layer_id: int | None = None, expert_id: int | None = None,
                                top_k: int = 10) -> dict:
    """The process tracker's document: {"expert_stats", "layer_stats", "top_experts",
    "load_balance", "tokens_by_slot", "requests", "meta"}, optionally restricted."""
    return _tracker().stats(layer_id, expert_id, top_k)


def reset_expert_activation_stats() -> None:
    _tracker().reset_stats()


def export_expert_activation_stats(path: str | Path, top_k: int = 10) -> dict:
    return _tracker().export_stats(path, top_k)


def install_expert_tracking(engine) -> ExpertActivationTracker:
    """Track `engine`'s model: hooks on its MoE layers, a pass per engine step (with the
    step's token count, so padding rows would not count), request lengths from its finish
    hook. Becomes the process tracker."""
    tracker = ExpertActivationTracker()
    tracker.attach(engine.model, engine.device, auto_pass=False)
    engine.step_hooks.append(lambda batch: tracker.begin_pass(batch.num_tokens))
    engine.finish_hooks.append(tracker.record_request)
    set_global_expert_tracker(tracker)
    return tracker
