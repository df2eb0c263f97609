"""Expert routing counters that live on the model's device.

Each MoE layer's route hook adds its step's top-k choices into one int64 counter with two
kernels (an add that turns (slot, expert) into a flat index, and an `index_add_`), with no
host sync, no allocation that depends on the data, and no host branch on device values —
so the hook is also safe inside a captured CUDA graph (see `reserve`). `bincount` is not
used: on CUDA it reads the max back to the host to size its output, a sync per layer.

Forward passes ("steps") are delimited on the host by `begin_pass`, which the engine calls
before each forward: it folds the finished pass into the per-expert "passes with >= 1
token" counter, stamps its wall-clock time and moves the padding mask (about six small
kernels per step, not per layer).
Counters are read (one device-to-host copy each) only by `snapshot`, on request.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


@dataclass
class CounterSnapshot:
    """Host copies of the counters. Row i of every array is MoE layer `layer_ids[i]`.

    slot_tokens [L, k, E] int64   token-expert pairs by top-k slot (slot 0 = highest weight)
    activations [L, E] int64      forward passes in which the expert received >= 1 token
    last_time   [L, E] float64    wall-clock time (epoch s) of that last pass; 0 = never
    """

    layer_ids: list[int]
    slot_tokens: torch.Tensor
    activations: torch.Tensor
    last_time: torch.Tensor
    num_passes: int


class ExpertCounters:
    """Routing counters for `len(layer_ids)` MoE layers of `num_experts` experts, top-k.

    `hook(row)` returns the route hook of MoE layer row `row` (a `Routing` with topk_ids
    [T, k] of global expert ids). Expert ids are global, so counters of expert-parallel
    ranks add up element-wise.
    """

    def __init__(self, layer_ids: list[int], num_experts: int, top_k: int, device: torch.device | str):
        L, k, E = len(layer_ids), top_k, num_experts
        self.layer_ids, self.num_experts, self.top_k = list(layer_ids), E, k
        self.device = torch.device(device)
        z = dict(device=self.device)
        self.slot_tokens = torch.zeros(L, k, E, dtype=torch.int64, **z)
        self.activations = torch.zeros(L, E, dtype=torch.int64, **z)
        self.last_time = torch.zeros(L, E, dtype=torch.float64, **z)
        self._seen = torch.zeros(L, E, dtype=torch.int64, **z)  # pairs per expert at the last pass close
        # flat index of (row, slot, expert 0) in slot_tokens: [L, k]
        self._base = (torch.arange(L)[:, None] * (k * E) + torch.arange(k)[None, :] * E).to(self.device)
        # What each routed pair adds: 1 for rows that are real tokens, 0 for padding rows.
        self._src = torch.ones(256, k, dtype=torch.int64, **z)
        self._ones = 256  # rows [0, _ones) of _src are 1
        self._valid: int | None = None  # real rows of the current pass (None: all of them)
        self._recording = True
        self._pass_open = False
        self._pass_time = 0.0
        self.num_passes = 0
        self.auto_pass = False  # no engine steps: the first MoE layer's hook opens each pass

    # -- the hot path ------------------------------------------------------------------

    def hook(self, row: int):
        base = self._base[row]  # [k] view

        def on_route(r) -> None:
            if not self.recording:
                return
            if self.auto_pass and row == 0:
                self.begin_pass()
            ids = r.topk_ids  # [T, k]
            if ids.shape[0] > self._src.shape[0]:
                self.reserve(ids.shape[0])
            flat = (ids + base).view(-1)  # [T*k] index into slot_tokens.view(-1)
            self.slot_tokens.view(-1).index_add_(0, flat, self._src[: ids.shape[0]].view(-1))

        return on_route

    # -- per step (host side) ----------------------------------------------------------

    @torch.inference_mode()  # the forward runs in inference mode: so do all writes, whatever the caller
    def begin_pass(self, num_valid_rows: int | None = None) -> None:
        """Close the previous pass and open one. `num_valid_rows`: the forward's first
        rows that are real tokens; the rest (padding, e.g. to a CUDA-graph batch size)
        are routed but not counted. None: every row is a token."""
        if not self.recording:
            return
        self._close_pass()
        self._set_valid(num_valid_rows)
        self._pass_open, self._pass_time = True, time.time()
        self.num_passes += 1

    def _close_pass(self) -> None:
        if not self._pass_open:
            return
        tot = self.slot_tokens.sum(1)  # [L, E]
        hit = tot > self._seen
        self.activations += hit
        self.last_time.masked_fill_(hit, self._pass_time)
        self._seen.copy_(tot)
        self._pass_open = False

    @property
    def recording(self) -> bool:
        return self._recording

    @recording.setter
    def recording(self, on: bool) -> None:
        # Eager hooks check this flag; hooks captured in a CUDA graph run regardless, so
        # while off what they add (_src) is all zeros.
        self._recording = on
        with torch.inference_mode():
            self._sync_src()

    def _set_valid(self, n: int | None) -> None:
        self._valid = n
        self._sync_src()

    def _sync_src(self) -> None:
        # invariant: rows [0, _ones) of _src are 1, the rest 0; move the boundary only
        new = self._src.shape[0] if self._valid is None else min(self._valid, self._src.shape[0])
        new = new if self._recording else 0
        if new > self._ones:
            self._src[self._ones : new].fill_(1)
        elif new < self._ones:
            self._src[new : self._ones].fill_(0)
        self._ones = new

    @torch.inference_mode()
    def reserve(self, rows: int) -> None:
        """Make room for forwards of `rows` token rows. Call before capturing a CUDA
        graph (the hook then never reallocates, so the captured buffers stay valid)."""
        if rows <= self._src.shape[0]:
            return
        self._src = torch.zeros(max(rows, 2 * self._src.shape[0]), self.top_k, dtype=torch.int64, device=self.device)
        self._ones = 0
        self._sync_src()

    # -- reads and resets (call from the thread that runs the forwards) ------------------

    @torch.inference_mode()
    def snapshot(self) -> CounterSnapshot:
        """Close the open pass and copy the counters to the host (the only sync)."""
        self._close_pass()
        return CounterSnapshot(list(self.layer_ids), self.slot_tokens.cpu(), self.activations.cpu(),
                               self.last_time.cpu(), self.num_passes)

    @torch.inference_mode()
    def reset(self) -> None:
        for t in (self.slot_tokens, self.activations, self.last_time, self._seen):
            t.zero_()
        self._pass_open = False
        self.num_passes = 0
