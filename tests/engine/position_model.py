"""A tiny Llama whose outputs depend strongly on token positions, and a float64 forward
of it written from scratch (its own rotary, positions, causal attention; no KV cache, no
mixq code), for engine tests that compare logprobs.

The fixture model of tests/fixtures (initializer range 0.02) barely depends on position:
a rotary offset of a few positions moves its logprobs by ~1e-3 and no greedy token. Here
q/k projections are large (attention logits of several units, so softmax weights are
sharp and follow the rotated q.k), the rotary base is 100 (every frequency pair turns by
a visible angle per position) and the residual stream is small against the attention
output. A position off by the start of a prefill chunk then moves logprobs by ~1e-1."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FIX = Path(__file__).parents[1] / "fixtures" / "tiny-llama" / "bf16"
CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
    "vocab_size": 256, "rms_norm_eps": 1e-6, "max_position_embeddings": 512, "tie_word_embeddings": False,
    "rope_theta": 100.0, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "hidden_act": "silu",
    "torch_dtype": "float32",
}


def make_position_model(path: Path, seed: int = 7) -> Path:
    """Write the model (float32 safetensors, config.json, the fixture's 256-token tokenizer)."""
    c = CONFIG
    g = torch.Generator().manual_seed(seed)
    h, i, v, hd = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd

    def rnd(*shape, std):
        return torch.randn(*shape, generator=g) * std

    t = {"model.embed_tokens.weight": rnd(v, h, std=1.0), "lm_head.weight": rnd(v, h, std=0.5),
         "model.norm.weight": 1 + rnd(h, std=0.1)}
    for n in range(c["num_hidden_layers"]):
        p = f"model.layers.{n}"
        t.update({
            f"{p}.input_layernorm.weight": 1 + rnd(h, std=0.1), f"{p}.post_attention_layernorm.weight": 1 + rnd(h, std=0.1),
            f"{p}.self_attn.q_proj.weight": rnd(q, h, std=0.6), f"{p}.self_attn.k_proj.weight": rnd(kv, h, std=0.6),
            f"{p}.self_attn.v_proj.weight": rnd(kv, h, std=0.5), f"{p}.self_attn.o_proj.weight": rnd(h, q, std=0.5),
            f"{p}.mlp.gate_proj.weight": rnd(i, h, std=0.15), f"{p}.mlp.up_proj.weight": rnd(i, h, std=0.15),
            f"{p}.mlp.down_proj.weight": rnd(h, i, std=0.15),
        })
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: x.contiguous() for k, x in t.items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(c))
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(FIX / f, path / f)
    return path


def _rms(x, w, eps):
    return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps) * w


def _rotate(x, pos, base):
    """NeoX (half-split) rotary of x [T, H, D] at integer positions pos [T]."""
    d = x.shape[-1]
    inv = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)  # [D/2]
    ang = pos.double()[:, None] * inv[None, :]  # [T, D/2]
    cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]
    a, b = x[..., : d // 2], x[..., d // 2:]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], -1)


@torch.no_grad()
def logprobs_float64(path: Path, ids: list[int], positions: list[int] | None = None) -> torch.Tensor:
    """log_softmax of the next-token logits [T, vocab] in float64 for one sequence, all at
    once (positions default to 0..T-1; a test may pass others to measure sensitivity)."""
    c = json.loads((Path(path) / "config.json").read_text())
    w = {k: x.double() for k, x in load_file(str(Path(path) / "model.safetensors")).items()}
    hq, hk, d, eps = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"], c["rms_norm_eps"]
    pos = torch.tensor(positions if positions is not None else range(len(ids)))
    x = w["model.embed_tokens.weight"][torch.tensor(ids)]  # [T, H]
    n = len(ids)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    for layer in range(c["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        a = _rms(x, w[f"{p}.input_layernorm.weight"], eps)
        q = (a @ w[f"{p}.self_attn.q_proj.weight"].t()).view(n, hq, d)
        k = (a @ w[f"{p}.self_attn.k_proj.weight"].t()).view(n, hk, d)
        v = (a @ w[f"{p}.self_attn.v_proj.weight"].t()).view(n, hk, d)
        q, k = _rotate(q, pos, c["rope_theta"]), _rotate(k, pos, c["rope_theta"])
        k, v = k.repeat_interleave(hq // hk, 1), v.repeat_interleave(hq // hk, 1)
        s = torch.einsum("thd,shd->hts", q, k) / d**0.5
        o = torch.einsum("hts,shd->thd", s.masked_fill(~causal, float("-inf")).softmax(-1), v)
        x = x + o.reshape(n, hq * d) @ w[f"{p}.self_attn.o_proj.weight"].t()
        m = _rms(x, w[f"{p}.post_attention_layernorm.weight"], eps)
        gate, up = m @ w[f"{p}.mlp.gate_proj.weight"].t(), m @ w[f"{p}.mlp.up_proj.weight"].t()
        x = x + (torch.nn.functional.silu(gate) * up) @ w[f"{p}.mlp.down_proj.weight"].t()
    logits = _rms(x, w["model.norm.weight"], eps) @ w["lm_head.weight"].t()
    return torch.log_softmax(logits, -1)
