"""Tensor-parallel shard reads of every real checkpoint format (tests/fixtures, made by
llm-compressor and GPTQModel): the shards of a weight, dequantized and concatenated, equal
the dequantized whole weight bit for bit; their predicted bytes (headers only) equal the
bytes read; a split that would break a packing unit, group or scale block is refused
naming the tensor."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mixq.errors import CheckpointError
from mixq.formats import Shard
from mixq.formats.base import check_shard
from mixq.formats.registry import CheckpointCatalog

FIX = Path(__file__).parents[1] / "fixtures"
SOURCES = sorted(str(p.relative_to(FIX)) for p in FIX.glob("*/*") if (p / "config.json").is_file())


@pytest.mark.parametrize("src", SOURCES)
def test_every_format_shards_exactly_along_n_and_k(src):
    cat = CheckpointCatalog(FIX / src)
    linears = [n for n, e in cat.entries.items() if len(e.shape) == 2 and ".layers.0." in n or n == "lm_head.weight"]
    for name in linears:
        entry = cat.entry(name)
        full = cat.read(name).dequantize()
        for dim in (0, 1):
            for world in (2, 4):
                try:
                    check_shard(entry, Shard(dim, 0, world))
                except CheckpointError as e:
                    assert name in str(e)  # the error names the tensor
                    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
                        cat.read(name, Shard(dim, world - 1, world))
                    # refused only where a part breaks a group along K or a 128x128 FP8 block
                    spec = entry.spec
                    group_broken = dim == 1 and spec.group_size and entry.shape[1] // world < spec.group_size
                    assert group_broken or spec.block_size == (128, 128), (name, dim, world)
                    continue
                parts = []
                for rank in range(world):
                    shard = Shard(dim, rank, world)
                    qw = cat.read(name, shard)
                    assert qw.nbytes == cat.nbytes(name, shard)  # the header-only prediction
                    parts.append(qw.dequantize())
                torch.testing.assert_close(torch.cat(parts, dim), full, rtol=0, atol=0, msg=f"{name} {dim} {world}")


def test_act_order_row_parallel_keeps_the_whole_scale_table():
    """GPTQ desc_act split along K: each rank's g_idx points anywhere in the scale table,
    so scales and zeros stay whole while qweight and g_idx are sliced."""
    cat = CheckpointCatalog(FIX / "tiny-llama" / "gptq-legacy-4bit-desc-act")
    name = "model.layers.0.mlp.down_proj.weight"  # K = 256, group 32: 8 groups
    full = cat.read(name)
    for rank in range(4):
        qw = cat.read(name, Shard(1, rank, 4))
        assert qw.tensors["scales"].shape == full.tensors["scales"].shape  # [8, 128]: whole
        assert qw.tensors["qzeros"].shape == full.tensors["qzeros"].shape
        assert qw.tensors["qweight"].shape == (full.tensors["qweight"].shape[0] // 4, 128)
        g = qw.tensors["g_idx"]
        assert torch.equal(g, full.tensors["g_idx"][rank * 64 : (rank + 1) * 64])
        assert len(g.unique()) > 2  # act order: a K slice touches groups all over the table


def test_fp8_block_scales_shard_with_their_blocks(tmp_path):
    """A 32x32-block FP8 weight split in 2 along N and K: each shard holds exactly its
    blocks' scales, and a split inside a block is refused."""
    from mixq.formats import writers
    from tests.ckpt_utils import write_checkpoint

    w = torch.randn(128, 64) * 0.1
    tensors = writers.fp8_tensors("model.layers.0.mlp.down_proj", w, scheme="block", block=(32, 32))
    qc = writers.fp8_config("block")
    qc["config_groups"]["group_0"]["weights"]["block_structure"] = [32, 32]
    write_checkpoint(tmp_path, tensors, {"architectures": ["LlamaForCausalLM"]}, qc)
    cat = CheckpointCatalog(tmp_path)
    name = "model.layers.0.mlp.down_proj.weight"
    full = cat.read(name)
    assert full.spec.block_size == (32, 32) and full.tensors["weight_scale"].shape == (4, 2)
    for dim in (0, 1):
        parts = [cat.read(name, Shard(dim, r, 2)) for r in range(2)]
        scales = torch.cat([p.tensors["weight_scale"] for p in parts], dim)
        assert torch.equal(scales, full.tensors["weight_scale"])
        torch.testing.assert_close(torch.cat([p.dequantize() for p in parts], dim), full.dequantize(), rtol=0, atol=0)
    with pytest.raises(CheckpointError, match="down_proj.weight: shard of 16 along dim 1 is not a multiple of 32"):
        cat.read(name, Shard(1, 0, 4))
