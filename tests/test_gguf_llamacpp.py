"""K-quant files written by llama.cpp's own quantizer (tests/fixtures/gguf, made by
scripts/fixtures/make_gguf_fixtures.py): bit-exact dequantization against the gguf package,
the kernels on those bytes, and the model's logits against llama.cpp's own."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mixq.formats import CheckpointCatalog
from mixq.formats.spec import QuantizedWeight
from mixq.kernels import wna16
from mixq.kernels.methods import GGMLMethod
from tests.devices import DEVICE

gguf = pytest.importorskip("gguf")
FIX = Path(__file__).parent / "fixtures" / "gguf"
FILES = ("tiny-llama-Q4_K_M.gguf", "tiny-llama-Q5_K_M.gguf")
TOKENS = list(range(3, 67))  # what make_gguf_fixtures.py scored


@pytest.mark.parametrize("name", FILES)
def test_llama_cpp_k_quants_dequantize_bit_exact(name):
    cat = CheckpointCatalog(FIX / name)
    reader = gguf.GGUFReader(str(FIX / name))
    ref = {t.name: gguf.quants.dequantize(t.data, t.tensor_type) for t in reader.tensors}
    seen = set()
    for hf, e in cat.entries.items():
        w = cat.read(hf).dequantize().numpy()
        g = ref[e.meta["gguf_name"]]
        if e.meta.get("heads"):  # back to the file's (rotary-interleaved) row order
            h = e.meta["heads"]
            w = w.reshape(h, 2, -1, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
        assert np.array_equal(w.view(np.uint32), g.view(np.uint32)), hf
        seen.add(e.meta["qtype"])
    assert {"q6_k"} | ({"q4_k"} if "Q4" in name else {"q5_k"}) <= seen


@pytest.mark.skipif(wna16.triton is None, reason="triton not installed")
def test_ggml_kernel_on_llama_cpp_blocks(monkeypatch):
    """The ggml kernel (interpreter on CPU, compiled under MIXQ_TEST_DEVICE=cuda) on tensors
    llama.cpp quantized, against a float64 product with gguf's dequantization."""
    if DEVICE == "cpu":
        monkeypatch.setenv("MIXQ_TRITON_INTERPRET_METHODS", "1")
    done = set()
    for name in FILES:
        cat = CheckpointCatalog(FIX / name)
        for hf, e in cat.entries.items():
            if not e.spec.is_quantized or e.spec.qtype in done or e.meta.get("heads"):
                continue
            done.add(e.spec.qtype)
            qw = cat.read(hf)
            m = GGMLMethod()
            tensors = {k: v.to(DEVICE) for k, v in qw.tensors.items()}
            prep = m.prepare(QuantizedWeight(hf, qw.spec, qw.shape, tensors), torch.float16)
            x = torch.randn(3, qw.shape[1], generator=torch.Generator().manual_seed(0)).half()
            ref = x.double() @ qw.dequantize(torch.float64).t()
            err = (m.apply(prep, x.to(DEVICE), None).double().cpu() - ref).norm() / ref.norm()
            assert err < 5e-3, (hf, e.spec.qtype, float(err))  # fp16 weight rounding, fp32 sums
    assert done == {"q4_k", "q5_k", "q6_k"}


@pytest.mark.parametrize("name", FILES)
def test_logits_match_llama_cpp(name):
    """mixq on the GGUF alone (config, tokenizer from the file), float32, against llama.cpp's
    logits saved with the fixture. llama.cpp quantizes the activations to 8 bits for its
    K-quant dot products (q8_K), mixq does not: the difference is that rounding, ~1% of the
    logit range here; a wrong scale, min or row order would be off by the logits' own size."""
    from mixq.engine.engine import LLM

    ref = np.load(FIX / name.replace(".gguf", ".logits.npy"))
    llm = LLM(model_path=str(FIX / name), dtype="float32", max_total_tokens=128, device="cpu")
    ours = llm.engine.runner.score(TOKENS, list(range(8))).numpy()
    diff = np.abs(ours - ref).max()
    scale = np.abs(ref).max()
    assert diff < 0.02 * scale, (diff, scale)
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() >= 0.9
