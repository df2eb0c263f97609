"""Rotary frequency schedules against HF transformers' own rotary modules: default, linear,
Llama-3 and YaRN (in Qwen's legacy `rope_scaling: {type: yarn}` form and in v5's
`rope_parameters`), and a Qwen2.5 model with YaRN served past its pretraining length."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

from mixq.engine.model_runner import ModelRunner, SeqChunk
from mixq.layers.rotary import RotaryEmbedding, rope_frequencies
from mixq.models.config import ModelConfig
from tests.devices import DEVICE
from tests.test_models_hf import hf_logits, load_mixq

SHAPE = dict(hidden_size=1024, num_attention_heads=8)
CASES = {
    "default": (transformers.LlamaConfig, LlamaRotaryEmbedding, dict(rope_theta=10000.0, max_position_embeddings=4096)),
    "linear": (transformers.LlamaConfig, LlamaRotaryEmbedding, dict(
        max_position_embeddings=8192, rope_scaling={"rope_type": "linear", "factor": 2.0})),
    # Llama-3.1's published rope_scaling
    "llama3": (transformers.LlamaConfig, LlamaRotaryEmbedding, dict(
        rope_theta=500000.0, max_position_embeddings=131072,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192})),
    # what Qwen2.5 / Qwen3 model cards tell users to add to config.json
    "yarn-qwen": (transformers.Qwen2Config, Qwen2RotaryEmbedding, dict(
        head_dim=128, rope_theta=1000000.0, max_position_embeddings=32768,
        rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768})),
    "yarn-mscale": (transformers.LlamaConfig, LlamaRotaryEmbedding, dict(
        max_position_embeddings=16384, rope_scaling={"rope_type": "yarn", "factor": 4.0, "mscale": 0.707,
                                                     "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                                                     "beta_fast": 16, "beta_slow": 2})),
}


@pytest.mark.parametrize("case", list(CASES))
def test_frequencies_and_tables_match_hf(case):
    cfg_cls, rot_cls, kw = CASES[case]
    cfg = cfg_cls(**SHAPE, **kw)
    raw = cfg.to_dict()
    hf = rot_cls(cfg)
    head_dim = raw.get("head_dim") or SHAPE["hidden_size"] // SHAPE["num_attention_heads"]
    inv_freq, scale = rope_frequencies(head_dim, raw)
    # HF builds inv_freq in float32 (a few roundings of 2**-24): ours is float64
    torch.testing.assert_close(inv_freq, hf.inv_freq.double(), rtol=1e-6, atol=0)
    assert scale == pytest.approx(hf.attention_scaling, rel=1e-12)

    n = 4096
    ours = RotaryEmbedding(head_dim, n, raw)
    cos, sin = hf(torch.zeros(1, n, head_dim), torch.arange(n)[None])
    # HF's angle is position * inv_freq in float32: up to 4096 * 2**-23 rad off at the end
    for mine, theirs in ((ours.cos, cos), (ours.sin, sin)):
        torch.testing.assert_close(mine.double(), theirs[0, :, : head_dim // 2].double(), rtol=0, atol=1e-3)
        torch.testing.assert_close(theirs[0, :, : head_dim // 2], theirs[0, :, head_dim // 2 :])  # HF duplicates


def test_yarn_extends_the_served_context_like_qwen_documents():
    raw = transformers.Qwen2Config(**SHAPE, **CASES["yarn-qwen"][2]).to_dict()
    assert ModelConfig.from_hf({**raw, "architectures": ["Qwen2ForCausalLM"]}).max_position == 4 * 32768
    llama3 = transformers.LlamaConfig(**SHAPE, **CASES["llama3"][2]).to_dict()
    assert ModelConfig.from_hf({**llama3, "architectures": ["LlamaForCausalLM"]}).max_position == 131072


def test_qwen2_yarn_model_matches_hf_past_its_pretraining_length(tmp_path):
    """A tiny Qwen2.5 with max_position_embeddings 32 and YaRN x4: a 100-token prompt and
    decode steps through the paged cache give HF's logits."""
    cfg = transformers.Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                   rope_theta=10000.0,
                                   rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32})
    torch.manual_seed(0)
    hf = transformers.Qwen2ForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.normal_(0, 0.08) if p.dim() >= 2 else (p.uniform_(0.8, 1.2) if "norm" in name else p.normal_(0, 0.05))
    hf.save_pretrained(tmp_path)
    model = load_mixq(tmp_path)
    assert model.config.max_position == 128
    runner = ModelRunner(model, num_blocks=16, block_size=8, dtype=torch.float32, device=DEVICE)
    ids = torch.randint(0, 128, (100,), generator=torch.Generator().manual_seed(3)).tolist()
    table = list(range(14))
    logits = runner.forward([SeqChunk(ids, 0, table)])[0].cpu()
    for _ in range(3):
        ref = hf_logits(hf, ids)[-1]
        torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)  # float32 on both sides
        nxt = int(logits.argmax())
        ids.append(nxt)
        logits = runner.forward([SeqChunk([nxt], len(ids) - 1, table)])[0].cpu()


def test_layers_share_one_rotary_table():
    """The cos/sin tables are [max_position, head_dim/2]: one copy for the model, not one
    per layer (a 131072-token Llama-3-70B would hold 5 GiB of copies)."""
    from mixq.models import build_model

    raw = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                   num_attention_heads=4, **CASES["llama3"][2]).to_dict()
    model = build_model({**raw, "architectures": ["LlamaForCausalLM"]})
    ropes = {id(layer.self_attn.rotary) for layer in model.model.layers}
    assert len(ropes) == 1
    assert model.model.layers[0].self_attn.rotary.cos.shape == (131072, 8)
