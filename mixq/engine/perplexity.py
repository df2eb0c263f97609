"""Perplexity of a loaded engine's model on a text, in fixed non-overlapping windows."""

from __future__ import annotations

import math

import torch


def perplexity(engine, text: str, window: int = 512, max_tokens: int = 4096) -> dict:
    """exp(mean NLL) over the first `max_tokens` tokens of `text`, scored in windows of
    `window` tokens (each window starts fresh; its first token is not predicted)."""
    ids = engine.tokenizer.encode(text)[:max_tokens]
    window = min(window, engine.max_model_len)
    manager = engine.scheduler.blocks
    need = -(-window // manager.block_size)
    if need > manager.num_free:
        raise ValueError(f"the KV cache ({manager.num_free} of {manager.num_blocks} blocks free) cannot hold a "
                         f"{window}-token window")
    # blocks from the block manager, so that no prefix-cached or running sequence's block is overwritten
    blocks = manager.take(need)
    nll, count = 0.0, 0
    try:
        for start in range(0, len(ids) - 1, window):
            chunk = ids[start : start + window]
            if len(chunk) < 2:
                break
            logits = engine.runner.score(chunk, blocks)
            target = torch.tensor(chunk[1:], device=logits.device)
            nll += torch.nn.functional.cross_entropy(logits[:-1], target, reduction="sum").item()
            count += len(chunk) - 1
    finally:
        manager.release(blocks)
    return {"perplexity": math.exp(nll / count), "tokens": count, "window": window}
