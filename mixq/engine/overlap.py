"""The overlap schedule's pieces: a step queued on the device and the next step's inputs.

With the overlap schedule (on unless --disable-overlap-schedule, as in SGLang) the engine
runs one step behind: it schedules step i+1 and queues it on the device before it reads
step i's sampled tokens, then records step i (tokens, stop checks, detokenization,
outputs) while the device runs step i+1. A sequence that decodes in step i+1 feeds the
token it sampled in step i, whose id is still on the device: its chunk carries the
placeholder -(k+1) for row k of step i's samples, which the model runner swaps on the
device (mixq.engine.cuda_graph.resolve_placeholders). Nothing waits for the device between
queueing step i+1 and reading step i's results, which were copied out of the device behind
step i (mixq.engine.sampler.SampleResult).

Without the overlap schedule the same code runs with the record right after the launch:
the same chunks, samples and records, in the same order per sequence, so greedy outputs
and logprobs are the same either way (tests/engine/test_overlap.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mixq.engine.model_runner import SeqChunk
from mixq.engine.sampler import SampleResult
from mixq.engine.scheduler import ScheduledBatch
from mixq.engine.sequence import Sequence


@dataclass
class LaunchedStep:
    """A step queued on the device whose results are not recorded yet.

    batch: what the scheduler committed; sampling: its sequences that sample, in row order;
    tokens: their sampled ids on the device (what the next step's placeholders read);
    result: the samples being copied to the host; rows: seq_id -> row of `tokens`."""

    batch: ScheduledBatch
    sampling: list[Sequence]
    tokens: torch.Tensor | None = None
    result: SampleResult | None = None
    rows: dict[int, int] = field(default_factory=dict)
    mask: object = None  # the constrained rows' TokenMask (mixq.engine.grammar), advanced when recorded


def step_chunks(batch: ScheduledBatch, prev: LaunchedStep | None) -> tuple[list[SeqChunk], bool]:
    """The model runner's chunks for a committed batch, and whether any carries a
    placeholder for a token of `prev` (the step still in flight)."""
    chunks, placeholders = [], False
    rows = prev.rows if prev is not None else {}
    for item in batch.items:
        seq = item.seq
        start, end = item.start, item.start + item.num_new_tokens
        p, out = len(seq.prompt_token_ids), seq.output_token_ids
        known = p + len(out)
        if end > known:  # the last one is the token `prev` sampled for it
            row = rows.get(seq.seq_id)
            if end - known != 1 or row is None:
                raise RuntimeError(f"{seq!r}: scheduled {end - known} tokens past the known ones, "
                                   f"{'with' if row is not None else 'without'} a step in flight that sampled it")
            # (a decode of the token in flight: no known token to slice)
            ids = [-(row + 1)] if start == known else _slice(seq, start, known) + [-(row + 1)]
            placeholders = True
        else:
            ids = _slice(seq, start, end)
        chunks.append(SeqChunk(ids, start, seq.block_table, item.samples))
    return chunks, placeholders


def _slice(seq: Sequence, start: int, stop: int) -> list[int]:
    """seq.token_ids[start:stop] without building the whole list (a decode reads one)."""
    p, prompt, out = len(seq.prompt_token_ids), seq.prompt_token_ids, seq.output_token_ids
    if stop <= p:
        return prompt[start:stop]
    if start >= p:
        return out[start - p : stop - p]
    return prompt[start:] + out[: stop - p]


def pending_ids(sampling: list[Sequence], prev: LaunchedStep | None, device) -> torch.Tensor | None:
    """[R] the id of each sampling sequence's output token still on the device (-1: none),
    for the penalties; None when no row has one."""
    if prev is None or prev.tokens is None:
        return None
    idx = [prev.rows.get(s.seq_id, -1) if s.num_pending > 1 else -1 for s in sampling]
    if all(i < 0 for i in idx):
        return None
    i = torch.tensor(idx, dtype=torch.int64).to(device, non_blocking=True)
    return torch.where(i >= 0, prev.tokens[i.clamp(min=0)], -1)
