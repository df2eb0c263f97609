"""The layer x expert activation heatmap (matplotlib, an optional dependency: `mixq[plot]`)."""

from __future__ import annotations

import os

import torch

from mixq.errors import MixqError
from mixq.tracking.expert_stats import ExpertTable


def heatmap_matrix(doc: dict, metric: str = "tokens", normalize: bool = True) -> tuple[list[int], torch.Tensor]:
    """(layer ids, [L, E] float64): tokens routed (or passes with >= 1 token) per layer and
    expert; with `normalize`, each row divided by its sum (a layer's share; rows of zeros stay 0)."""
    if metric not in ("tokens", "activations"):
        raise ValueError(f"metric must be 'tokens' or 'activations', got {metric!r}")
    t = ExpertTable.from_doc(doc)
    m = (t.tokens if metric == "tokens" else t.activations).to(torch.float64)
    if normalize:
        m = m / m.sum(1, keepdim=True).clamp_min(1)
    return t.layer_ids, m


def plot_expert_heatmap(doc: dict, out: str | os.PathLike, metric: str = "tokens", normalize: bool = True):
    """Draw and save the heatmap; returns the matplotlib Figure."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only; no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise MixqError("plot-experts needs matplotlib: pip install 'mixq[plot]' (or: pip install matplotlib)") from None
    layers, m = heatmap_matrix(doc, metric, normalize)
    L, E = m.shape
    fig, ax = plt.subplots(figsize=(min(max(6.0, 0.12 * E + 2), 40.0), min(max(3.0, 0.22 * L + 1.5), 40.0)))
    im = ax.imshow(m.numpy(), aspect="auto", interpolation="nearest", cmap="viridis")
    what = "tokens routed" if metric == "tokens" else "passes with >= 1 token"
    fig.colorbar(im, ax=ax, label=f"share of the layer's {what}" if normalize else what)
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    step = max(1, L // 32)
    ax.set_yticks(range(0, L, step), [str(lid) for lid in layers[::step]])
    if E <= 64:
        ax.set_xticks(range(E))
    total = int(m.sum()) if not normalize else None
    ax.set_title(f"Expert load: {what}" + (f" ({total} total)" if total is not None else " (per-layer share)"))
    fig.tight_layout()
    fig.savefig(out, dpi=150)
    plt.close(fig)
    return fig
