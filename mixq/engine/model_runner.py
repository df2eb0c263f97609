"""Runs the model on a step's batch: owns the paged KV cache, builds ForwardBatch tensors.

The scheduler (plain Python) decides *what* runs; this turns its decision (a list of
SeqChunk) into device tensors in one place, runs the model, and returns the logits of the
rows that sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mixq.engine.cuda_graph import resolve_placeholders
from mixq.layers.attention import PagedAttention
from mixq.layers.forward_batch import ForwardBatch

ATTENTION_BACKENDS = ("auto", "triton", "torch_native")


def resolve_attention_backend(name: str, device: torch.device) -> str:
    """SGLang's --attention-backend: "triton" (one launch per layer and step: the paged decode
    kernel for pure decode steps, the extend kernel for the others; the default on CUDA),
    "torch_native" (SDPA per sequence; the default elsewhere)."""
    from mixq.kernels import paged_attention

    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend {name!r}: expected one of {', '.join(ATTENTION_BACKENDS)}")
    if name == "auto":
        return "triton" if device.type == "cuda" and paged_attention.triton is not None else "torch_native"
    if name == "triton" and paged_attention.triton is None:
        raise ValueError("attention backend 'triton' needs the triton package")
    if name == "triton" and device.type != "cuda" and not paged_attention._interpreting():
        raise ValueError(f"attention backend 'triton' needs a CUDA device (got {device.type}; TRITON_INTERPRET=1 "
                         "runs it slowly on the CPU, for tests)")
    return name


@dataclass(slots=True)
class SeqChunk:
    """New tokens of one sequence for this step.

    token_ids: tokens to compute now (a prefill chunk, or the one decode token); an id
        -(k+1) stands for row k of the previous step's sampled tokens, still on the device
        (the overlap schedule: `forward`'s prev_tokens);
    start_pos: their first position (= tokens already in the cache);
    block_table: the sequence's KV blocks (enough for start_pos + len(token_ids));
    sample: whether this step needs the last token's logits.
    """

    token_ids: list[int]
    start_pos: int
    block_table: list[int]
    sample: bool = True


class ModelRunner:
    def __init__(self, model: nn.Module, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", attention_backend: str = "auto"):
        self.model, self.block_size, self.device = model, block_size, torch.device(device)
        self.num_blocks = num_blocks
        # one block past the scheduler's: CUDA-graph padding rows write their K/V there
        self.scratch_slot = num_blocks * block_size
        self.graphs = None  # DecodeGraphs once capture_decode_graphs ran
        self.attention_backend = resolve_attention_backend(attention_backend, self.device)
        self.attn_layers = [m for m in model.modules() if isinstance(m, PagedAttention)]
        # the extend kernel's tile shapes: one tile list per shape and step, shared by the layers
        self.tile_shapes = sorted({(m.num_heads // m.num_kv_heads, m.head_dim) for m in self.attn_layers})
        for m in self.attn_layers:
            m.decode_kernel = self.attention_backend == "triton"
            shape = (num_blocks + 1, block_size, m.num_kv_heads, m.head_dim)
            m.k_cache = torch.zeros(shape, dtype=dtype, device=self.device)
            m.v_cache = torch.zeros(shape, dtype=dtype, device=self.device)

    @staticmethod
    def kv_bytes_per_block(model: nn.Module, block_size: int, dtype: torch.dtype) -> int:
        """KV cache bytes one block costs across all layers (for sizing the cache)."""
        per = 0
        for m in model.modules():
            if isinstance(m, PagedAttention):
                per += 2 * block_size * m.num_kv_heads * m.head_dim * dtype.itemsize
        return per

    def prepare(self, chunks: list[SeqChunk]) -> tuple[torch.Tensor, ForwardBatch]:
        ids, pos, slots, qstart, ctx, logits_index = [], [], [], [0], [], []
        bs = self.block_size
        width = max(len(c.block_table) for c in chunks)
        tables = []
        for c in chunks:
            n = len(c.token_ids)
            end = c.start_pos + n
            if len(c.block_table) * bs < end:
                raise ValueError(f"block table of {len(c.block_table)} blocks cannot hold {end} tokens")
            ids += c.token_ids
            for p in range(c.start_pos, end):
                pos.append(p)
                slots.append(c.block_table[p // bs] * bs + p % bs)
            qstart.append(qstart[-1] + n)
            ctx.append(end)
            if c.sample:
                logits_index.append(qstart[-1] - 1)
            tables.append(c.block_table + [0] * (width - len(c.block_table)))

        def t(x, dtype=torch.int64):  # non-blocking: queued behind the step in flight, no host sync
            return torch.tensor(x, dtype=dtype).to(self.device, non_blocking=True)

        batch = ForwardBatch(
            positions=t(pos), slot_mapping=t(slots), query_start=t(qstart), context_lens=t(ctx),
            block_tables=t(tables, torch.int32), logits_index=t(logits_index),
            query_start_list=qstart, context_lens_list=ctx, block_size=bs,
            is_decode=all(len(c.token_ids) == 1 for c in chunks),
        )
        if self.attention_backend == "triton" and not batch.is_decode:
            for group, head_dim in self.tile_shapes:  # here, before the model's first kernel is queued
                batch.extend_tiles(group, head_dim)
        return t(ids), batch

    @torch.inference_mode()
    def score(self, token_ids: list[int], block_table: list[int]) -> torch.Tensor:
        """Logits [T, vocab] float32 at every position of one sequence (perplexity)."""
        ids, batch = self.prepare([SeqChunk(token_ids, 0, block_table)])
        hidden = self.model(ids, batch)
        return self.model.compute_logits(hidden).float()

    def capture_decode_graphs(self, sizes: list[int], max_blocks: int, capture: bool = True) -> None:
        """Capture decode steps of the given batch sizes in CUDA graphs (mixq.engine.cuda_graph);
        capture=False runs the same padded static-buffer path eagerly (CPU tests). Needs the
        triton attention backend: the torch one loops over host-side lengths."""
        from mixq.engine.cuda_graph import DecodeGraphs

        if self.attention_backend != "triton":
            raise ValueError(f"CUDA graphs need --attention-backend triton, not {self.attention_backend!r}")
        if capture and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, not {self.device}")
        graphs = DecodeGraphs(self, sizes, max_blocks, capture)
        graphs.capture_all()
        self.graphs = graphs

    @torch.inference_mode()
    def forward(self, chunks: list[SeqChunk], prev_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [R, vocab] float32 for the chunks with sample=True, in order (for a
        replayed decode step, a view valid until the next step). prev_tokens [R'] int64, on
        the device: the previous step's sampled tokens, which ids -(k+1) stand for."""
        if self.graphs is not None and all(len(c.token_ids) == 1 and c.sample for c in chunks):
            bs = self.graphs.bucket(len(chunks))
            if bs is not None:
                return self.graphs.run(chunks, bs, prev_tokens)
        ids, batch = self.prepare(chunks)
        ids = resolve_placeholders(ids, prev_tokens)
        hidden = self.model(ids, batch)  # [T, hidden]
        return self.model.compute_logits(hidden[batch.logits_index]).float()
