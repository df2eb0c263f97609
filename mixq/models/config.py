"""The model's shape, read once from config.json into a typed object."""

from __future__ import annotations

from dataclasses import dataclass, field

from mixq.layers.rotary import rope_max_position


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    max_position: int
    tie_word_embeddings: bool
    qkv_bias: bool = False
    qk_norm: bool = False
    # MoE (0 experts = dense)
    num_experts: int = 0
    top_k: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    shared_expert_intermediate_size: int = 0
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    eos_token_ids: tuple[int, ...] = ()
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_hf(cls, cfg: dict) -> ModelConfig:
        """From a config.json dict; missing required keys raise KeyError naming them."""
        archs = cfg.get("architectures") or [""]
        mt = cfg.get("model_type", "")
        heads = cfg["num_attention_heads"]
        eos = cfg.get("eos_token_id")
        eos = () if eos is None else tuple(eos) if isinstance(eos, list) else (eos,)
        return cls(
            architecture=archs[0],
            model_type=mt,
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg.get("intermediate_size", 0),
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            vocab_size=cfg["vocab_size"],
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            max_position=rope_max_position(cfg),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=bool(cfg.get("attention_bias", mt in ("qwen2", "qwen2_moe"))),
            qk_norm=mt in ("qwen3", "qwen3_moe"),
            num_experts=cfg.get("num_experts", cfg.get("num_local_experts", 0)) or 0,
            top_k=cfg.get("num_experts_per_tok", 0) or 0,
            moe_intermediate_size=cfg.get("moe_intermediate_size", cfg.get("intermediate_size", 0)),
            norm_topk_prob=bool(cfg.get("norm_topk_prob", mt == "mixtral")),
            shared_expert_intermediate_size=cfg.get("shared_expert_intermediate_size", 0) or 0,
            decoder_sparse_step=cfg.get("decoder_sparse_step", 1) or 1,
            mlp_only_layers=tuple(cfg.get("mlp_only_layers") or ()),
            eos_token_ids=eos,
            raw=cfg,
        )

    def is_moe_layer(self, i: int) -> bool:
        return (self.num_experts > 0 and i not in self.mlp_only_layers
                and (i + 1) % self.decoder_sparse_step == 0)
