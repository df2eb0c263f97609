"""Token embedding, optionally shared with the LM head (tied embeddings).

Dense tables are held in the model dtype. A GGUF-quantized table (llama.cpp files store
`token_embd` as Q8_0, Q4_K, Q6_K ...) stays in its blocks: a lookup dequantizes only the
rows asked for; when tied, the LM head is a MixedPrecisionLinear over the same weight (on
the CPU the reference method reads the very same blocks; a GPU kernel repacks its own
compressed copy once).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mixq.formats.gguf_quants import dequantize
from mixq.formats.spec import QuantizedWeight
from mixq.kernels import cpu_gguf, dense
from mixq.layers.linear import MixedPrecisionLinear


class Embedding(nn.Module):
    def __init__(self, num_embeddings: int, dim: int, tied: bool = False):
        super().__init__()
        self.num_embeddings, self.dim, self.tied = num_embeddings, dim, tied
        self.weight: torch.Tensor | None = None
        self.qweight: QuantizedWeight | None = None  # a quantized table, as stored
        self.head = None  # tied + quantized: the LM head's MixedPrecisionLinear

    def load(self, qw: QuantizedWeight, dtype: torch.dtype) -> None:
        if tuple(qw.shape) != (self.num_embeddings, self.dim):
            raise ValueError(f"{qw.name}: shape {list(qw.shape)}, expected [{self.num_embeddings}, {self.dim}]")
        if not qw.spec.is_quantized:
            self.weight = qw.tensors["weight"].to(dtype)
            return
        if qw.spec.layout != "gguf":
            raise ValueError(f"{qw.name}: quantized embeddings ({qw.spec.describe()}) are not supported "
                             "(GGUF types are)")
        self.qweight, self.dtype = qw, dtype
        if self.tied:
            head = MixedPrecisionLinear(self.dim, self.num_embeddings)
            head.load(qw, dtype)
            # not a submodule: the table is this module's weight (memory stats count it once)
            object.__setattr__(self, "head", head)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of the table for ids [T] -> [T, dim] in the model dtype."""
        if self.qweight is not None:
            rows = self.qweight.tensors["blocks"][ids]  # [T, K/B, T_bytes]: only these rows
            return dequantize(rows, self.qweight.spec.qtype).to(self.dtype)
        return F.embedding(ids, self.weight)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [R, dim] times the table^T -> [R, vocab] (the tied LM head)."""
        if self.qweight is not None:
            if self.head is None:
                raise RuntimeError(f"{self.qweight.name}: a quantized embedding is used as the LM head but was "
                                   "not built tied")
            if self.head.method.name == "cpu-q8_0":
                # the C kernel writes its fp32 sums as they are: float32 logits at no cost. In
                # bf16 logits near 25 fall on 0.125 steps, and greedy decoding then breaks
                # near-ties by token id (the README's chat prompt: 0.1 logit apart in fp32)
                return cpu_gguf.q8_0_linear(hidden.reshape(-1, self.dim), self.head.weight.tensors["blocks"],
                                            torch.float32).reshape(*hidden.shape[:-1], self.num_embeddings)
            return self.head(hidden)
        return dense.linear(hidden, self.weight)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lookup(ids)  # [T, dim]

    def as_lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.logits(hidden)  # [R, vocab]
