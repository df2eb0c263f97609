"""Qwen2-MoE and Qwen3-MoE: Llama/Qwen3 attention, sparse MoE MLPs (Qwen2-MoE adds a
gated shared expert); layers listed in mlp_only_layers keep a dense MLP."""

from mixq.layers.moe import SparseMoE
from mixq.models.config import ModelConfig
from mixq.models.llama import MLP, CausalLM


class QwenMoeForCausalLM(CausalLM):
    def __init__(self, c: ModelConfig):
        def make_mlp(i: int):
            if not c.is_moe_layer(i):
                return MLP(c.hidden_size, c.intermediate_size)
            return SparseMoE(c.hidden_size, c.moe_intermediate_size, c.num_experts, c.top_k,
                             renormalize=c.norm_topk_prob, shared_inter=c.shared_expert_intermediate_size)

        super().__init__(c, make_mlp)
