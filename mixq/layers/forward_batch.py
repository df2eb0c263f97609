"""The per-step batch metadata, passed explicitly through the model (no globals)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mixq.kernels.extend_attention import ExtendTiles, plan_tiles


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
    extend_tiles(group, head_dim) gives the extend-attention kernel's query tiles, built on
    the host once per step and shared by every layer of that shape.
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
    _tiles: dict[tuple[int, int], ExtendTiles] = field(default_factory=dict, init=False, repr=False)

    @property
    def num_seqs(self) -> int:
        return self.context_lens.shape[0]

    def extend_tiles(self, group: int, head_dim: int) -> ExtendTiles:
        """The step's tiles for layers with `group` query heads per KV head (cached)."""
        key = (group, head_dim)
        if key not in self._tiles:
            if self.query_start_list is None or self.context_lens_list is None:
                raise ValueError("extend attention needs the host copies of query_start and context_lens "
                                 "(a CUDA-graph decode step has none: it runs the decode kernel)")
            self._tiles[key] = plan_tiles(self.query_start_list, self.context_lens_list, group, head_dim,
                                          self.query_start.device)
        return self._tiles[key]
