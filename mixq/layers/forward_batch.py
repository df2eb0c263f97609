"""The per-step batch metadata, passed explicitly through the model (no globals)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ForwardBatch:
    """A flat batch of T new tokens from S sequences (prefill chunks and decodes mixed).

    positions     [T] int64   absolute position of each new token
    slot_mapping  [T] int64   KV-cache slot (block * block_size + offset) each token writes
    query_start   [S+1] int64 cumulative new-token counts: seq i owns rows
                              query_start[i]:query_start[i+1]
    context_lens  [S] int64   tokens in the cache for seq i after this step
    block_tables  [S, B] int32 KV block ids of each sequence (padded with 0)
    logits_index  [R] int64   rows whose logits are needed (last token of sampling seqs)
    The host copies (`*_list`) let the reference attention loop without device syncs; they
    are None in a CUDA-graph decode step (mixq.engine.cuda_graph), whose values change
    between replays.
    is_decode: every sequence has exactly one new token (a pure decode step).
    """

    positions: torch.Tensor
    slot_mapping: torch.Tensor
    query_start: torch.Tensor
    context_lens: torch.Tensor
    block_tables: torch.Tensor
    logits_index: torch.Tensor
    query_start_list: list[int] | None
    context_lens_list: list[int] | None
    block_size: int
    is_decode: bool = False

    @property
    def num_seqs(self) -> int:
        return self.context_lens.shape[0]
