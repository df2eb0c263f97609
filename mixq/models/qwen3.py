"""Qwen3 dense: the Llama math with RMSNorm on q and k per head (ModelConfig.qk_norm)."""

from mixq.models.llama import CausalLM


class Qwen3ForCausalLM(CausalLM):
    """Qwen3: q_norm/k_norm inside attention; everything else as Llama."""
