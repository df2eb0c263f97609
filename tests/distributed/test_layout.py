"""The parallel layout without processes: SGLang's flag semantics, refusals before anything
is loaded (no process started, no weight read), the per-rank byte prediction against what
the loader actually reads for each rank, and `mixq inspect --tp-size/--ep-size`."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest
import torch

from mixq.cli import main as cli_main
from mixq.config.schema import MixedPrecisionConfig
from mixq.distributed.config import ParallelConfig
from mixq.distributed.layout import ShardLayout, style_of
from mixq.engine.engine import LLM
from mixq.errors import ConfigError
from mixq.formats import build_plan, iter_weights
from mixq.models.config import ModelConfig
from mixq.server.args import ServerArgs

HERE = Path(__file__).parent
FIX = HERE.parent / "fixtures"


def plan_of(cfg: str):
    return build_plan(MixedPrecisionConfig.from_yaml(str(HERE / cfg)))


def test_parallel_config_refusals_name_the_flags():
    with pytest.raises(ConfigError, match="--ep-size 3 must divide --tp-size 4"):
        ParallelConfig(tp_size=4, ep_size=3)
    with pytest.raises(ConfigError, match="--nnodes > 1 needs --dist-init-addr"):
        ParallelConfig(tp_size=2, nnodes=2)
    with pytest.raises(ConfigError, match="--node-rank 2 must be in"):
        ParallelConfig(tp_size=2, nnodes=2, node_rank=2, dist_init_addr="127.0.0.1:1234")
    with pytest.raises(ConfigError, match="--tp-size 3 must divide evenly over --nnodes 2"):
        ParallelConfig(tp_size=3, nnodes=2, dist_init_addr="127.0.0.1:1234")
    with pytest.raises(ConfigError, match="HOST:PORT"):
        ParallelConfig(tp_size=2, dist_init_addr="localhost")
    with pytest.raises(ConfigError, match="all-to-all MoE dispatch needs --ep-size equal to --tp-size"):
        ParallelConfig(tp_size=4, ep_size=2, moe_dispatch="all-to-all")
    pc = ParallelConfig(tp_size=4, nnodes=2, node_rank=1, dist_init_addr="10.0.0.1:5000", base_gpu_id=0)
    assert list(pc.node_ranks()) == [2, 3] and pc.device_for(3, "cuda") == torch.device("cuda", 1)


def test_server_args_follow_sglang():
    a = ServerArgs(tp_size=4, enable_ep_moe=True, device="cpu")
    a.validate()
    assert a.ep_size == 4  # --enable-ep-moe: experts over the whole TP group
    b = ServerArgs(tp_size=4, ep_size=2, device="cpu")
    b.validate()
    assert b.enable_ep_moe and b.ep_size == 2
    with pytest.raises(ConfigError, match="--ep-size 3 must divide --tp-size 4"):
        ServerArgs(tp_size=4, ep_size=3, device="cpu").validate()
    with pytest.raises(ConfigError, match="--tp-size 4 x --dp-size 2 needs 8 GPUs per node but 4 are present"):
        ServerArgs(tp_size=4, dp_size=2).validate(gpu_count=4)  # more ranks than GPUs
    with pytest.raises(ConfigError, match="--dp-size > 1 with --nnodes > 1"):
        ServerArgs(tp_size=2, dp_size=2, nnodes=2, dist_init_addr="127.0.0.1:5000", device="cpu").validate()


@pytest.mark.parametrize("kw,match", [
    (dict(model_path=FIX / "tiny-llama" / "bf16", tp_size=3), "--tp-size 3 does not divide the 4 attention heads"),
    (dict(model_path=FIX / "tiny-llama" / "bf16", tp_size=8), "--tp-size 8 does not divide the 4 attention heads"),
    # AWQ group 64 along o_proj's K=128: 4 shards of 32 would split groups
    (dict(model_path=FIX / "tiny-llama" / "awq-gemm", tp_size=4),
     r"--tp-size 4: model\.layers\.0\.self_attn\.o_proj\.weight: shard of 32 along dim 1 is not a multiple of 64"),
    # the EP mix's int4 experts (group 64) cannot be split over 2 ranks (K = 64)
    (dict(mixed_precision_config=HERE / "mix-qwen3-moe-ep.yaml", tp_size=4, ep_size=2),
     r"model\.layers\.0\.mlp\.experts\.0\.down_proj\.weight: shard of 32 along dim 1 is not a multiple of 64"),
])
def test_bad_layouts_fail_before_any_process_or_weight(kw, match, monkeypatch):
    import mixq.distributed.workers as workers

    def refuse(*a, **k):
        raise AssertionError("a rank process was started or a weight loaded for a bad layout")

    monkeypatch.setattr(workers, "_spawn", refuse)
    monkeypatch.setattr(workers, "load_rank", refuse)
    kw = {k: str(v) if isinstance(v, Path) else v for k, v in kw.items()}
    with pytest.raises(ConfigError, match=match):
        LLM(device="cpu", **kw)
    assert multiprocessing.active_children() == []


def test_experts_that_do_not_divide_and_unknown_tensors_are_refused():
    cfg = json.loads((FIX / "tiny-qwen3-moe" / "bf16" / "config.json").read_text())
    layout = ShardLayout(ModelConfig.from_hf({**cfg, "num_local_experts": 6}), ParallelConfig(tp_size=4, ep_size=4))
    with pytest.raises(ConfigError, match=r"--ep-size 4 does not divide the 6 experts .*mlp\.experts"):
        layout.check_model()
    with pytest.raises(ConfigError, match="no rule for tensor 'model.layers.0.mlp.mystery.weight'"):
        style_of("model.layers.0.mlp.mystery.weight", 2)


def test_more_ranks_than_gpus_is_refused_before_loading(monkeypatch):
    import mixq.distributed.workers as workers

    monkeypatch.setattr(workers, "_spawn", lambda *a, **k: pytest.fail("spawned"))
    tp = 2 if torch.cuda.device_count() < 2 else torch.cuda.device_count() * 2
    with pytest.raises(ConfigError, match=f"--tp-size {tp} over --nnodes 1 needs {tp} GPUs"):
        LLM(model_path=str(FIX / "tiny-llama" / "bf16"), device="cuda", tp_size=tp)


@pytest.mark.parametrize("cfg,tp,ep", [("mix-llama.yaml", 2, 1), ("mix-llama.yaml", 4, 1),
                                       ("mix-qwen3-moe-ep.yaml", 2, 2), ("mix-qwen3-moe-tp.yaml", 4, 2)])
def test_predicted_rank_bytes_are_what_each_rank_reads(cfg, tp, ep):
    """The header-only prediction equals the bytes the loader returns for each rank, every
    rank reads a part of every tensor it holds, and the parts cover the model once
    (plus the replicated norms, routers and, at TP=4, the 2 KV heads)."""
    plan = plan_of(cfg)
    layout = ShardLayout(ModelConfig.from_hf(plan.model_config), ParallelConfig(tp, ep))
    predicted = layout.rank_bytes(plan)
    total = sum(t.nbytes for t in plan.tensors.values()) + 4 * sum(s.numel() for s in plan.input_scales.values())
    read = []
    for r in range(tp):
        place = layout.placements(plan, r)
        weights = list(iter_weights(plan, select=lambda n, p=place: p[n].held, shard_for=lambda n, p=place: p[n].shard))
        read.append(sum(w.nbytes for w in weights))
        for w in weights:  # a sharded tensor is read as its slice, never whole
            if place[w.name].shard is not None:
                assert w.nbytes < plan.tensors[w.name].nbytes, w.name
    assert read == [p["bytes"] for p in predicted]
    assert total <= sum(read) <= 1.3 * total
    assert max(read) <= 1.5 * total / tp


def test_inspect_predicts_per_rank_memory(capsys):
    cfg = str(HERE / "mix-qwen3-moe-ep.yaml")
    assert cli_main(["inspect", "--mixed-precision-config", cfg, "--tp-size", "2", "--ep-size", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    plan = plan_of("mix-qwen3-moe-ep.yaml")
    layout = ShardLayout(ModelConfig.from_hf(plan.model_config), ParallelConfig(2, 2))
    # the prediction (headers only) against the bytes the loader reads for each rank, per format
    for r, predicted in enumerate(report["ranks"]):
        place = layout.placements(plan, r)
        by_format = {}
        for w in iter_weights(plan, select=lambda n, p=place: p[n].held, shard_for=lambda n, p=place: p[n].shard):
            by_format[w.spec.family] = by_format.get(w.spec.family, 0) + w.nbytes
        assert (predicted["rank"], predicted["by_format"], predicted["bytes"]) == (r, by_format, sum(by_format.values()))
    assert [r["experts"] for r in report["ranks"]] == [[0, 1], [2, 3]]  # 4 experts over EP 2
    assert cli_main(["inspect", "--mixed-precision-config", cfg, "--tp-size", "2", "--ep-size", "2"]) == 0
    text = capsys.readouterr().out
    assert "weights per rank (predicted from headers)" in text and "experts 2-3" in text
    assert cli_main(["inspect", "--model-path", str(FIX / "tiny-llama" / "awq-gemm"), "--tp-size", "4"]) == 2
    assert "o_proj.weight: shard of 32 along dim 1 is not a multiple of 64" in capsys.readouterr().err
