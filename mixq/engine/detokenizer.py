"""Incremental detokenization and stop strings.

Decoding token by token with `decode([t])` breaks multi-byte characters and
SentencePiece spaces, so each request keeps a short window: the text of the tokens since
a stable prefix is decoded anew and only the part past what was already emitted is new.
An incomplete UTF-8 sequence (U+FFFD at the end) is held back until it completes.

A step's sequences are detokenized together (`step_many`): their windows go to the Rust
backend in one `decode_batch` call instead of two calls per sequence, whose argument
conversion cost more than the decoding; the text is the same as `step` one by one.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DetokState:
    prefix_offset: int = 0  # tokens before this are settled
    read_offset: int = 0  # tokens up to here have produced emitted text


def fast_decoder(tokenizer):
    """`decode(ids, skip_special_tokens)` straight from the Rust `tokenizers` backend when the
    HF wrapper would return exactly that (a fast tokenizer that does no clean-up of
    tokenization spaces), else None. The wrapper's argument conversion costs about as much
    as the decode itself, twice per sequence per step."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is None or not hasattr(backend, "decode") or getattr(tokenizer, "clean_up_tokenization_spaces", True):
        return None
    return lambda ids, skip_special_tokens: backend.decode(ids, skip_special_tokens=skip_special_tokens)


def fast_batch_decoder(tokenizer):
    """`decode_batch(list of ids, skip_special_tokens)` from the Rust backend under the same
    condition as `fast_decoder`, else None."""
    if fast_decoder(tokenizer) is None or not hasattr(tokenizer._tokenizer, "decode_batch"):
        return None
    backend = tokenizer._tokenizer
    return lambda seqs, skip_special_tokens: backend.decode_batch(seqs, skip_special_tokens=skip_special_tokens)


class IncrementalDetokenizer:
    """Wraps a HF tokenizer; `step(state, all_ids)` returns the newly settled text,
    `step_many` does that for several sequences at once."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.decode = fast_decoder(tokenizer) or (
            lambda ids, skip_special_tokens: tokenizer.decode(ids, skip_special_tokens=skip_special_tokens))
        self.decode_batch = fast_batch_decoder(tokenizer) or (
            lambda seqs, skip_special_tokens: [self.decode(ids, skip_special_tokens) for ids in seqs])

    def step(self, st: DetokState, ids: list[int], skip_special: bool = True) -> str:
        prefix = self.decode(ids[st.prefix_offset : st.read_offset], skip_special_tokens=skip_special)
        full = self.decode(ids[st.prefix_offset :], skip_special_tokens=skip_special)
        return _settle(st, len(ids), prefix, full)

    def step_many(self, items: list[tuple[DetokState, list[int]]], skip_special: bool = True) -> list[str]:
        """`step` for each (state, all ids) pair, decoded in one batch; the new texts in order."""
        if not items:
            return []
        windows = [ids[st.prefix_offset : st.read_offset] for st, ids in items]
        windows += [ids[st.prefix_offset :] for st, ids in items]
        texts = self.decode_batch(windows, skip_special_tokens=skip_special)
        n = len(items)
        return [_settle(st, len(ids), texts[k], texts[n + k]) for k, (st, ids) in enumerate(items)]


def _settle(st: DetokState, n_ids: int, prefix: str, full: str) -> str:
    """The text past `prefix` in `full` (the decodes of the window before and with the new
    tokens), settled into st; "" while nothing new or an incomplete character ends it."""
    if len(full) <= len(prefix) or full.endswith("\ufffd"):
        return ""  # nothing new, or an incomplete character: wait for more tokens
    new = full[len(prefix) :]
    st.prefix_offset, st.read_offset = st.read_offset, n_ids
    return new


def find_stop(text: str, start: int, stops: list[str]) -> tuple[int, str] | None:
    """Earliest stop string occurring in text that ends at or after `start` (the position
    of newly added text); returns (index where it begins, the stop string)."""
    best = None
    for s in stops:
        if not s:
            continue
        i = text.find(s, max(0, start - len(s) + 1))
        if i != -1 and (best is None or i < best[0]):
            best = (i, s)
    return best


def held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters could still be the start of a stop string (a stream
    must not emit them yet)."""
    n = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                n = max(n, k)
                break
    return n
