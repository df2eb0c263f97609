"""Real English text for quality measurements (see data/README.md for the sources).

Two different texts on purpose: `mixq measure` calibrates on one (Julius Caesar) and
`mixq eval` scores on the other (The Tempest), so a planned mix is judged on held-out text."""

from __future__ import annotations

from pathlib import Path

DATA = Path(__file__).parent / "data"
EVAL_TEXT_NAME = "The Tempest (mixq/assets/data/tempest.txt)"
CALIBRATION_TEXT_NAME = "Julius Caesar, acts I-II (mixq/assets/data/julius_caesar.txt)"


def load_eval_text(max_chars: int | None = None) -> str:
    """The Tempest, as plain text (optionally the first max_chars characters)."""
    text = (DATA / "tempest.txt").read_text(encoding="utf-8", errors="replace")
    return text if max_chars is None else text[:max_chars]


def load_calibration_text(max_chars: int | None = None) -> str:
    """Julius Caesar acts I-II, as plain text: the calibration text, never evaluated on."""
    text = (DATA / "julius_caesar.txt").read_text(encoding="utf-8", errors="replace")
    return text if max_chars is None else text[:max_chars]
