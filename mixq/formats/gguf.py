"""llama.cpp GGUF files: every tensor under the HF name the rest of mixq uses, kept as stored.

Names: the `gguf` package's own table (`gguf.TensorNameMap`, what llama.cpp's converter
writes) maps the HF module names of each family mixq has a model for (Llama/Mistral,
Qwen2/3, Qwen2/3-MoE, Mixtral) to GGUF names (`blk.3.attn_q.weight` <-
`model.layers.3.self_attn.q_proj.weight`); a tensor outside that table is refused.

Layouts (roles of the QuantizedWeight):
  float (F32/F16/BF16)   weight [N, K] (or [K])
  quantized (q4_0 ...)   blocks uint8 [N, K / B, T]: the file's bytes, row by row (block
                         layouts in mixq.formats.gguf_quants)
Merged expert tensors (`ffn_gate_exps` [E, I, H] ...) are exposed per expert
(`mlp.experts.{e}.gate_proj.weight`, Mixtral's `block_sparse_moe.experts.{e}.w1.weight`),
each entry reading only its expert's rows.

llama.cpp's converter permutes the rows of Llama/Mixtral q_proj and k_proj inside each head
(HF's rotary pairs dims i and i + D/2; GGML's pairs 2i and 2i + 1). Rows are independent
in every GGML type, so the permutation is undone on the stored rows at read time (still
packed): within a head, GGUF row 2j + p is HF row p * D/2 + j. Such a tensor is viewed as
[heads, D, ...] so a tensor-parallel shard is whole heads (the N unit is the head dim).
"""

from __future__ import annotations

import torch

from mixq.errors import CheckpointError, UnsupportedFormatError
from mixq.formats.base import Entry, FormatReader, Role, Shard
from mixq.formats.gguf_file import GGUFFile
from mixq.formats.gguf_quants import QUANT_TYPES, dequantize
from mixq.formats.spec import QuantizedWeight, WeightSpec, dense_spec

# HF module names per layer, by MLP kind; the embeddings, final norm and head are common.
_ATTN = ("input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
         "self_attn.v_proj", "self_attn.o_proj", "self_attn.q_norm", "self_attn.k_norm")
_DENSE_MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_QWEN_MOE = ("mlp.gate", "mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj",
             "mlp.shared_expert.down_proj", "mlp.shared_expert_gate")
# merged expert tensor (HF name gguf maps) -> per-expert HF name template
_QWEN_EXPERTS = {"mlp.experts.gate_proj": "mlp.experts.{e}.gate_proj", "mlp.experts.up_proj": "mlp.experts.{e}.up_proj",
                 "mlp.experts.down_proj": "mlp.experts.{e}.down_proj"}
_MIXTRAL_EXPERTS = {"block_sparse_moe.experts.w1": "block_sparse_moe.experts.{e}.w1",
                    "block_sparse_moe.experts.w3": "block_sparse_moe.experts.{e}.w3",
                    "block_sparse_moe.experts.w2": "block_sparse_moe.experts.{e}.w2"}
_PERMUTED = ("self_attn.q_proj", "self_attn.k_proj")  # llama.cpp's rotary row order (see top)
_BIASED = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")  # the only biases the models hold


def gguf_spec(qtype: str) -> WeightSpec:
    """The WeightSpec of a quantized GGML type: group = the block, bits nominal."""
    t = QUANT_TYPES[qtype]
    return WeightSpec(layout="gguf", bits=t.bits, dtype=torch.uint8, scale_layout="group", group_size=t.block,
                      symmetric=t.symmetric, qtype=qtype)


def _hf_names(f: GGUFFile) -> tuple[dict[str, str], dict[str, str]]:
    """(GGUF base name -> HF module name, GGUF merged-experts base name -> per-expert template)."""
    import gguf

    archname, _ = f.hf_architecture()
    arch = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[f.arch]
    layers = int(f.arch_field("block_count") or 0)
    tmap = gguf.get_tensor_name_map(arch, layers)
    mixtral = archname == "MixtralForCausalLM"
    moe = archname in ("Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM")
    per_layer = _ATTN + (("block_sparse_moe.gate",) if mixtral else _QWEN_MOE + _DENSE_MLP if moe else _DENSE_MLP)
    experts = _MIXTRAL_EXPERTS if mixtral else _QWEN_EXPERTS if moe else {}
    names, merged = {}, {}
    for hf in ("model.embed_tokens", "model.norm", "lm_head"):
        names[tmap.get_name(hf)] = hf
    for i in range(layers):
        for m in per_layer:
            g = tmap.get_name(f"model.layers.{i}.{m}")
            if g is not None:
                names[g] = f"model.layers.{i}.{m}"
        for m, per in experts.items():
            g = tmap.get_name(f"model.layers.{i}.{m}")
            if g is not None:
                merged[g] = f"model.layers.{i}.{per}"
    return names, merged


class GGUFReader(FormatReader):
    """Claims every tensor of a GGUF file (see the module docstring)."""

    layout = "gguf"

    def claim(self, f: GGUFFile, unclaimed: set[str]) -> list[Entry]:
        names, merged = _hf_names(f)
        archname, _ = f.hf_architecture()
        permute = archname in ("LlamaForCausalLM", "MixtralForCausalLM")
        heads = {"self_attn.q_proj": f.arch_field("attention.head_count"),
                 "self_attn.k_proj": f.arch_field("attention.head_count_kv") or f.arch_field("attention.head_count")}
        entries = []
        for name in sorted(unclaimed):
            base, dot, suffix = name.rpartition(".")
            if suffix not in ("weight", "bias"):
                base, suffix = name, ""
            qtype = f.qtype(name)
            info = f.info(name)
            if base in merged:
                entries += self._experts(f, name, merged[base], qtype)
                continue
            if base not in names or (suffix == "bias" and not names[base].endswith(_BIASED)):
                raise UnsupportedFormatError(
                    f"gguf {f.path}: tensor {name!r} has no counterpart in mixq's {archname} model")
            hf = f"{names[base]}.{suffix}"
            mod = names[base].rsplit(".", 2)
            n_heads = heads[f"{mod[-2]}.{mod[-1]}"] if permute and names[base].endswith(_PERMUTED) else None
            entries.append(self._entry(f, name, hf, qtype, info.shape, n_heads))
        unclaimed.clear()
        return entries

    def _entry(self, f: GGUFFile, name: str, hf: str, qtype: str, shape: tuple, n_heads: int | None) -> Entry:
        quant = qtype in QUANT_TYPES
        spec = gguf_spec(qtype) if quant else dense_spec(f.info(name).dtype)
        block = QUANT_TYPES[qtype].block if quant else 1
        logical = (shape[0], shape[1] * block) if quant else tuple(shape)
        meta = {"qtype": qtype, "gguf_name": name}
        if len(logical) > 2:
            raise CheckpointError(f"gguf {f.path}: tensor {name!r} has {len(logical)} dims where {hf} needs <= 2")
        if n_heads:
            rows = logical[0]
            if rows % (2 * n_heads):
                raise CheckpointError(f"gguf {f.path}: tensor {name!r} has {rows} rows, not a multiple of "
                                      f"2 x {n_heads} heads")
            head_dim = rows // n_heads
            f.set_view(name, (n_heads, head_dim, *shape[1:]))
            axes = ((0, 0, head_dim),) + (((1, 2, block),) if len(logical) == 2 else ())
            meta["heads"] = n_heads
        else:
            axes = tuple((d, d, block if d == 1 else 1) for d in range(len(logical)))
        role = "blocks" if quant else "weight"
        return Entry(hf, spec, logical, {role: Role(name, axes)}, f.info(name).nbytes, meta=meta)

    def _experts(self, f: GGUFFile, name: str, template: str, qtype: str) -> list[Entry]:
        shape = f.info(name).shape
        quant = qtype in QUANT_TYPES
        if len(shape) != (4 if quant else 3):
            raise CheckpointError(f"gguf {f.path}: merged experts {name!r} has shape {list(shape)}; "
                                  "expected [experts, rows, cols]")
        block = QUANT_TYPES[qtype].block if quant else 1
        spec = gguf_spec(qtype) if quant else dense_spec(f.info(name).dtype)
        n_exp, rows = shape[0], shape[1]
        logical = (rows, shape[2] * block)
        per = f.info(name).nbytes // n_exp
        roles = {("blocks" if quant else "weight"): Role(name, ((0, 1, 1), (1, 2, block)))}
        return [Entry(f"{template.format(e=e)}.weight", spec, logical, roles, per, offset=(e, 0),
                      meta={"qtype": qtype, "gguf_name": name}) for e in range(n_exp)]

    def read(self, f: GGUFFile, entry: Entry, shard: Shard | None = None) -> QuantizedWeight:
        qw = super().read(f, entry, shard)
        heads = entry.meta.get("heads")
        if heads:  # [h, D, ...] in GGML rotary order -> [h * D, ...] in HF order (see top)
            for role, t in qw.tensors.items():
                h, d = t.shape[0], t.shape[1]
                t = t.reshape(h, d // 2, 2, *t.shape[2:]).transpose(1, 2)
                qw.tensors[role] = t.reshape(h * d, *t.shape[3:]).contiguous()
        return qw

    def dequantize(self, qw: QuantizedWeight) -> torch.Tensor:
        if qw.spec.layout != "gguf":
            return qw.tensors["weight"].float()
        return dequantize(qw.tensors["blocks"], qw.spec.qtype)
