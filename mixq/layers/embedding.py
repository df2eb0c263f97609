"""Token embedding, optionally shared with the LM head (tied embeddings)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mixq.formats.spec import QuantizedWeight
from mixq.kernels import dense


class Embedding(nn.Module):
    def __init__(self, num_embeddings: int, dim: int):
        super().__init__()
        self.num_embeddings, self.dim = num_embeddings, dim
        self.weight: torch.Tensor | None = None

    def load(self, qw: QuantizedWeight, dtype: torch.dtype) -> None:
        if qw.spec.is_quantized:
            raise ValueError(f"{qw.name}: quantized embeddings ({qw.spec.describe()}) are not supported")
        if tuple(qw.shape) != (self.num_embeddings, self.dim):
            raise ValueError(f"{qw.name}: shape {list(qw.shape)}, expected [{self.num_embeddings}, {self.dim}]")
        self.weight = qw.tensors["weight"].to(dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)  # [T, dim]

    def as_lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        return dense.linear(hidden, self.weight)  # [R, vocab]
