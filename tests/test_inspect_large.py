"""`mixq inspect` on a Qwen3-235B-A22B-shaped index (94 layers x 128 experts, BF16 base +
block-FP8 + GPTQ-INT4, ~260k stored tensors, ~800 GB of tensor data) built from
safetensors headers over sparse files: the plan comes from headers alone, the only data
read are norm vectors (for smoothing checks), and the per-format totals are exact."""

from __future__ import annotations

import json
import math
import time

import pytest
import yaml

from mixq.cli import main as cli_main
from mixq.formats.checkpoint import Checkpoint

# Qwen3-235B-A22B's config.json, the parts that decide tensor shapes
QWEN3_235B = {
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 4096,
    "num_hidden_layers": 94, "num_attention_heads": 64, "num_key_value_heads": 4, "head_dim": 128,
    "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 1536, "intermediate_size": 12288,
    "vocab_size": 151936, "tie_word_embeddings": False, "rms_norm_eps": 1e-6, "max_position_embeddings": 40960,
    "torch_dtype": "bfloat16",
}
ITEM = {"BF16": 2, "F16": 2, "F32": 4, "I32": 4, "F8_E4M3": 1}
SHARD_BYTES = 4 * 10**9  # per file, as real releases shard (Qwen3-235B-A22B: 118 files of ~4 GB)


def linears(cfg) -> dict[str, tuple[int, int]]:
    """Every decoder Linear's logical [N, K]."""
    h, hd, e, i = cfg["hidden_size"], cfg["head_dim"], cfg["num_experts"], cfg["moe_intermediate_size"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    out = {}
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}"
        out.update({f"{p}.self_attn.q_proj.weight": (q, h), f"{p}.self_attn.k_proj.weight": (kv, h),
                    f"{p}.self_attn.v_proj.weight": (kv, h), f"{p}.self_attn.o_proj.weight": (h, q)})
        for x in range(e):
            out.update({f"{p}.mlp.experts.{x}.gate_proj.weight": (i, h), f"{p}.mlp.experts.{x}.up_proj.weight": (i, h),
                        f"{p}.mlp.experts.{x}.down_proj.weight": (h, i)})
    return out


def others(cfg) -> dict[str, tuple[int, ...]]:
    """Tensors every checkpoint stores dense (embeddings, norms, router, head)."""
    h, v, hd = cfg["hidden_size"], cfg["vocab_size"], cfg["head_dim"]
    out = {"model.embed_tokens.weight": (v, h), "lm_head.weight": (v, h), "model.norm.weight": (h,)}
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}"
        out.update({f"{p}.input_layernorm.weight": (h,), f"{p}.post_attention_layernorm.weight": (h,),
                    f"{p}.self_attn.q_norm.weight": (hd,), f"{p}.self_attn.k_norm.weight": (hd,),
                    f"{p}.mlp.gate.weight": (cfg["num_experts"], h)})
    return out


def stored(fmt: str, name: str, shape) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The stored tensors of one Linear in a format's published layout."""
    n, k = shape
    mod = name.removesuffix(".weight")
    if fmt == "bf16":
        return {name: ("BF16", (n, k))}
    if fmt == "fp8":  # quant_method fp8, weight_block_size [128, 128] (Qwen3-*-FP8 releases)
        return {name: ("F8_E4M3", (n, k)), f"{mod}.weight_scale_inv": ("F32", (math.ceil(n / 128), math.ceil(k / 128)))}
    # GPTQ v1, 4-bit, group 128
    return {f"{mod}.qweight": ("I32", (k // 8, n)), f"{mod}.qzeros": ("I32", (k // 128, n // 8)),
            f"{mod}.scales": ("F16", (k // 128, n)), f"{mod}.g_idx": ("I32", (k,))}


def write_header_only(path, tensors: dict[str, tuple[str, tuple[int, ...]]], qc=None) -> int:
    """A checkpoint directory whose safetensors files hold real headers (the public format:
    u64 header length, JSON with dtype/shape/data_offsets) and sparse, never-written data.
    Returns the bytes of tensor data the headers describe."""
    path.mkdir(parents=True)
    cfg = dict(QWEN3_235B)
    if qc:
        cfg["quantization_config"] = qc
    (path / "config.json").write_text(json.dumps(cfg))
    shards, size = [[]], 0
    for name in sorted(tensors):
        dtype, shape = tensors[name]
        if size > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += math.prod(shape) * ITEM[dtype]
    weight_map, total = {}, 0
    for s, part in enumerate(shards):
        fname = f"model-{s + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {}, 0
        for name in part:
            dtype, shape = tensors[name]
            size = math.prod(shape) * ITEM[dtype]
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
            weight_map[name] = fname
        blob = json.dumps(header).encode()
        blob += b" " * (-len(blob) % 8)
        with open(path / fname, "wb") as f:
            f.write(len(blob).to_bytes(8, "little") + blob)
            f.truncate(8 + len(blob) + offset)  # sparse: no data block is ever written
        total += offset
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return total


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen3-235b")
    lin, rest = linears(QWEN3_235B), others(QWEN3_235B)
    dense = {n: ("BF16", s) for n, s in rest.items()}
    sizes = {}
    for fmt, qc in (("bf16", None),
                    ("fp8", {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                             "weight_block_size": [128, 128]}),
                    ("gptq", {"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True, "desc_act": False,
                              "checkpoint_format": "gptq"})):
        tensors = dict(dense)
        for name, shape in lin.items():
            tensors.update(stored(fmt, name, shape))
        sizes[fmt] = write_header_only(root / fmt, tensors, qc)
    cfg = root / "mix.yaml"
    cfg.write_text(yaml.safe_dump({"mixed_precision": {
        "fp16_path": str(root / "bf16"), "fp8_path": str(root / "fp8"), "gptq_int4_path": str(root / "gptq"),
        "weight_mapping": {"model.layers.*.mlp.experts.*.weight": "gptq_int4",
                           "model.layers.*.mlp.experts.0.*.weight": "fp8",  # the hot expert of each layer
                           "model.layers.*.self_attn.o_proj.weight": "fp8"}}}))
    return root, cfg, sizes


def test_inspect_a_235b_index_from_headers_only(index, monkeypatch, capsys):
    root, cfg, sizes = index
    assert sizes["bf16"] > 400e9  # the base really describes a 235B-parameter model in BF16
    reads = []
    real_read = Checkpoint.read

    def spy(self, name, index=None):
        t = real_read(self, name, index)
        reads.append((name, t.numel() * t.element_size()))
        return t

    monkeypatch.setattr(Checkpoint, "read", spy)
    t0 = time.perf_counter()
    assert cli_main(["inspect", "--mixed-precision-config", str(cfg), "--json"]) == 0
    seconds = time.perf_counter() - t0
    report = json.loads(capsys.readouterr().out)
    print(f"inspect of a {sizes['bf16'] / 1e9:.0f} GB BF16 index: {seconds:.1f} s")  # seen: ~15 s on 2 CPU cores

    # The only data read: RMSNorm vectors (to detect smoothing across sources), ~4 KiB each.
    assert reads and all(n.endswith("layernorm.weight") for n, _ in reads), {n for n, _ in reads} - set()
    assert sum(b for _, b in reads) < 4 * 2**20

    # Per-format totals, computed independently from the shapes and the formats' layouts.
    lin, rest = linears(QWEN3_235B), others(QWEN3_235B)

    def nbytes(fmt, name):  # a GPTQ g_idx without desc_act is checked at load, then dropped
        return sum(math.prod(s) * ITEM[d] for t, (d, s) in stored(fmt, name, lin[name]).items()
                   if not t.endswith(".g_idx"))

    want = {"bf16": sum(math.prod(s) * 2 for s in rest.values()), "fp8": 0, "int4": 0}
    for name in lin:
        if ".experts.0." in name or name.endswith("o_proj.weight"):
            want["fp8"] += nbytes("fp8", name)
        elif ".experts." in name:
            want["int4"] += nbytes("gptq", name)
        else:
            want["bf16"] += nbytes("bf16", name)
    totals = report["totals"]
    assert {k: round(v["memory_mb"] * 2**20) for k, v in totals["by_format"].items()} == want
    bf16_total = sum(math.prod(s) * 2 for s in [*lin.values(), *rest.values()])
    assert totals["compression_ratio"] == pytest.approx(bf16_total / sum(want.values()), rel=1e-12)
    assert totals["num_tensors"] == len(lin) + len(rest)
    expert = next(t for t in report["tensors"] if t["name"] == "model.layers.93.mlp.experts.127.down_proj.weight")
    assert (expert["format"], expert["bytes"], expert["source"]) == ("gptq int4 g128", nbytes("gptq", expert["name"]),
                                                                     "gptq_int4_path")
