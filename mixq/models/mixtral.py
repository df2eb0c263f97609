"""Mixtral: Llama/Mistral attention, every layer a sparse MoE (block_sparse_moe) whose
experts are w1 (gate), w3 (up), w2 (down); top-k weights always renormalized."""

from mixq.layers.moe import SparseMoE
from mixq.models.config import ModelConfig
from mixq.models.llama import CausalLM


class MixtralForCausalLM(CausalLM):
    def __init__(self, c: ModelConfig):
        def make_mlp(i: int):
            return SparseMoE(c.hidden_size, c.intermediate_size, c.num_experts, c.top_k,
                             renormalize=True, names=("w1", "w3", "w2"))

        super().__init__(c, make_mlp, mlp_name="block_sparse_moe")
