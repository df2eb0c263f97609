"""Llama family: Llama 2/3/3.1, Mistral, SmolLM2, Qwen2/2.5 (q/k/v bias), Qwen3 (q/k norm)."""

from __future__ import annotations

import torch
from torch import nn

from mixq.layers.activation import FP8Act, silu_and_mul
from mixq.layers.attention import PagedAttention
from mixq.layers.embedding import Embedding
from mixq.layers.forward_batch import ForwardBatch
from mixq.layers.linear import MixedPrecisionLinear
from mixq.layers.merged import merge_linears
from mixq.layers.norm import RMSNorm
from mixq.layers.rotary import get_rope
from mixq.models.config import ModelConfig


class Attention(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.h, self.kv, self.d = c.num_heads, c.num_kv_heads, c.head_dim
        self.q_proj = MixedPrecisionLinear(c.hidden_size, self.h * self.d, bias=c.qkv_bias)
        self.k_proj = MixedPrecisionLinear(c.hidden_size, self.kv * self.d, bias=c.qkv_bias)
        self.v_proj = MixedPrecisionLinear(c.hidden_size, self.kv * self.d, bias=c.qkv_bias)
        self.o_proj = MixedPrecisionLinear(self.h * self.d, c.hidden_size)
        if c.qk_norm:
            self.q_norm, self.k_norm = RMSNorm(self.d, c.rms_norm_eps), RMSNorm(self.d, c.rms_norm_eps)
        self.qk_norm = c.qk_norm
        self.rotary = get_rope(self.d, c.max_position, c.raw)  # shared by all layers
        self.attn = PagedAttention(self.h, self.kv, self.d, self.d**-0.5)
        self.qkv_proj = None  # q/k/v as one GEMM once loaded, when their formats agree

    def merge_projections(self) -> None:
        """q/k/v as one GEMM when their formats agree (load_model_weights calls this)."""
        self.qkv_proj = merge_linears([self.q_proj, self.k_proj, self.v_proj], "qkv_proj")

    def takes_fp8_act(self, m: int, dtype: torch.dtype) -> bool:
        """Whether the input norm should hand q/k/v an FP8Act (merged FP8 W8A8 projections)."""
        return self.qkv_proj is not None and self.qkv_proj.takes_fp8_act(m, dtype)

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        if self.qkv_proj is not None:
            q, k, v = self.qkv_proj(x)  # views of one [T, (H + 2 Hkv) D] output
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(-1, self.h, self.d)  # [T, H, D]
        k = k.view(-1, self.kv, self.d)  # [T, Hkv, D]
        v = v.view(-1, self.kv, self.d)
        if self.qk_norm:  # (the fused norm kernel wants contiguous rows; merged q/k are views)
            q, k = self.q_norm(q.contiguous()), self.k_norm(k.contiguous())
        q, k = self.rotary(batch.positions, q, k)
        return self.o_proj(self.attn(q, k, v, batch))  # [T, hidden]


class MLP(nn.Module):
    def __init__(self, hidden: int, inter: int, names=("gate_proj", "up_proj", "down_proj")):
        super().__init__()
        self.names = names
        for name, (i, o) in zip(names, ((hidden, inter), (hidden, inter), (inter, hidden))):
            setattr(self, name, MixedPrecisionLinear(i, o))
        self.gate_up_proj = None  # gate/up as one GEMM once loaded, when their formats agree

    def merge_projections(self) -> None:
        """gate/up as one GEMM when their formats agree (load_model_weights calls this)."""
        self.gate_up_proj = merge_linears([getattr(self, n) for n in self.names[:2]], "gate_up_proj")

    def takes_fp8_act(self, m: int, dtype: torch.dtype) -> bool:
        """Whether the norm before this MLP should hand it an FP8Act (merged FP8 gate/up)."""
        return self.gate_up_proj is not None and self.gate_up_proj.takes_fp8_act(m, dtype)

    def forward(self, x: torch.Tensor | FP8Act) -> torch.Tensor:
        gate, up, down = (getattr(self, n) for n in self.names)
        g, u = self.gate_up_proj(x) if self.gate_up_proj is not None else (gate(x), up(x))  # views of one output
        # an FP8 down projection gets its input quantized by the activation kernel
        return down(silu_and_mul(g, u, quant_fp8=down.takes_fp8_act(g.shape[0], g.dtype)))  # [T, hidden]


class DecoderLayer(nn.Module):
    def __init__(self, c: ModelConfig, mlp: nn.Module, mlp_name: str = "mlp"):
        super().__init__()
        self.self_attn = Attention(c)
        self.mlp_name = mlp_name
        setattr(self, mlp_name, mlp)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, x, residual, batch: ForwardBatch):
        # FP8 W8A8 consumers at large M get their input quantized by the norm (quant_fused)
        m, dtype = x.shape[0], x.dtype
        mlp = getattr(self, self.mlp_name)
        q_attn = self.self_attn.takes_fp8_act(m, dtype)
        if residual is None:
            x, residual = self.input_layernorm(x, quant_fp8=q_attn), x
        else:
            x, residual = self.input_layernorm(x, residual, quant_fp8=q_attn)
        x = self.self_attn(x, batch)
        q_mlp = hasattr(mlp, "takes_fp8_act") and mlp.takes_fp8_act(m, dtype)
        x, residual = self.post_attention_layernorm(x, residual, quant_fp8=q_mlp)
        return mlp(x), residual


class DecoderModel(nn.Module):
    """Embeddings, decoder layers, final norm. `make_mlp(i)` builds layer i's MLP/MoE."""

    def __init__(self, c: ModelConfig, make_mlp, mlp_name: str = "mlp"):
        super().__init__()
        self.embed_tokens = Embedding(c.vocab_size, c.hidden_size, tied=c.tie_word_embeddings)
        self.layers = nn.ModuleList(DecoderLayer(c, make_mlp(i), mlp_name) for i in range(c.num_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        x, residual = self.embed_tokens(input_ids), None  # [T, hidden]
        for layer in self.layers:
            x, residual = layer(x, residual, batch)
        x, _ = self.norm(x, residual)
        return x


class CausalLM(nn.Module):
    """A decoder plus LM head (tied to the embeddings when the config says so)."""

    def __init__(self, c: ModelConfig, make_mlp=None, mlp_name: str = "mlp"):
        super().__init__()
        self.config = c
        make_mlp = make_mlp or (lambda i: MLP(c.hidden_size, c.intermediate_size))
        self.model = DecoderModel(c, make_mlp, mlp_name)
        self.lm_head = None if c.tie_word_embeddings else MixedPrecisionLinear(c.hidden_size, c.vocab_size)

    def forward(self, input_ids: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        return self.model(input_ids, batch)  # [T, hidden]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.lm_head is None:
            return self.model.embed_tokens.as_lm_head(hidden)
        return self.lm_head(hidden)  # [R, vocab]


class LlamaForCausalLM(CausalLM):
    """Llama, Mistral, SmolLM2, Qwen2 (qkv bias), Qwen3 (q/k norm): one math, flags differ."""
