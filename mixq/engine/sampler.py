"""Batched sampling: penalties, temperature, top-k, top-p, min-p, seeds, logprobs.

Rows are processed together as tensors; no host sync until the results are read: `sample`
leaves them on the device (host-to-device copies are non-blocking), `SampleResult.to_host`
starts their copy back and `output` reads them, so the overlap schedule can queue the next
step in between. Sampling uses the
exponential race (argmax of p / E with E ~ Exp(1)), which draws exactly from p and lets
seeded rows use their own generator for E while the rest share one draw.

Logprobs are those of the model's distribution (log_softmax of the raw logits, before
penalties, temperature and truncation), as OpenAI-compatible servers report them.

A structured-output token mask (mixq.engine.grammar) is applied after the penalties, on the
sampler's own copy of the logits (a replayed CUDA graph's output is never written): the
choice is made among the tokens the grammar allows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
    # the output token sampled last is still on the device (overlap schedule): its id is the
    # row's entry in `pending_ids`, and it counts for penalties and min_new_tokens
    pending: bool = False
    # whether a penalty reads the row's tokens (and so its `pending_ids` entry); set from params
    penalized: bool = field(init=False)

    def __post_init__(self):
        p = self.params
        self.penalized = p.repetition_penalty != 1 or bool(p.frequency_penalty) or bool(p.presence_penalty)


@dataclass
class SampleOutput:
    token_ids: list[int]
    logprobs: list[float] | None  # logprob of each chosen token (when any row asked)
    top_logprobs: list[list[tuple[int, float]]] | None


@dataclass
class SampleResult:
    """A step's samples, on the device until `to_host` copies them and `output` reads them."""

    token_ids: torch.Tensor  # [R] int64
    logprobs: torch.Tensor | None  # [R] float32
    top_ids: torch.Tensor | None  # [R, k] int64
    top_values: torch.Tensor | None  # [R, k] float32
    top_k: list[int]  # per row: how many top logprobs it asked for
    ready: torch.cuda.Event | None = None  # recorded after the copies of to_host

    def to_host(self) -> SampleResult:
        """Start copying the results into host memory (pinned, non-blocking on CUDA); the
        copy's `output` waits for them."""
        t = self.token_ids
        if t.device.type != "cuda":
            return self

        def host(x):
            if x is None:
                return None
            out = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
            return out.copy_(x, non_blocking=True)

        ready = torch.cuda.Event()
        out = SampleResult(host(t), host(self.logprobs), host(self.top_ids), host(self.top_values), self.top_k)
        ready.record()
        out.ready = ready
        return out

    def output(self) -> SampleOutput:
        """The results as Python lists (waits for the device when they are not there yet)."""
        if self.ready is not None:
            self.ready.synchronize()
        token_ids = self.token_ids.tolist()
        if self.logprobs is None:
            return SampleOutput(token_ids, None, None)
        tops = None
        if self.top_ids is not None:
            ids, vals = self.top_ids.tolist(), self.top_values.tolist()
            tops = [list(zip(ids[i][:k], vals[i][:k])) for i, k in enumerate(self.top_k)]
        return SampleOutput(token_ids, self.logprobs.tolist(), tops)


def _dev(x, dtype, device) -> torch.Tensor:
    """A host list as a device tensor without waiting for the device (non-blocking copy)."""
    return torch.tensor(x, dtype=dtype).to(device, non_blocking=True)


def _pad(rows: list[list[int]], device) -> torch.Tensor:
    width = max(1, max(len(r) for r in rows))
    out = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            out[i, : len(r)] = torch.tensor(r)
    return out.to(device, non_blocking=True)


def _counts(ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """[R, L] ids padded with -1 -> [R, V] occurrence counts."""
    counts = torch.zeros(ids.shape[0], vocab + 1, device=ids.device)
    counts.scatter_add_(1, ids.clamp(min=-1) % (vocab + 1), torch.ones_like(ids, dtype=counts.dtype))
    return counts[:, :vocab]


def apply_penalties(logits: torch.Tensor, rows: list[SampleRow], eos_ids: tuple[int, ...],
                    pending_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Repetition (prompt + output), frequency and presence (output) penalties, and the
    min_new_tokens ban on EOS/stop tokens. pending_ids [R] (device; -1: none) holds the
    output token of each row with `pending` whose id is still on the device. Returns new
    logits."""
    r, v = logits.shape
    dev = logits.device
    ps = [x.params for x in rows]
    logits = logits.clone()

    def ids(lists):
        padded = _pad(lists, dev)
        return padded if pending_ids is None else torch.cat([padded, pending_ids[:, None]], 1)

    if any(p.repetition_penalty != 1 for p in ps):
        seen = _counts(ids([x.prompt_ids + x.output_ids for x in rows]), v) > 0
        rep = _dev([p.repetition_penalty for p in ps], torch.float32, dev)[:, None]
        penalized = torch.where(logits > 0, logits / rep, logits * rep)
        logits = torch.where(seen, penalized, logits)
    if any(p.frequency_penalty or p.presence_penalty for p in ps):
        counts = _counts(ids([x.output_ids for x in rows]), v)
        freq = _dev([p.frequency_penalty for p in ps], torch.float32, dev)[:, None]
        pres = _dev([p.presence_penalty for p in ps], torch.float32, dev)[:, None]
        logits = logits - freq * counts - pres * (counts > 0)
    ban_rows, ban_ids = [], []
    for i, x in enumerate(rows):
        if len(x.output_ids) + x.pending < x.params.min_new_tokens and not x.constrained:
            banned = [t for t in (*([] if x.params.ignore_eos else eos_ids), *x.params.stop_token_ids) if t < v]
            ban_rows += [i] * len(banned)
            ban_ids += banned
    if ban_rows:
        logits[_dev(ban_rows, torch.int64, dev), _dev(ban_ids, torch.int64, dev)] = float("-inf")
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

    def __call__(self, logits: torch.Tensor, rows: list[SampleRow], mask: TokenMask | None = None) -> SampleOutput:
        """logits [R, V] float32, one row per sampling sequence; the results as lists."""
        return self.sample(logits, rows, mask=mask).output()

    @torch.no_grad()
    def sample(self, logits: torch.Tensor, rows: list[SampleRow], pending_ids: torch.Tensor | None = None,
               mask: TokenMask | None = None) -> SampleResult:
        """Sample one token per row of logits [R, V] float32, leaving the results on the
        device (no host sync). pending_ids: see `apply_penalties`; `mask` the allowed tokens
        of the constrained rows (mixq.engine.grammar.TokenMasks.fill)."""
        dev = logits.device
        ps = [x.params for x in rows]
        raw_logprobs = logits.log_softmax(-1) if any(p.logprobs is not None for p in ps) else None
        logits = apply_penalties(logits, rows, self.eos_token_ids, pending_ids)  # a new tensor
        if mask is not None:
            apply_token_mask(logits, mask)
        chosen = logits.argmax(-1)
        if not all(p.greedy for p in ps):
            greedy = _dev([p.greedy for p in ps], torch.bool, dev)
            temp = _dev([1.0 if p.greedy else p.temperature for p in ps], torch.float32, dev)
            probs = (logits / temp[:, None]).softmax(-1)
            probs = filter_probs(
                probs,
                _dev([p.top_k for p in ps], torch.int64, dev),
                _dev([p.top_p for p in ps], torch.float32, dev),
                _dev([p.min_p for p in ps], torch.float32, dev),
            )
            race = torch.empty_like(probs).exponential_()
            for i, x in enumerate(rows):
                if x.generator is not None:
                    race[i] = torch.empty(probs.shape[1], device=x.generator.device).exponential_(
                        generator=x.generator).to(dev)
            sampled = (probs / race).argmax(-1)
            chosen = torch.where(greedy, chosen, sampled)
        top_k = [p.logprobs or 0 for p in ps]
        if raw_logprobs is None:
            return SampleResult(chosen, None, None, None, top_k)
        lp = raw_logprobs.gather(1, chosen[:, None])[:, 0]
        vals = idx = None
        if max(top_k) > 0:
            vals, idx = raw_logprobs.topk(max(top_k), dim=-1)
        return SampleResult(chosen, lp, idx, vals, top_k)
