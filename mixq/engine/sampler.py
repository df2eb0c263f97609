"""Batched sampling: penalties, temperature, top-k, top-p, min-p, seeds, logprobs.

Rows are processed together as tensors; no per-row host sync. Sampling uses the
exponential race (argmax of p / E with E ~ Exp(1)), which draws exactly from p and lets
seeded rows use their own generator for E while the rest share one draw.

Logprobs are those of the model's distribution (log_softmax of the raw logits, before
penalties, temperature and truncation), as OpenAI-compatible servers report them.

A structured-output token mask (mixq.engine.grammar) is applied after the penalties, on the
sampler's own copy of the logits (a replayed CUDA graph's output is never written): the
choice is made among the tokens the grammar allows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mixq.engine.grammar import TokenMask, apply_token_mask
from mixq.engine.sampling_params import SamplingParams


@dataclass
class SampleRow:
    params: SamplingParams
    prompt_ids: list[int]
    output_ids: list[int]
    generator: torch.Generator | None = None  # for seeded requests
    constrained: bool = False  # a grammar decides where it ends: no min_new_tokens ban on EOS


@dataclass
class SampleOutput:
    token_ids: list[int]
    logprobs: list[float] | None  # logprob of each chosen token (when any row asked)
    top_logprobs: list[list[tuple[int, float]]] | None


def _pad(rows: list[list[int]], device) -> torch.Tensor:
    width = max(1, max(len(r) for r in rows))
    out = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            out[i, : len(r)] = torch.tensor(r)
    return out.to(device)


def _counts(ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """[R, L] ids padded with -1 -> [R, V] occurrence counts."""
    counts = torch.zeros(ids.shape[0], vocab + 1, device=ids.device)
    counts.scatter_add_(1, ids.clamp(min=-1) % (vocab + 1), torch.ones_like(ids, dtype=counts.dtype))
    return counts[:, :vocab]


def apply_penalties(logits: torch.Tensor, rows: list[SampleRow], eos_ids: tuple[int, ...]) -> torch.Tensor:
    """Repetition (prompt + output), frequency and presence (output) penalties, and the
    min_new_tokens ban on EOS/stop tokens. Returns new logits."""
    r, v = logits.shape
    dev = logits.device
    ps = [x.params for x in rows]
    logits = logits.clone()
    if any(p.repetition_penalty != 1 for p in ps):
        seen = _counts(_pad([x.prompt_ids + x.output_ids for x in rows], dev), v) > 0
        rep = torch.tensor([p.repetition_penalty for p in ps], device=dev)[:, None]
        penalized = torch.where(logits > 0, logits / rep, logits * rep)
        logits = torch.where(seen, penalized, logits)
    if any(p.frequency_penalty or p.presence_penalty for p in ps):
        counts = _counts(_pad([x.output_ids for x in rows], dev), v)
        freq = torch.tensor([p.frequency_penalty for p in ps], device=dev)[:, None]
        pres = torch.tensor([p.presence_penalty for p in ps], device=dev)[:, None]
        logits = logits - freq * counts - pres * (counts > 0)
    for i, x in enumerate(rows):
        if len(x.output_ids) < x.params.min_new_tokens and not x.constrained:
            banned = [t for t in (*([] if x.params.ignore_eos else eos_ids), *x.params.stop_token_ids) if t < v]
            if banned:
                logits[i, banned] = float("-inf")
    return logits


def filter_probs(probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Zero out what top-k / top-p / min-p exclude; probs [R, V], params [R]."""
    v = probs.shape[1]
    sorted_p, idx = probs.sort(dim=-1, descending=True)
    rank = torch.arange(v, device=probs.device)[None, :]
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, v))[:, None]
    drop = rank >= k
    # top-p: keep the smallest prefix whose mass reaches p (the token crossing p stays)
    before = sorted_p.cumsum(-1) - sorted_p
    drop |= before >= top_p[:, None]
    drop |= sorted_p < min_p[:, None] * sorted_p[:, :1]
    drop[:, 0] = False  # the most likely token always survives
    sorted_p = sorted_p.masked_fill(drop, 0.0)
    return torch.zeros_like(probs).scatter_(1, idx, sorted_p)


class Sampler:
    def __init__(self, eos_token_ids: tuple[int, ...] = ()):
        self.eos_token_ids = eos_token_ids

    @torch.no_grad()
    def __call__(self, logits: torch.Tensor, rows: list[SampleRow], mask: TokenMask | None = None) -> SampleOutput:
        """logits [R, V] float32, one row per sampling sequence; `mask` the allowed tokens of
        the constrained rows (mixq.engine.grammar.TokenMasks.fill)."""
        dev = logits.device
        ps = [x.params for x in rows]
        raw_logprobs = logits.log_softmax(-1) if any(p.logprobs is not None for p in ps) else None
        logits = apply_penalties(logits, rows, self.eos_token_ids)  # a new tensor
        if mask is not None:
            apply_token_mask(logits, mask)
        chosen = logits.argmax(-1)
        if not all(p.greedy for p in ps):
            greedy = torch.tensor([p.greedy for p in ps], device=dev)
            temp = torch.tensor([1.0 if p.greedy else p.temperature for p in ps], device=dev)
            probs = (logits / temp[:, None]).softmax(-1)
            probs = filter_probs(
                probs,
                torch.tensor([p.top_k for p in ps], device=dev),
                torch.tensor([p.top_p for p in ps], device=dev),
                torch.tensor([p.min_p for p in ps], device=dev),
            )
            race = torch.empty_like(probs).exponential_()
            for i, x in enumerate(rows):
                if x.generator is not None:
                    race[i] = torch.empty(probs.shape[1], device=x.generator.device).exponential_(
                        generator=x.generator).to(dev)
            sampled = (probs / race).argmax(-1)
            chosen = torch.where(greedy, chosen, sampled)
        token_ids = chosen.tolist()
        if raw_logprobs is None:
            return SampleOutput(token_ids, None, None)
        lp = raw_logprobs.gather(1, chosen[:, None])[:, 0].tolist()
        k = max((p.logprobs or 0) for p in ps)
        tops = None
        if k > 0:
            vals, idx = raw_logprobs.topk(k, dim=-1)
            vals, idx = vals.tolist(), idx.tolist()
            tops = [list(zip(idx[i][: ps[i].logprobs or 0], vals[i][: ps[i].logprobs or 0])) for i in range(len(ps))]
        return SampleOutput(token_ids, lp, tops)
