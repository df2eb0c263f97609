"""Perplexity of a loaded engine's model on a text, in fixed non-overlapping windows."""

from __future__ import annotations

import math

import torch


def perplexity(engine, text: str, window: int = 512, max_tokens: int = 4096) -> dict:
    """exp(mean NLL) over the first `max_tokens` tokens of `text`, scored in windows of
    `window` tokens (each window starts fresh; its first token is not predicted)."""
    ids = engine.tokenizer.encode(text)[:max_tokens]
    window = min(window, engine.max_model_len)
    bs = engine.runner.block_size
    blocks = list(range(-(-window // bs)))
    if len(blocks) > engine.runner.num_blocks:
        raise ValueError(f"the KV cache ({engine.runner.num_blocks} blocks) cannot hold a {window}-token window")
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start : start + window]
        if len(chunk) < 2:
            break
        logits = engine.runner.score(chunk, blocks)
        target = torch.tensor(chunk[1:], device=logits.device)
        nll += torch.nn.functional.cross_entropy(logits[:-1], target, reduction="sum").item()
        count += len(chunk) - 1
    return {"perplexity": math.exp(nll / count), "tokens": count, "window": window}
