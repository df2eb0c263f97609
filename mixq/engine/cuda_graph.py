"""Decode steps replayed from CUDA graphs (SGLang's --cuda-graph-max-bs, --cuda-graph-bs,
--disable-cuda-graph).

A decode step of a small model is a few hundred kernel launches of a few microseconds of
GPU work each; launched from Python the host is the bottleneck. At start the model runner
captures one graph per batch size bucket: the whole forward (every layer's kernels, the
collectives of tensor parallelism, the expert-tracking hooks) and the LM head, reading its
inputs from static device buffers. A decode step of n sequences then copies its inputs into
those buffers, pads them to the smallest bucket >= n and replays that bucket's graph.

Padding rows are inert: token 0 at position 0, one token of context in block 0 (read, never
trusted), and their K/V written to a scratch slot that belongs to no sequence (the model
runner allocates one block past the scheduler's blocks for it). Their logits are cut off.

Requirements on the forward, which the kernels meet: no host sync and no host-to-device
copy inside it, launch grids fixed by shapes (never by token values), and the attention's
decode kernel rather than the per-sequence reference loop. Steps that are not pure decodes
(prefill chunks), or are larger than the largest bucket, run eagerly.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from mixq.layers.forward_batch import ForwardBatch

log = logging.getLogger("mixq.engine")


def resolve_placeholders(ids: torch.Tensor, prev_tokens: torch.Tensor | None) -> torch.Tensor:
    """ids with each -(k+1) replaced by prev_tokens[k], on the device (no host sync): how a
    step's inputs take the tokens the step before sampled (the overlap schedule), eager or
    replayed."""
    if prev_tokens is None or prev_tokens.numel() == 0:
        return ids
    return torch.where(ids < 0, prev_tokens[(-ids - 1).clamp(0, prev_tokens.numel() - 1)], ids)


def graph_batch_sizes(max_bs: int, sizes: list[int] | None = None) -> list[int]:
    """The buckets to capture: `sizes` if given (each >= 1), else 1, 2, 4, 8 and every
    multiple of 8 up to max_bs (SGLang's spacing), always ending at max_bs. Sorted, unique."""
    if sizes:
        bad = [s for s in sizes if s < 1]
        if bad:
            raise ValueError(f"CUDA graph batch sizes must be >= 1, got {bad}")
        return sorted(set(sizes))
    if max_bs < 1:
        raise ValueError(f"--cuda-graph-max-bs must be >= 1, got {max_bs}")
    out = {s for s in (1, 2, 4, 8) if s <= max_bs} | set(range(16, max_bs + 1, 8)) | {max_bs}
    return sorted(out)


def graph_plan(cfg, device: torch.device, attention_backend: str) -> tuple[list[int] | None, str]:
    """The decode batch sizes an engine config (mixq.engine.engine.EngineConfig) captures on
    `device` with `attention_backend`, or None and why not."""
    if cfg.disable_cuda_graph:
        return None, "--disable-cuda-graph"
    if device.type != "cuda":
        return None, f"device {device.type}"
    if attention_backend != "triton":
        return None, f"attention backend {attention_backend} (graphs need triton)"
    if cfg.ep_size > 1 and cfg.moe_dispatch == "all-to-all":
        return None, "--moe-dispatch all-to-all (its split sizes are host data)"
    max_bs = min(cfg.cuda_graph_max_bs or min(cfg.max_running_requests, 256), cfg.max_running_requests)
    return graph_batch_sizes(max_bs, cfg.cuda_graph_bs), ""


class DecodeGraphs:
    """Static input buffers and one captured graph (or, with capture=False, an eager run on
    the same buffers: how the CPU tests check the padding) per batch size bucket.

    runner: the ModelRunner (its model, device, block size and scratch slot);
    sizes: the buckets; max_blocks: block-table width (blocks of the longest sequence).
    """

    def __init__(self, runner, sizes: list[int], max_blocks: int, capture: bool = True):
        self.runner, self.sizes, self.capture = runner, sorted(sizes), capture
        dev, b = runner.device, max(sizes)
        self.max_bs, self.max_blocks = b, max_blocks
        # rows: token ids, positions, KV slots, context lengths
        self.meta = torch.zeros(4, b, dtype=torch.int64, device=dev)
        self.tables = torch.zeros(b, max_blocks, dtype=torch.int32, device=dev)
        self.rows = torch.arange(b + 1, dtype=torch.int64, device=dev)
        self.pad = torch.tensor([0, 0, runner.scratch_slot, 1], dtype=torch.int64, device=dev)[:, None]
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.pool = None
        # host copies of the inputs a step writes: meta rows and block tables (numpy: item
        # writes cost a fraction of a torch op's); each row remembers the table list it holds
        self._host_meta = np.zeros((4, b), dtype=np.int64)
        self._host_tables = np.zeros((b, max_blocks), dtype=np.int32)
        self._row_table: list[list[int] | None] = [None] * b
        self._row_len = [0] * b

    def _batch(self, bs: int) -> tuple[torch.Tensor, ForwardBatch]:
        m = self.meta
        return m[0, :bs], ForwardBatch(
            positions=m[1, :bs], slot_mapping=m[2, :bs], query_start=self.rows[: bs + 1], context_lens=m[3, :bs],
            block_tables=self.tables[:bs], logits_index=self.rows[:bs], query_start_list=None,
            context_lens_list=None, block_size=self.runner.block_size, is_decode=True)

    def _forward(self, bs: int) -> torch.Tensor:
        ids, batch = self._batch(bs)
        model = self.runner.model
        return model.compute_logits(model(ids, batch)).float()  # [bs, vocab]

    def _fill_padding(self, start: int, stop: int) -> None:
        """Rows [start, stop) become inert padding (see the module docstring)."""
        if stop <= start:
            return
        self.meta[:, start:stop] = self.pad
        self.tables[start:stop, 0] = 0

    @torch.inference_mode()
    def capture_all(self) -> None:
        """Warm up (Triton compiles, NCCL communicators) and capture every bucket, largest
        first so the smaller graphs reuse its memory pool."""
        t0 = time.perf_counter()
        self._fill_padding(0, self.max_bs)
        if not self.capture:
            return
        torch.cuda.synchronize(self.runner.device)
        free0 = torch.cuda.mem_get_info(self.runner.device)[0]
        self.pool = torch.cuda.graph_pool_handle()
        for bs in reversed(self.sizes):
            for _ in range(2):
                self._forward(bs)
            torch.cuda.synchronize(self.runner.device)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self.pool):
                self.outputs[bs] = self._forward(bs)
            self.graphs[bs] = g
        torch.cuda.synchronize(self.runner.device)
        used = free0 - torch.cuda.mem_get_info(self.runner.device)[0]
        log.info("captured CUDA graphs for decode batch sizes %s in %.1f s (%.2f GiB)", self.sizes,
                 time.perf_counter() - t0, used / 2**30)

    def bucket(self, n: int) -> int | None:
        """The smallest bucket that holds n sequences, None when n exceeds them all."""
        for s in self.sizes:
            if s >= n:
                return s
        return None

    def run(self, chunks, bs: int, prev_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [n, vocab] float32 of a decode step of n = len(chunks) <= bs sequences.
        The tensor is a view of the graph's output: valid until the next replay. Token ids
        -(k+1) stand for prev_tokens[k] (ModelRunner.forward)."""
        n, page = len(chunks), self.runner.block_size
        meta = self._host_meta
        ids, pos, slots, ctx = meta[0], meta[1], meta[2], meta[3]
        width, rows, lens, tables = 0, self._row_table, self._row_len, self._host_tables
        for k, c in enumerate(chunks):
            p, tab = c.start_pos, c.block_table
            m = len(tab)
            if m * page <= p:
                raise ValueError(f"block table of {m} blocks cannot hold {p + 1} tokens")
            if m > width:
                width = m
                if m > self.max_blocks:
                    raise ValueError(f"a block table of {m} blocks exceeds the captured width {self.max_blocks}")
            ids[k], pos[k], slots[k], ctx[k] = c.token_ids[0], p, tab[p // page] * page + p % page, p + 1
            # a block table only grows while its sequence holds it (a freed table is a new
            # list): a row that holds the same list writes only the blocks added since
            if rows[k] is not tab:
                rows[k], lens[k] = tab, 0
            if lens[k] != m:
                tables[k, lens[k] : m] = tab[lens[k] :]
                lens[k] = m
        # columns past a row's table hold older ids: never read, the kernel stops at the context
        self.meta[:, :n].copy_(torch.from_numpy(meta[:, :n]), non_blocking=True)
        self.tables[:n, :width].copy_(torch.from_numpy(tables[:n, :width]), non_blocking=True)
        if prev_tokens is not None and (meta[0, :n] < 0).any():
            self.meta[0, :n] = resolve_placeholders(self.meta[0, :n], prev_tokens)
        self._fill_padding(n, bs)
        if self.capture:
            self.graphs[bs].replay()
            return self.outputs[bs][:n]
        with torch.inference_mode():
            return self._forward(bs)[:n]
