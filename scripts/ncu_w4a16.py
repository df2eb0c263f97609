"""One W4A16 GEMM per row count on the Llama-3-8B gate_up shape, for `ncu` to profile
(scripts/gpu_mma.sh): the default launch of the compiled kernel, each run twice so the
second is warm (profile with --launch-skip 1 per M);
MIXQ_NCU_SHAPE picks a launch shape."""

import os
import sys

import torch

from mixq.kernels import w4a16_mma
from mixq.kernels.w4a16_mma import choose_launch, pack_w4a16, w4a16_gemm

if os.environ.get("MIXQ_NCU_SHAPE"):  # a launch shape instead of the heuristic's
    sh = int(os.environ["MIXQ_NCU_SHAPE"])
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    w4a16_mma.CONFIG_OVERRIDE = lambda m_, n_, k_, g_: choose_launch(
        m_, n_, k_, g_, sms, lambda mb, s: w4a16_mma._occupancy(0, True, mb, s, False), shape=sh)

k, n = (int(v) for v in (sys.argv[1] if len(sys.argv) > 1 else "4096x28672").split("x"))
ms = [int(v) for v in (sys.argv[2] if len(sys.argv) > 2 else "1,16,64").split(",")]
gen = torch.Generator(device="cuda").manual_seed(0)
q = torch.randint(0, 16, (n, k), device="cuda", generator=gen, dtype=torch.int32)
s = (torch.rand(n, k // 128, device="cuda", generator=gen) * 0.01 + 0.001).to(torch.bfloat16)
w = pack_w4a16(q, s, None, 128, torch.bfloat16)
for m in ms:
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen)
    for _ in range(2):
        w4a16_gemm(x, w)
torch.cuda.synchronize()
