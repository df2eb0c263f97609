"""Real English text for perplexity (see data/README.md for its source)."""

from __future__ import annotations

from pathlib import Path

DATA = Path(__file__).parent / "data"


def load_eval_text(max_chars: int | None = None) -> str:
    """The Tempest, as plain text (optionally the first max_chars characters)."""
    text = (DATA / "tempest.txt").read_text(encoding="utf-8", errors="replace")
    return text if max_chars is None else text[:max_chars]
