"""Check an act-order export against compressed-tensors 0.18 (SGLang 0.5.23's pin).

compressed-tensors 0.19 removed actorder "group" (weight_g_idx), so the library the tests
use cannot decompress act-order exports. Run this with 0.18 on the path:

    pip install --no-deps --target /tmp/ct018 compressed-tensors==0.18.0
    PYTHONPATH=/tmp/ct018:. python scripts/export/act_order_ct018.py /tmp/act-order-export

It exports the GPTQModel desc_act fixture and asserts that compressed-tensors' own
decompression of every weight equals mixq's dequantization of the GPTQ source.
"""

from __future__ import annotations

import shutil
import sys

import compressed_tensors
import torch
from compressed_tensors.compressors.base import BaseCompressor
from compressed_tensors.quantization import QuantizationScheme

from mixq.formats import CheckpointCatalog
from tests.test_export_roundtrip import FIX, export, single_source_config


def main(out: str) -> int:
    shutil.rmtree(out, ignore_errors=True)
    export(single_source_config("tiny-llama", "gptq-legacy-4bit-desc-act"), out)
    back = CheckpointCatalog(out)
    src = CheckpointCatalog(FIX / "tiny-llama" / "gptq-legacy-4bit-desc-act")
    groups = back.ckpt.quantization_config["config_groups"].values()
    checked = 0
    for name, entry in back.entries.items():
        if not entry.spec.is_quantized:
            continue
        mod = name.removesuffix(".weight")
        group = next(g for g in groups if mod in g["targets"])
        local = {t.removeprefix(mod + "."): back.ckpt.read(t) for t in back.ckpt.tensors if t.startswith(mod + ".")}
        theirs = BaseCompressor.get_value_from_registry(group["format"]).decompress(
            local, QuantizationScheme.model_validate(group))["weight"]
        ours = src.read(name).dequantize()
        assert "weight_g_idx" in local and torch.equal(ours.to(theirs.dtype), theirs), name
        checked += 1
    print(f"compressed-tensors {compressed_tensors.__version__}: {checked} act-order weights decompress "
          "exactly to mixq's dequantization of the GPTQ source")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/act-order-export"))
