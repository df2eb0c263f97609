"""The scoreboard's numbers, per scored token and summed over a text (llama.cpp's
`--kl-divergence` set): perplexity, KL divergence of a model's next-token distribution from
the base model's, its mean and 99.9th percentile, and how often the top token is the same.
Plus Spearman's rank correlation, to say what the fast loss proxy is worth."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


def token_kld(base_logp: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """KL(P_base || Q) per row: sum_v p_base(v) (log p_base(v) - log q(v)).

    base_logp, logp: [T, V] log-probabilities (log_softmax outputs, float32 or float64).
    Returns [T] float64. The difference is taken per element before summing, so the small
    divergences of good formats do not vanish in the cancellation of two large sums."""
    if base_logp.shape != logp.shape:
        raise ValueError(f"token_kld: shapes differ: {list(base_logp.shape)} vs {list(logp.shape)}")
    out = torch.empty(base_logp.shape[0], dtype=torch.float64, device=base_logp.device)
    for s in range(0, base_logp.shape[0], 256):  # bounded temporaries for large vocabularies
        p = base_logp[s : s + 256].double()
        out[s : s + 256] = (p.exp() * (p - logp[s : s + 256].double())).sum(-1)
    return out.clamp_min(0.0)  # rounding can leave -1e-17 where the distributions agree


@dataclass
class TextScore:
    """Accumulates one model's per-token numbers over the windows of a text."""

    nll: list[torch.Tensor] = field(default_factory=list)  # [T] float64 per window
    kld: list[torch.Tensor] = field(default_factory=list)
    same_top: list[torch.Tensor] = field(default_factory=list)

    def add(self, logits: torch.Tensor, targets: torch.Tensor, base_logp: torch.Tensor | None = None) -> None:
        """logits [T, V] for the predicted positions, targets [T]; base_logp [T, V] or None."""
        logp = torch.log_softmax(logits.float(), -1)
        self.nll.append(-logp.gather(1, targets[:, None].to(logp.device))[:, 0].double().cpu())
        if base_logp is not None:
            base_logp = base_logp.to(logp.device)
            self.kld.append(token_kld(base_logp, logp).cpu())
            self.same_top.append((base_logp.argmax(-1) == logp.argmax(-1)).cpu())

    @property
    def tokens(self) -> int:
        return sum(x.numel() for x in self.nll)

    def summary(self) -> dict:
        """perplexity, and with a base: kld_mean, kld_p999, kld_max, same_top_pct."""
        nll = torch.cat(self.nll)
        out = {"perplexity": math.exp(nll.mean().item()), "tokens": int(nll.numel())}
        if self.kld:
            kld = torch.cat(self.kld)
            out.update(kld_mean=kld.mean().item(), kld_p999=torch.quantile(kld, 0.999).item(),
                       kld_max=kld.max().item(),
                       same_top_pct=100.0 * torch.cat(self.same_top).double().mean().item())
        return out


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation (ties get their average rank), as scipy.stats.spearmanr."""
    if len(x) != len(y) or len(x) < 2:
        raise ValueError("spearman: need two lists of the same length >= 2")

    def ranks(v: list[float]) -> torch.Tensor:
        t = torch.tensor(v, dtype=torch.float64)
        order = torch.argsort(t, stable=True)
        r = torch.empty_like(t)
        r[order] = torch.arange(1, len(v) + 1, dtype=torch.float64)
        for val in torch.unique(t):  # average rank over ties
            m = t == val
            if m.sum() > 1:
                r[m] = r[m].mean()
        return r

    a, b = ranks(x), ranks(y)
    a, b = a - a.mean(), b - b.mean()
    den = (a.square().sum() * b.square().sum()).sqrt()
    return float("nan") if den == 0 else float((a * b).sum() / den)
