"""Continuous batching with chunked prefill and preemption (plain Python, no torch).

Each step builds one mixed batch under a token budget (SGLang-style): running sequences
first, in arrival order — each decoding one token or continuing its prefill — then
waiting sequences in arrival order (FCFS: a request that does not fit blocks the ones
behind it, so nobody starves). A prompt longer than the budget is prefilled in chunks over
several steps; only the step that reaches its last known token samples. When the KV cache
runs out, the most recently arrived running sequence is preempted: its blocks are freed
and it is recomputed later (prompt + tokens generated so far) — recompute is cheaper to
build right than swapping, and preemption is rare when the cache is sized well.

With prefix caching (on unless `enable_prefix_caching=False`, SGLang's
--disable-radix-cache) a sequence admitted from the waiting queue starts with the cached
blocks of its longest cached prefix (mixq.engine.block_manager) and computes only the rest;
`postprocess` registers the blocks each step completed. A preempted sequence matches its
own released blocks when it comes back, if they were not evicted meanwhile.

A scheduled batch is committed when it is built: its sequences' `num_computed` advance
and each sampling sequence gets a pending token (`num_pending`), which `postprocess`
records once its id is known. So the engine may schedule step i+1 while step i runs on the
device (the overlap schedule, mixq.engine.engine): a sequence decodes its pending token
(its id stays on the device), one whose pending token will end it by length is left out,
and one that turns out to have stopped (EOS, stop token, stop string) wasted one token of
work that `postprocess` drops. A waiting sequence with a pending token (preempted while
its token was in flight) is admitted once the token is recorded.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from mixq.engine.block_manager import BlockManager
from mixq.engine.sequence import SeqStatus, Sequence


@dataclass(frozen=True)
class SchedulerConfig:
    num_blocks: int
    block_size: int = 16
    max_running_requests: int = 64
    max_model_len: int = 4096
    chunked_prefill_size: int = 2048  # max tokens per step; -1: a prompt is never split
    eos_token_ids: tuple[int, ...] = ()
    enable_prefix_caching: bool = True

    def __post_init__(self):
        if self.chunked_prefill_size == 0 or self.chunked_prefill_size < -1:
            raise ValueError(f"chunked_prefill_size must be > 0 or -1, got {self.chunked_prefill_size}")
        if self.max_running_requests < 1 or self.max_model_len < 1:
            raise ValueError("max_running_requests and max_model_len must be >= 1")

    @property
    def token_budget(self) -> int:
        return self.max_model_len if self.chunked_prefill_size == -1 else self.chunked_prefill_size


@dataclass(slots=True)
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int  # tokens computed this step, starting at seq.num_computed
    start: int  # = seq.num_computed when scheduled
    samples: bool  # this step reaches the last known token, so it yields a new one


@dataclass
class ScheduledBatch:
    items: list[ScheduledSeq]
    preempted: list[Sequence]

    @property
    def num_tokens(self) -> int:
        return sum(i.num_new_tokens for i in self.items)

    def __bool__(self) -> bool:
        return bool(self.items)


class Scheduler:
    def __init__(self, config: SchedulerConfig):
        self.config = config
        self.blocks = BlockManager(config.num_blocks, config.block_size, config.enable_prefix_caching)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.capacity = config.num_blocks * config.block_size
        # prefix cache accounting over every admission (re-admissions after preemption too)
        self.admitted_tokens = 0  # tokens the admitted sequences held
        self.cached_tokens = 0  # of those, found in the prefix cache (not computed)

    @property
    def cache_hit_rate(self) -> float:
        """Fraction of admitted tokens found in the prefix cache (SGLang's cache_hit_rate)."""
        return self.cached_tokens / self.admitted_tokens if self.admitted_tokens else 0.0

    def check(self, seq: Sequence) -> None:
        """Refuse (ValueError naming the lengths) a sequence that can never be served: its
        prompt must leave room for one generated token within max_model_len, and what it can
        grow to must fit the KV cache. Queues nothing."""
        m = self.config.max_model_len
        if seq.num_tokens >= m:
            raise ValueError(
                f"request {seq.request_id}: a prompt of {seq.num_tokens} tokens leaves no room to generate within "
                f"max_model_len {m} (prompt + output); it may have at most {m - 1} tokens"
            )
        if seq.num_tokens > self.capacity:
            raise ValueError(
                f"request {seq.request_id}: prompt of {seq.num_tokens} tokens exceeds the limit of {self.capacity} "
                f"(max_model_len {m}, KV capacity {self.capacity} tokens)"
            )
        # generation stops at max_model_len, so a larger max_new_tokens needs no more room
        if min(seq.num_tokens + seq.params.max_new_tokens, m) > self.capacity:
            raise ValueError(
                f"request {seq.request_id}: prompt {seq.num_tokens} + max_new_tokens "
                f"{seq.params.max_new_tokens} exceeds the KV cache capacity of {self.capacity} tokens"
            )

    def add(self, seq: Sequence) -> None:
        """Queue a sequence; one that can never fit is refused with its lengths (`check`)."""
        self.check(seq)
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.num_computed = 0
        seq.status = SeqStatus.WAITING
        # back in arrival order among the waiting: it arrived before all of them
        self.waiting.appendleft(seq)

    def schedule(self) -> ScheduledBatch:
        budget = self.config.token_budget
        items: list[ScheduledSeq] = []
        preempted: list[Sequence] = []
        bs, running = self.config.block_size, SeqStatus.RUNNING
        for seq in list(self.running):
            if seq.status is not running or budget == 0:
                continue  # preempted while making room for an earlier one
            if seq.num_pending and self._ends_by_length(seq):
                continue  # its pending token ends it: nothing more to compute
            start = seq.num_computed
            known = len(seq.prompt_token_ids) + len(seq.output_token_ids) + seq.num_pending
            want = min(known - start, budget)
            if start + want > len(seq.block_table) * bs:  # (a decode mostly fits the blocks it holds)
                while not self.blocks.can_reserve(seq, start + want):
                    victim = self.running[-1]  # newest arrival
                    self._preempt(victim)
                    preempted.append(victim)
                    if victim is seq:
                        break
                if seq.status is not running:
                    continue
                self.blocks.reserve(seq, start + want)
            # commit (see _commit), inlined: this runs for every running sequence every step
            samples = start + want == known
            seq.num_computed = start + want
            seq.num_pending += samples
            items.append(ScheduledSeq(seq, want, start, samples))
            budget -= want
        while self.waiting and budget > 0 and len(self.running) < self.config.max_running_requests:
            seq = self.waiting[0]  # holds no blocks, nothing computed
            if seq.num_pending:
                break  # preempted with a token in flight: its tokens are not all known yet
            hits = self.blocks.match_prefix(seq)
            cached = len(hits) * self.config.block_size
            remaining = seq.num_tokens - cached
            if self.config.chunked_prefill_size == -1 and remaining > budget:
                break
            want = min(remaining, budget)
            if not self.blocks.can_allocate(seq, hits, cached + want):
                break
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            self.blocks.allocate(seq, hits, cached + want)  # num_computed = cached
            seq.num_cached_tokens = cached
            self.admitted_tokens += seq.num_tokens
            self.cached_tokens += cached
            items.append(self._commit(seq, want))
            budget -= want
        return ScheduledBatch(items, preempted)

    @staticmethod
    def _commit(seq: Sequence, want: int) -> ScheduledSeq:
        """Schedule `want` tokens of seq from num_computed on: they count as computed from
        now (the device computes them in order), and reaching the last token leaves one
        token pending."""
        start = seq.num_computed
        samples = start + want == seq.num_tokens + seq.num_pending
        seq.num_computed = start + want
        seq.num_pending += samples
        return ScheduledSeq(seq, want, start, samples)

    def _ends_by_length(self, seq: Sequence) -> bool:
        """Whether recording seq's pending tokens will end it by length for sure."""
        n = seq.num_tokens + seq.num_pending
        return len(seq.output_token_ids) + seq.num_pending >= seq.params.max_new_tokens or n >= self.config.max_model_len

    def postprocess(self, batch: ScheduledBatch, sampled: list[int]) -> list[Sequence]:
        """Record a step's results; `sampled` holds one token per item with samples=True, in
        order. A sequence that finished meanwhile (stop, abort) drops its token; one
        preempted meanwhile keeps it (its recompute includes it). Returns the sequences that
        finished now (their blocks are freed)."""
        finished = []
        tokens = iter(sampled)
        cfg, blocks = self.config, self.blocks
        caching, bs, eos = blocks.enable_caching, cfg.block_size, cfg.eos_token_ids
        done, running = SeqStatus.FINISHED, SeqStatus.RUNNING
        for item in batch.items:
            seq = item.seq
            tok = next(tokens) if item.samples else None
            if seq.status is done:
                continue
            # its K/V are written (or queued before any reader): full blocks can be shared now
            # (cache_computed's own test, first: most steps complete no block)
            if tok is not None:
                seq.num_pending -= 1
                seq.output_token_ids.append(tok)
            if caching and seq.status is running and seq.num_computed // bs > seq.num_cached_blocks:
                blocks.cache_computed(seq)
            if tok is None:
                continue
            # _finish_reason, inlined
            p, out = seq.params, seq.output_token_ids
            n_out = len(out)
            if n_out >= p.min_new_tokens and ((not p.ignore_eos and tok in eos) or tok in p.stop_token_ids):
                reason = "stop"
            elif n_out >= p.max_new_tokens or len(seq.prompt_token_ids) + n_out >= cfg.max_model_len:
                reason = "length"
            else:
                continue
            self.finish(seq, reason)
            finished.append(seq)
        return finished

    def _finish_reason(self, seq: Sequence, tok: int) -> str | None:
        p = seq.params
        n_out = len(seq.output_token_ids)
        if n_out >= p.min_new_tokens and (
            (not p.ignore_eos and tok in self.config.eos_token_ids) or tok in p.stop_token_ids
        ):
            return "stop"
        if n_out >= p.max_new_tokens or seq.num_tokens >= self.config.max_model_len:
            return "length"
        return None

    def finish(self, seq: Sequence, reason: str) -> None:
        """Finish a sequence now (the engine calls this for stop strings, aborts)."""
        if seq.status == SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status == SeqStatus.WAITING:
            self.waiting.remove(seq)
        self.blocks.free(seq)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason

    def abort(self, request_id: str) -> list[Sequence]:
        """Finish every sequence of a request with reason 'abort', freeing its blocks."""
        seqs = [s for s in [*self.waiting, *self.running] if s.request_id == request_id]
        for s in seqs:
            self.finish(s, "abort")
        return seqs
