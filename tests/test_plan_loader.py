"""Plan and loader on synthetic checkpoints: resolution across sources, every error path,
streaming only what is picked, no dense copies, and tensor-parallel shard reads."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mixq.cli import main as cli_main
from mixq.config.schema import MixedPrecisionConfig
from mixq.errors import CheckpointError, ConfigError
from mixq.formats import GPTQDequantizer, Shard, build_plan, load_weights
from mixq.formats.checkpoint import Checkpoint
from mixq.formats.registry import CheckpointCatalog
from mixq.tracking.memory import get_mixed_precision_memory_stats, register_loaded_weights
from tests.ckpt_utils import (
    dense_tensors,
    linear_shapes,
    llama_config,
    quantize_checkpoint,
    write_checkpoint,
)
from tests.header_bytes import module_bytes

CFG = llama_config(hidden=64, inter=128, layers=2)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    dense = dense_tensors(CFG)
    write_checkpoint(root / "bf16", dense, CFG, shards=3)
    for name, fmt, kw in [("gptq", "gptq", {"act_order": True, "group": 32}),
                          ("gptq_sym", "gptq", {"group": 32}),
                          ("awq", "awq", {"group": 32}),
                          ("fp8", "ct-fp8", {})]:
        tensors, qc = quantize_checkpoint(dense, fmt, **kw)
        write_checkpoint(root / name, tensors, CFG, qc)
    return root, dense


def config(root, mapping, **paths):
    mp = {"fp16_path": str(root / "bf16"), **{k: str(root / v) for k, v in paths.items()}, "weight_mapping": mapping}
    return MixedPrecisionConfig.from_dict({"mixed_precision": mp}, source="test.yaml")


MAPPING = {
    "model.layers.*.self_attn.*_proj.weight": "fp8",
    "model.layers.*.mlp.gate_proj.weight": "gptq_int4",
    "model.layers.*.mlp.up_proj.weight": "gptq_int4",
    "model.layers.1.mlp.down_proj.weight": "awq_int4",
    "model.layers.1.mlp.up_proj.weight": "awq_int4",  # AWQ smooths up -> down: kept together
    "model.layers.0.self_attn.v_proj.weight": "bf16",
}


def test_plan_resolves_sources_and_specs(ckpts):
    root, dense = ckpts
    plan = build_plan(config(root, MAPPING, fp8_path="fp8", gptq_int4_path="gptq", awq_int4_path="awq"))
    assert list(plan.tensors)[0] == "model.embed_tokens.weight" and list(plan.tensors)[-1] == "lm_head.weight"
    assert set(plan.tensors) == set(dense)
    t = plan.tensors
    assert t["model.layers.0.self_attn.q_proj.weight"].spec.layout == "fp8"
    assert t["model.layers.0.self_attn.v_proj.weight"].spec.layout == "dense"
    assert t["model.layers.0.self_attn.v_proj.weight"].rule == "model.layers.0.self_attn.v_proj.weight"
    gate = t["model.layers.1.mlp.gate_proj.weight"]
    assert (gate.spec.layout, gate.spec.bits, gate.spec.group_size, gate.spec.act_order) == ("gptq", 4, 32, True)
    assert gate.file.endswith("gptq/model.safetensors") and gate.path_key == "gptq_int4_path"
    assert t["model.layers.1.mlp.down_proj.weight"].spec.layout == "awq"
    assert t["model.layers.0.mlp.down_proj.weight"].spec.layout == "dense"
    assert t["model.layers.0.mlp.down_proj.weight"].file.endswith(".safetensors")
    # q/k are fp8 but v is bf16 in layer 0: it cannot be fused, and inspect says so
    assert not plan.fusable([f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkv"])
    assert plan.fusable([f"model.layers.1.self_attn.{p}_proj.weight" for p in "qkv"])
    assert any("model.layers.0.self_attn" in w and "separate projections" in w for w in plan.warnings)
    assert not any("model.layers.1.self_attn" in w for w in plan.warnings)


def test_loader_keeps_weights_compressed_and_reads_only_picked_tensors(ckpts, monkeypatch):
    root, dense = ckpts
    plan = build_plan(config(root, MAPPING, fp8_path="fp8", gptq_int4_path="gptq", awq_int4_path="awq"))
    reads = []
    orig = Checkpoint.read

    def spy(self, name, index=None):
        reads.append((self.path.name, name, index))
        return orig(self, name, index)

    monkeypatch.setattr(Checkpoint, "read", spy)
    weights = load_weights(plan, select=lambda n: ".layers.1." in n)
    assert set(weights) == {n for n in dense if ".layers.1." in n}
    assert all(".layers.1." in name for _, name, _ in reads)
    # each source read only the tensors its planned entries own
    assert {(src, n) for src, n, _ in reads if src == "gptq"} == {
        ("gptq", f"model.layers.1.mlp.gate_proj.{r}") for r in ("qweight", "qzeros", "scales", "g_idx")}
    for name, w in weights.items():
        planned = plan.tensors[name]
        assert w.nbytes == planned.nbytes, name  # exactly the stored bytes, no dense copy
        stored = {t.dtype for t in w.tensors.values()}
        if w.spec.layout in ("gptq", "awq"):
            assert stored <= {torch.int32, torch.float16}
            assert w.nbytes < dense[name].numel() * 2 * 0.4
        elif w.spec.layout == "fp8":
            assert w.tensors["weight"].dtype == torch.float8_e4m3fn
        else:
            assert torch.equal(w.tensors["weight"], dense[name])


@pytest.mark.parametrize("src", ["gptq", "gptq_sym", "awq", "fp8"])
def test_dequantized_weights_are_close_to_the_originals(ckpts, src):
    """Each synthetic writer rounds to nearest: error <= half a quantization step."""
    root, dense = ckpts
    cat = CheckpointCatalog(root / src)
    for name in linear_shapes(CFG):
        w = cat.read(name)
        ref = dense[name].float()
        got = w.dequantize()
        assert got.shape == ref.shape
        if src == "fp8":
            tol = ref.abs().amax(1, keepdim=True) * 2**-4  # e4m3: 3 mantissa bits
        else:
            tol = (ref.abs().amax() / 7) * 0.5 + 1e-3  # int4 step is <= range/15 per group
        assert ((got - ref).abs() <= tol).all(), name


@pytest.mark.parametrize("src", ["bf16", "gptq", "gptq_sym", "awq", "fp8"])
@pytest.mark.parametrize("dim,world", [(0, 2), (1, 2), (0, 4)])
def test_shard_reads_equal_slices_of_the_full_weight(ckpts, src, dim, world):
    root, _ = ckpts
    cat = CheckpointCatalog(root / src)
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        full = cat.read(name).dequantize()
        parts = []
        for rank in range(world):
            w = cat.read(name, Shard(dim, rank, world))
            assert w.nbytes < cat.entry(name).nbytes
            parts.append(w.dequantize())
        torch.testing.assert_close(torch.cat(parts, dim=dim), full, rtol=0, atol=0)


def test_shard_that_breaks_a_group_is_refused(ckpts):
    root, _ = ckpts
    cat = CheckpointCatalog(root / "awq")  # group 32 along K=64: 4 shards of 16 split groups
    with pytest.raises(CheckpointError, match="q_proj.weight: shard of 16 along dim 1 is not a multiple of 32"):
        cat.read("model.layers.0.self_attn.q_proj.weight", Shard(1, 0, 4))


def test_plan_errors_name_key_tensor_and_file(ckpts, tmp_path):
    root, dense = ckpts
    # a tensor absent from the source checkpoint
    tensors, qc = quantize_checkpoint(dense, "ct-fp8")
    for k in [k for k in tensors if k.startswith("model.layers.1.self_attn.o_proj")]:
        del tensors[k]
    write_checkpoint(tmp_path / "fp8_missing", tensors, CFG, qc)
    with pytest.raises(CheckpointError) as e:
        build_plan(config(root, MAPPING, fp8_path=str(tmp_path / "fp8_missing"), gptq_int4_path="gptq",
                          awq_int4_path="awq"))
    msg = str(e.value)
    assert "weight_mapping['model.layers.*.self_attn.*_proj.weight']" in msg
    assert "'model.layers.1.self_attn.o_proj.weight'" in msg and "fp8_missing" in msg

    # shapes that differ between sources
    other = llama_config(hidden=64, inter=96, layers=2)
    tensors, qc = quantize_checkpoint(dense_tensors(other), "ct-fp8")
    write_checkpoint(tmp_path / "fp8_other", tensors, other, qc)
    with pytest.raises(CheckpointError, match=r"'model.layers.0.mlp.gate_proj.weight' has shape \[96, 64\] in .*fp8_other.* but \[128, 64\] in the base"):
        build_plan(config(root, {"model.layers.0.mlp.gate_proj.weight": "fp8"}, fp8_path=str(tmp_path / "fp8_other")))

    # a path holding the wrong format for the precision
    with pytest.raises(CheckpointError, match=r"mapped to gptq_int4 but .*awq/model.safetensors stores it as awq int4 g32 asym"):
        build_plan(config(root, {"model.layers.0.mlp.gate_proj.weight": "gptq_int4"}, int4_path="awq"))

    # a quantized base
    cfg = MixedPrecisionConfig.from_dict({"mixed_precision": {"fp16_path": str(root / "gptq")}})
    with pytest.raises(ConfigError, match="fp16_path .*gptq is a quantized checkpoint .*'gptq'"):
        build_plan(cfg)

    # an unreadable / broken checkpoint directory
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"mixed_precision.fp8_path: checkpoint .*broken: no \*.safetensors files"):
        build_plan(config(root, {"model.layers.0.mlp.gate_proj.weight": "fp8"}, fp8_path=str(tmp_path / "broken")))


def test_unsupported_quant_method_is_refused(ckpts, tmp_path):
    _, dense = ckpts
    write_checkpoint(tmp_path / "bnb", dense, CFG, {"quant_method": "bitsandbytes"})
    with pytest.raises(CheckpointError, match="quant_method 'bitsandbytes' is not supported; supported: compressed-tensors, gptq, awq, fp8"):
        CheckpointCatalog(tmp_path / "bnb")


def test_memory_stats_and_inspect_totals(ckpts, capsys):
    root, dense = ckpts
    cfg = config(root, MAPPING, fp8_path="fp8", gptq_int4_path="gptq", awq_int4_path="awq")
    weights = load_weights(build_plan(cfg))
    register_loaded_weights(weights)
    stats = get_mixed_precision_memory_stats()
    register_loaded_weights(None)
    # computed independently: bytes of what each file's safetensors headers give the tensors
    # MAPPING picks, resolved by hand (exact names beat patterns; act-order GPTQ keeps g_idx)
    def source(name):
        if name == "model.layers.0.self_attn.v_proj.weight" or not name.endswith("_proj.weight"):
            return "bf16", "bf16"
        if ".self_attn." in name:
            return "fp8", "fp8"
        if name in ("model.layers.1.mlp.up_proj.weight", "model.layers.1.mlp.down_proj.weight"):
            return "int4", "awq"
        return ("int4", "gptq") if "gate_proj" in name or "up_proj" in name else ("bf16", "bf16")

    by_family = {}
    for name in dense:
        fam, ckpt = source(name)
        by_family[fam] = by_family.get(fam, 0) + module_bytes(root / ckpt, name)
    bf16 = sum(t.numel() * 2 for t in dense.values())
    held = sum(by_family.values())
    assert stats["memory_saved_mb"] == pytest.approx((bf16 - held) / 2**20)
    assert stats["compression_ratio"] == pytest.approx(bf16 / held)
    assert {k: round(v["memory_mb"] * 2**20) for k, v in stats["by_format"].items()} == by_family
    assert set(stats["by_layer"]) == {"embed", "0", "1", "other", "lm_head"}

    # inspect predicts the same totals from headers alone
    yaml_path = root / "mix.yaml"
    mp = cfg.mixed_precision
    yaml_path.write_text(json.dumps({"mixed_precision": {**mp.paths(), "weight_mapping": mp.weight_mapping}}))
    assert cli_main(["inspect", "--mixed-precision-config", str(yaml_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {k: round(v["memory_mb"] * 2**20) for k, v in report["totals"]["by_format"].items()} == by_family
    assert report["totals"]["compression_ratio"] == pytest.approx(bf16 / held)
    assert cli_main(["inspect", "--mixed-precision-config", str(yaml_path)]) == 0
    text = capsys.readouterr().out
    assert "[layer 1]" in text and "gptq int4 g32 act-order" in text and "separate projections" in text
    assert f"{held / 1024:.2f} KiB" in text


def test_inspect_reports_errors_in_one_line(ckpts, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("mixed_precision: {fp16_path: /nonexistent}\n")
    assert cli_main(["inspect", "--mixed-precision-config", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "fp16_path: '/nonexistent' is not a directory" in err


def test_gptq_dequantizer_seed_example():
    """MISSION.md: qweight [256,768], qzeros [16,96], scales [16,768] -> weight [768, 2048]."""
    g = torch.Generator().manual_seed(1)
    q = torch.randint(0, 16, (2048, 768), generator=g, dtype=torch.int32)
    z = torch.randint(0, 16, (16, 768), generator=g, dtype=torch.int32)
    s = torch.rand(16, 768, generator=g).half() + 0.01
    from mixq.formats.packing import pack_int32

    qweight, qzeros = pack_int32(q, 4, dim=0), pack_int32(z - 1 + 1, 4, dim=1)
    assert qweight.shape == (256, 768) and qzeros.shape == (16, 96)
    w = GPTQDequantizer.dequantize_gptq_weight(qweight, qzeros, s, bits=4, group_size=128, zero_offset=0)
    assert w.shape == (768, 2048) and w.dtype == torch.float16
    ref = ((q.double() - z.double().repeat_interleave(128, 0)) * s.double().repeat_interleave(128, 0)).t()
    torch.testing.assert_close(w.double(), ref, rtol=1e-3, atol=0)  # fp16 output rounding
    # v1 convention (default): stored zeros are one less than the real ones
    w1 = GPTQDequantizer.dequantize_gptq_weight(qweight, pack_int32((z - 1).clamp(min=0), 4, dim=1), s)
    mask = (z > 0).repeat_interleave(128, 0).t()
    torch.testing.assert_close(w1.double()[mask], ref[mask], rtol=1e-3, atol=0)
    with pytest.raises(ValueError, match=r"scales shape is \(16, 767\), expected \(16, 768\)"):
        GPTQDequantizer.dequantize_gptq_weight(qweight, qzeros, s[:, :767])


def test_fused_expert_tensors_are_exposed_per_expert(tmp_path):
    g = torch.Generator().manual_seed(3)
    e, inter, hidden = 3, 8, 16
    gate_up = torch.randn(e, 2 * inter, hidden, generator=g).bfloat16()
    down = torch.randn(e, hidden, inter, generator=g).bfloat16()
    prefix = "model.layers.0.mlp.experts"
    write_checkpoint(tmp_path / "fused", {f"{prefix}.gate_up_proj": gate_up, f"{prefix}.down_proj": down},
                     {"hidden_size": hidden})
    cat = CheckpointCatalog(tmp_path / "fused")
    assert len(cat.entries) == 3 * e
    for i in range(e):
        assert torch.equal(cat.read(f"{prefix}.{i}.gate_proj.weight").tensors["weight"], gate_up[i, :inter])
        assert torch.equal(cat.read(f"{prefix}.{i}.up_proj.weight").tensors["weight"], gate_up[i, inter:])
        assert torch.equal(cat.read(f"{prefix}.{i}.down_proj.weight").tensors["weight"], down[i])
        sh = cat.read(f"{prefix}.{i}.up_proj.weight", Shard(0, 1, 2)).tensors["weight"]
        assert torch.equal(sh, gate_up[i, inter + inter // 2:])
    assert cat.entry(f"{prefix}.1.up_proj.weight").nbytes == inter * hidden * 2
    assert math.prod(cat.entry(f"{prefix}.2.down_proj.weight").shape) == hidden * inter
