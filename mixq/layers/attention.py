"""Causal self-attention over a paged KV cache.

The cache of a layer is two tensors [num_blocks, block_size, kv_heads, head_dim]; a
sequence's tokens live in the blocks its block table lists. Each step writes the new
tokens' K/V at their slots, then every sequence attends to its whole context. The torch
implementation here gathers a sequence's blocks and calls SDPA per sequence: the
reference and the CPU path (--attention-backend torch_native). With `decode_kernel` set
(--attention-backend triton, the default on CUDA) a step is one launch per layer: a pure
decode step runs mixq.kernels.paged_attention (which CUDA graphs capture), any other step
(prefill chunks, with or without decodes) mixq.kernels.extend_attention. An fp8 cache
(--kv-cache-dtype fp8_e4m3|fp8_e5m2) holds x / scale per tensor (k_scale, v_scale) and is
read back as fp8 * scale by every path (mixq.kernels.kv_quant).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mixq.kernels import elementwise
from mixq.kernels.extend_attention import paged_extend_attention
from mixq.kernels.kv_quant import dequantize_kv, is_fp8, quantize_kv
from mixq.kernels.paged_attention import paged_decode_attention
from mixq.layers.forward_batch import ForwardBatch


class PagedAttention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = num_heads, num_kv_heads, head_dim, scale
        self.k_cache: torch.Tensor | None = None  # set by the model runner
        self.v_cache: torch.Tensor | None = None
        self.decode_kernel = False  # set by the model runner (--attention-backend)
        # per-tensor scales of an fp8 cache (mixq.kernels.kv_quant): from the checkpoint, else 1.0
        self.k_scale = 1.0
        self.v_scale = 1.0

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """q [T, H, D], k/v [T, Hkv, D] -> [T, H*D]."""
        fp8 = is_fp8(self.k_cache.dtype)
        if elementwise.use_kernels(k) and k.stride(1) == v.stride(1) == self.head_dim and k.stride(2) == v.stride(2) == 1:
            elementwise.store_kv(k, v, self.k_cache, self.v_cache, batch.slot_mapping,
                                 *((self.k_scale, self.v_scale) if fp8 else ()))
        else:
            kc = self.k_cache.view(-1, self.num_kv_heads, self.head_dim)
            vc = self.v_cache.view(-1, self.num_kv_heads, self.head_dim)
            kc[batch.slot_mapping] = quantize_kv(k, self.k_scale, kc.dtype) if fp8 else k.to(kc.dtype)
            vc[batch.slot_mapping] = quantize_kv(v, self.v_scale, vc.dtype) if fp8 else v.to(vc.dtype)
        if self.decode_kernel:
            qc = q if fp8 else q.to(self.k_cache.dtype)  # an fp8 cache is read in the query's dtype
            scales = dict(k_scale=self.k_scale, v_scale=self.v_scale) if fp8 else {}
            if batch.is_decode:
                out = paged_decode_attention(qc, self.k_cache, self.v_cache, batch.block_tables, batch.context_lens,
                                             self.scale, **scales)
            else:
                tiles = batch.extend_tiles(self.num_heads // self.num_kv_heads, self.head_dim)
                out = paged_extend_attention(qc, self.k_cache, self.v_cache, batch.block_tables, batch.query_start,
                                             batch.context_lens, self.scale, tiles, **scales)
            return out.to(q.dtype).flatten(1)
        out = torch.empty_like(q)
        bs = batch.block_size
        qs = batch.query_start_list
        for i, ctx in enumerate(batch.context_lens_list):
            q_i = q[qs[i] : qs[i + 1]]  # [L, H, D]
            n_q = q_i.shape[0]
            blocks = batch.block_tables[i, : (ctx + bs - 1) // bs]
            # index_select: a quarter of advanced indexing's cost on the CPU (~3 vs 13 us)
            k_i = dequantize_kv(self.k_cache.index_select(0, blocks).flatten(0, 1)[:ctx], self.k_scale, q.dtype)
            v_i = dequantize_kv(self.v_cache.index_select(0, blocks).flatten(0, 1)[:ctx], self.v_scale, q.dtype)
            # query j sits at position ctx - n_q + j and sees keys 0 .. ctx - n_q + j
            mask = None
            if n_q > 1:
                mask = torch.ones(n_q, ctx, dtype=torch.bool, device=q.device).tril(ctx - n_q)
            # 4-d (batch of one): torch's CPU flash kernel takes it, where a 3-d call runs the
            # math fallback, 4-16x slower at decode (bench/RESULTS.md, "CPU decode ops")
            o = F.scaled_dot_product_attention(
                q_i.transpose(0, 1)[None], k_i.transpose(0, 1)[None], v_i.transpose(0, 1)[None],
                attn_mask=mask, scale=self.scale, enable_gqa=self.num_kv_heads != self.num_heads,
            )
            out[qs[i] : qs[i + 1]] = o[0].transpose(0, 1)
        return out.flatten(1)
