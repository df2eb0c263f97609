"""Rotary position embeddings: default, linear, Llama-3 and YaRN frequency schedules.

Reads either transformers-v5 ``rope_parameters`` or the older ``rope_theta`` +
``rope_scaling`` from config.json. Rotation is the half-split (NeoX) form the Llama and
Qwen families use.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mixq.kernels import cpu_elementwise, elementwise


def rope_params(cfg: dict) -> dict:
    """{'rope_type', 'rope_theta', ...} from either config convention."""
    p = dict(cfg.get("rope_parameters") or {})
    scaling = cfg.get("rope_scaling") or {}
    for k, v in scaling.items():
        p.setdefault(k, v)
    p.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    p["rope_type"] = p.get("rope_type", p.get("type", "default")) or "default"
    return p


def _llama3(inv_freq: torch.Tensor, p: dict) -> torch.Tensor:
    factor, lo, hi = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    orig = p["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = ((orig / wavelen) - lo) / (hi - lo)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    out = torch.where(wavelen > orig / lo, inv_freq / factor, blended)
    return torch.where(wavelen < orig / hi, inv_freq, out)


def _yarn(dim: int, base: float, p: dict, max_pos: int) -> tuple[torch.Tensor, float]:
    factor = p["factor"]
    orig = p.get("original_max_position_embeddings") or max_pos
    beta_fast, beta_slow = p.get("beta_fast", 32), p.get("beta_slow", 1)
    attn = p.get("attention_factor")
    if attn is None:
        mscale, mscale_all = p.get("mscale"), p.get("mscale_all_dim")

        def get_mscale(scale, m=1.0):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        attn = get_mscale(factor, mscale) / get_mscale(factor, mscale_all) if mscale and mscale_all else get_mscale(factor)

    def correction_dim(rotations):  # the dim index whose wavelength fits `rotations` in orig
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    extrapolate = 1 - ramp  # 1: keep the original frequency; 0: interpolate by `factor`
    inv_freq = (1 / (factor * pos_freqs)) * (1 - extrapolate) + (1 / pos_freqs) * extrapolate
    return inv_freq, float(attn)


def rope_frequencies(head_dim: int, cfg: dict) -> tuple[torch.Tensor, float]:
    """(inv_freq [head_dim/2] float64, cos/sin scale) for a config.json's rope settings."""
    p = rope_params(cfg)
    base, kind = float(p["rope_theta"]), p["rope_type"]
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if kind == "llama3":
        return _llama3(inv_freq, p), 1.0
    if kind == "yarn":
        return _yarn(head_dim, base, p, cfg.get("max_position_embeddings", 4096))
    if kind == "linear":
        return inv_freq / p["factor"], 1.0
    if kind != "default":
        raise ValueError(f"rope_type {kind!r} is not supported (default, linear, llama3, yarn)")
    return inv_freq, 1.0


def rope_max_position(cfg: dict) -> int:
    """Positions the model serves. YaRN as Qwen documents it leaves max_position_embeddings
    at the pretraining length and extends it by `factor` (vLLM does the same). Other
    schedules (Llama-3) already state the long length there."""
    n = cfg.get("max_position_embeddings", 4096)
    p = rope_params(cfg)
    if p["rope_type"] == "yarn" and p.get("factor"):
        orig = p.get("original_max_position_embeddings") or n
        return max(n, int(orig * p["factor"]))
    return n


class RotaryEmbedding(nn.Module):
    """Applies rotary embeddings to q [T, H, D] and k [T, Hkv, D] at given positions."""

    def __init__(self, head_dim: int, max_position: int, cfg: dict):
        super().__init__()
        inv_freq, scale = rope_frequencies(head_dim, cfg)
        t = torch.arange(max_position, dtype=torch.float64)
        freqs = torch.outer(t, inv_freq.double())
        # float32 tables, computed in float64 so long contexts keep their precision.
        self.register_buffer("cos", (freqs.cos() * scale).float(), persistent=False)
        self.register_buffer("sin", (freqs.sin() * scale).float(), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        if elementwise.use_kernels(q) and q.stride(-1) == 1 and k.stride(-1) == 1:
            return elementwise.rotary_neox(positions, q, k, self.cos, self.sin)
        if cpu_elementwise.takes_rotary(q, k, self.cos, self.sin, positions):  # the code below, one C call
            return cpu_elementwise.rotary_neox(positions, q, k, self.cos, self.sin)
        cos = self.cos[positions].unsqueeze(1)  # [T, 1, D/2]
        sin = self.sin[positions].unsqueeze(1)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)


_SHARED: dict[tuple, RotaryEmbedding] = {}


def get_rope(head_dim: int, max_position: int, cfg: dict) -> RotaryEmbedding:
    """One RotaryEmbedding per (schedule, length, device), shared by every layer: the
    tables are [max_position, head_dim/2] each (64 MiB for a 131072-token Llama-3), so a
    copy per layer would cost gigabytes. Builds on the current default device."""
    p = rope_params(cfg)
    key = (head_dim, max_position, repr(sorted(p.items())), str(torch.get_default_device()))
    rope = _SHARED.get(key)
    if rope is None:
        rope = _SHARED[key] = RotaryEmbedding(head_dim, max_position, cfg)
    return rope

