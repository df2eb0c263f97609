"""Each model family against HF transformers on the same weights: prefill (whole and
chunked) and decode through the paged KV cache, several sequences batched together."""

from __future__ import annotations

import pytest
import torch
import transformers

from mixq.engine.model_runner import ModelRunner, SeqChunk
from mixq.formats import build_plan, load_weights
from mixq.models import build_model, load_model_weights
from tests.devices import DEVICE

BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)

FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True)),
    "llama3-rope": ("LlamaConfig", "LlamaForCausalLM", dict(rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}, rope_theta=500000.0)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict()),
    "qwen3-yarn": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=32, rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64})),
    "qwen2-moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(**MOE, shared_expert_intermediate_size=48,
                                                              norm_topk_prob=False)),
    "qwen3-moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(**MOE, norm_topk_prob=True, mlp_only_layers=[1])),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2)),
}


def make_hf(family: str, path, dtype=torch.float32):
    cfg_cls, model_cls, extra = FAMILIES[family]
    kw = {**BASE, **extra}
    if family == "mixtral":
        kw.pop("moe_intermediate_size", None)
    cfg = getattr(transformers, cfg_cls)(**kw)
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(cfg).to(dtype).eval()
    with torch.no_grad():  # larger weights than the default init, so errors show
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.08)
            elif "norm" in name:
                p.uniform_(0.8, 1.2)
            else:
                p.normal_(0, 0.05)
    model.save_pretrained(path)
    return model


def load_mixq(path, dtype=torch.float32):
    plan = build_plan(model_path=str(path))
    model = build_model(plan.model_config, DEVICE)
    load_model_weights(model, load_weights(plan, device=DEVICE).values(), dtype)
    return model


@torch.no_grad()
def hf_logits(model, ids: list[int]) -> torch.Tensor:
    return model(torch.tensor([ids])).logits[0].float()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_match_hf_prefill_chunked_and_decode(family, tmp_path):
    hf = make_hf(family, tmp_path / family)
    ours = load_mixq(tmp_path / family)
    runner = ModelRunner(ours, num_blocks=32, block_size=4, dtype=torch.float32, device=DEVICE)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (7, 13, 1)]
    tables = [[3, 9, 1, 20, 21], [4, 5, 6, 7, 8, 10], [11, 12, 13, 14, 15]]  # scattered blocks
    # prefill: seq 0 whole, seq 1 in chunks of 5 (only the last samples), seq 2 whole
    logits = runner.forward([SeqChunk(prompts[0], 0, tables[0]), SeqChunk(prompts[1][:5], 0, tables[1], False),
                             SeqChunk(prompts[2], 0, tables[2])]).cpu()
    assert logits.shape == (2, 128)
    logits = torch.cat([logits[:1], runner.forward([SeqChunk(prompts[1][5:10], 5, tables[1], False)]).cpu(),
                        runner.forward([SeqChunk(prompts[1][10:], 10, tables[1])]).cpu(), logits[1:]])
    seqs = [list(p) for p in prompts]
    for step in range(4):
        for i, s in enumerate(seqs):
            ref = hf_logits(hf, s)[-1]
            torch.testing.assert_close(logits[i], ref, rtol=1e-4, atol=1e-4,
                                       msg=lambda m, i=i, step=step: f"{family} seq {i} step {step}: {m}")
            assert logits[i].argmax() == ref.argmax()
        nxt = [int(logits[i].argmax()) for i in range(3)]
        chunks = [SeqChunk([t], len(s), tables[i]) for i, (s, t) in enumerate(zip(seqs, nxt))]
        for s, t in zip(seqs, nxt):
            s.append(t)
        logits = runner.forward(chunks).cpu()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_bf16_model_matches_hf_bf16(family, tmp_path):
    """BF16 weights and activations on both sides (what the GPU serves), prefill and two
    decode steps through the paged cache."""
    hf = make_hf(family, tmp_path / "m", dtype=torch.bfloat16)
    ours = load_mixq(tmp_path / "m", dtype=torch.bfloat16)
    runner = ModelRunner(ours, num_blocks=8, block_size=16, dtype=torch.bfloat16, device=DEVICE)
    ids = torch.randint(0, 128, (20,), generator=torch.Generator().manual_seed(2)).tolist()
    logits = runner.forward([SeqChunk(ids, 0, [0, 1])])[0].cpu()
    for step in range(3):
        ref = hf_logits(hf, ids)[-1]
        # bf16 keeps 8 bits of mantissa: two layers of rounding differences stay within a few
        # bf16 ulps of the logit scale
        tol = 0.03 * ref.abs().max()
        assert (logits - ref).abs().max() <= tol, f"{family} step {step}"
        top = ref.topk(2).values
        if top[0] - top[1] > 2 * tol:  # a clear winner must win on both sides
            assert logits.argmax() == ref.argmax(), f"{family} step {step}"
        ids.append(int(ref.argmax()))
        logits = runner.forward([SeqChunk(ids[-1:], len(ids) - 1, [0, 1])])[0].cpu()


def test_unsupported_architecture_is_refused():
    with pytest.raises(ValueError, match="architecture 'GPT2LMHeadModel' is not supported; supported: LlamaForCausalLM"):
        build_model({"architectures": ["GPT2LMHeadModel"], "hidden_size": 8, "num_attention_heads": 2,
                     "num_hidden_layers": 1, "vocab_size": 8})
