"""Write GGUF files from HF-named tensors the way llama.cpp's converter does, with the gguf
package's writer and quantizers (tests only).

Names go through gguf's TensorNameMap, Llama/Mixtral q/k rows are permuted into GGML's
rotary order (convert_hf_to_gguf.py's `permute`), per-expert tensors are stacked into
`ffn_*_exps`, and a byte-level "gpt2" vocabulary (one token per byte, one merge) is
written so transformers and llama.cpp can build the tokenizer from the file.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

gguf = __import__("pytest").importorskip("gguf")

_ARCH = {"LlamaForCausalLM": "llama", "MixtralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
         "Qwen3ForCausalLM": "qwen3", "Qwen2MoeForCausalLM": "qwen2moe", "Qwen3MoeForCausalLM": "qwen3moe"}
_EXPERT = re.compile(r"^(model\.layers\.\d+\.)(mlp\.experts|block_sparse_moe\.experts)\.(\d+)\.(\w+)\.weight$")


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter: HF rotary halves -> interleaved pairs, per head (rows)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def random_kquant_blocks(qtype: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 bytes of random K-quant blocks with fp16 scales in range (gguf-py has no
    K-quant quantizer; random bits exercise every field)."""
    block, nbytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype.upper()]]
    raw = rng.integers(0, 256, (rows, cols // block, nbytes), dtype=np.uint8)
    for pos in {"q4_k": (0, 2), "q5_k": (0, 2), "q6_k": (208,)}[qtype]:
        d = (rng.random(raw.shape[:2]) * 2e-3 + 1e-4).astype(np.float16)
        raw[..., pos:pos + 2] = d.view(np.uint8).reshape(*raw.shape[:2], 2)
    return raw.reshape(rows, -1)


def encode(arr: np.ndarray, qtype: str, rng: np.random.Generator) -> tuple[np.ndarray, object]:
    """(bytes or floats to write, GGMLQuantizationType) for a float32 array."""
    qt = gguf.GGMLQuantizationType[qtype.upper()]
    if qtype == "f32":
        return arr.astype(np.float32), qt
    if qtype == "f16":
        return arr.astype(np.float16), qt
    if qtype in ("q4_k", "q5_k", "q6_k"):
        lead = arr.shape[:-1]
        raw = random_kquant_blocks(qtype, int(np.prod(lead)), arr.shape[-1], rng)
        return raw.reshape(*lead, -1), qt
    return gguf.quants.quantize(arr.astype(np.float32), qt), qt


def write_gguf(path: Path, cfg: dict, tensors: dict[str, torch.Tensor], types=None, arch: str | None = None,
               skip: tuple[str, ...] = (), seed: int = 0) -> Path:
    """Write `tensors` (HF names) of a model with HF config `cfg` as a GGUF at `path`.

    types(hf_name, ndim) -> "f32" | "f16" | "bf16" | "q4_0" | ... (default: 1-D f32, else q8_0).
    arch overrides the GGUF architecture (bad-input tests)."""
    types = types or (lambda name, ndim: "f32" if ndim == 1 else "q8_0")
    rng = np.random.default_rng(seed)
    archname = cfg["architectures"][0]
    arch = arch or _ARCH[archname]
    layers = cfg["num_hidden_layers"]
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    experts = cfg.get("num_local_experts") or cfg.get("num_experts") or 0
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(layers)
    w.add_context_length(cfg.get("max_position_embeddings", 512))
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg.get("intermediate_size", 0))
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_dimension_count(head_dim)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_freq_base(float((cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta", 1e4))))
    w.add_layer_norm_rms_eps(cfg.get("rms_norm_eps", 1e-6))
    w.add_vocab_size(cfg["vocab_size"])
    if experts:
        w.add_expert_count(experts)
        w.add_expert_used_count(cfg["num_experts_per_tok"])
        if "moe_intermediate_size" in cfg:
            w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
        if cfg.get("shared_expert_intermediate_size"):
            w.add_expert_shared_feed_forward_length(cfg["shared_expert_intermediate_size"])
    # a byte-level BPE: one token per byte, but the last, which is the one merge "x y" -> "xy"
    # (llama.cpp refuses a BPE vocabulary without merges)
    byte_chars = list(gguf.vocab.bytes_to_unicode().values())
    tokens = (byte_chars[:255] + ["xy"] + [f"<extra_{i}>" for i in range(cfg["vocab_size"])])[: cfg["vocab_size"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.NORMAL] * len(tokens))
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_merges(["x y"])
    w.add_bos_token_id(cfg.get("bos_token_id", 1))
    w.add_eos_token_id(cfg.get("eos_token_id", 2))

    tmap = gguf.get_tensor_name_map({v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[_ARCH[archname]], layers)
    merged: dict[str, dict[int, np.ndarray]] = {}
    for name, t in tensors.items():
        if name in skip:
            continue
        arr = t.float().numpy()
        m = _EXPERT.match(name)
        if m:
            layer, kind, e, proj = m.groups()
            merged_hf = f"{layer}{kind}.{proj}"  # the name gguf maps to ffn_*_exps
            merged.setdefault(merged_hf, {})[int(e)] = arr
            continue
        base, _, suffix = name.rpartition(".")
        gname = tmap.get_name(base)
        assert gname is not None, name
        if _ARCH[archname] == "llama" and base.endswith(("self_attn.q_proj", "self_attn.k_proj")):
            arr = permute(arr, heads if base.endswith("q_proj") else kv)
        data, qt = encode(arr, types(name, arr.ndim), rng)
        w.add_tensor(f"{gname}.{suffix}", data, raw_dtype=qt)
    for base, per in merged.items():
        arr = np.stack([per[e] for e in sorted(per)])
        data, qt = encode(arr, types(base + ".weight", 3), rng)
        w.add_tensor(f"{tmap.get_name(base)}.weight", data, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def gguf_state_dict(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF file dequantized by gguf itself (float32), by GGUF name."""
    r = gguf.GGUFReader(str(path))
    return {t.name: gguf.quants.dequantize(t.data, t.tensor_type) for t in r.tensors}
