"""A sequence being generated: its tokens, KV blocks and progress (plain Python)."""

from __future__ import annotations

import itertools
from enum import Enum

from mixq.engine.sampling_params import SamplingParams

_ids = itertools.count()


class SeqStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """One completion. `num_computed` tokens have their K/V in the cache; the rest of
    `token_ids` still has to be computed (prefill, possibly in chunks, or a recompute
    after preemption)."""

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, index: int = 0):
        if not prompt_token_ids:
            raise ValueError(f"request {request_id}: empty prompt")
        self.seq_id = next(_ids)
        self.request_id, self.index, self.params = request_id, index, params
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.status = SeqStatus.WAITING
        self.block_table: list[int] = []
        self.num_computed = 0
        self.num_cached_blocks = 0  # leading blocks of block_table registered in (or matched from) the prefix cache
        self.num_cached_tokens = 0  # prompt tokens found in the prefix cache when last admitted
        # tokens sampled by a scheduled step and not yet recorded in output_token_ids (0 or 1
        # between steps; with the overlap schedule the next step is scheduled before then)
        self.num_pending = 0
        self.finish_reason: str | None = None
        self.engine_state: object = None  # detokenizer state etc., owned by the engine

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status == SeqStatus.FINISHED

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id}#{self.index}, {self.status.value}, tokens={self.num_tokens}, "
                f"pending={self.num_pending}, computed={self.num_computed}, blocks={len(self.block_table)})")
