import os

import torch

# Triton kernels run under the interpreter on machines without a GPU. It must be chosen
# before triton.jit decorates them, i.e. before mixq.kernels is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
