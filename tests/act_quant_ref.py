"""Activation quantization for HF transformers reference models: forward pre-hooks that
quantize a Linear's input as its checkpoint's scheme says (W8A8 INT8 per token, FP8 per
token / static per tensor / per 1 x 128 group), written with torch's own fp8 cast.

The arithmetic is the scheme's as mixq and the GPU kernels define it (fp32: s = amax /
QMAX, y = clamp(x / s), INT8 rounded half away from zero, FP8 to nearest even), so a
reference model hooked this way computes the quantized model the engine must compute."""

from __future__ import annotations

import torch

from mixq.formats.spec import QuantizedWeight


def quantize_like_scheme(x: torch.Tensor, qw: QuantizedWeight) -> torch.Tensor:
    spec = qw.spec
    xf = x.float()
    fp8 = spec.layout == "fp8"
    qmax = 448.0 if fp8 else 127.0
    static = qw.tensors.get("input_scale") if spec.activation == "static-tensor" else None
    group = 0
    if fp8 and static is None:
        if spec.scale_layout == "block":
            group = spec.block_size[1]
        elif spec.scale_layout == "group":
            group = spec.group_size
        elif spec.activation == "dynamic-group":
            group = 128
    shape = xf.shape
    k = shape[-1]
    rows = xf.reshape(-1, k)
    if group:
        g = -(-k // group)
        rows = torch.nn.functional.pad(rows, (0, g * group - k)).reshape(-1, group)
    if static is not None:
        s = static.float().reshape(1, 1)
    else:
        s = rows.abs().amax(-1, keepdim=True).clamp(min=1e-10) / qmax
    y = (rows / s).clamp(-qmax, qmax)
    q = y.to(torch.float8_e4m3fn).float() if fp8 else torch.sign(y) * torch.floor(y.abs() + 0.5)
    out = q * s
    if group:
        out = out.reshape(-1, g * group)[:, :k]
    return out.reshape(shape).to(x.dtype)


def hook_activation_quant(model: torch.nn.Module, weights: dict[str, QuantizedWeight]) -> int:
    """Hook every Linear of `model` whose weight in `weights` has an activation scheme;
    returns how many were hooked."""
    n = 0
    for name, qw in weights.items():
        if qw.spec.activation == "none":
            continue
        mod = model.get_submodule(name.removesuffix(".weight"))
        mod.register_forward_pre_hook(lambda m, args, qw=qw: (quantize_like_scheme(args[0], qw), *args[1:]))
        n += 1
    return n
