"""Incremental detokenization and stop strings.

Decoding token by token with `decode([t])` breaks multi-byte characters and
SentencePiece spaces, so each request keeps a short window: the text of the tokens since
a stable prefix is decoded anew and only the part past what was already emitted is new.
An incomplete UTF-8 sequence (U+FFFD at the end) is held back until it completes.

A step's sequences are detokenized together (`step_many`): their windows go to the Rust
backend in one `decode_batch` call instead of two calls per sequence, whose argument
conversion cost more than the decoding; the text is the same as `step` one by one.

Where the engine's consumer asks for it (the server's AsyncEngine, `LLM.generate`), the
engine loop does no detokenization for sequences without stop strings: it returns token
ids, and the text comes from a `TextStage` on the consumer's thread (the server's
detokenizer thread, as SGLang's detokenizer process and vLLM's output processor do), fed
each step's outputs in order so it settles exactly the text the engine would have; or from
one decode of all the ids when a request ends (`final_texts`: `LLM.generate` reads nothing
before). The Rust `decode_batch` releases the GIL while it decodes. A sequence with stop
strings is still detokenized on the engine thread: whether it goes on depends on its text.
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

    def step_many(self, items: list[tuple[DetokState, list[int]]], skip_special: bool = True,
                  ends: list[int] | None = None) -> list[str]:
        """`step` for each (state, all ids) pair, decoded in one batch; the new texts in order.
        ends: how many of each pair's ids there are (the rest of the list is not read)."""
        if not items:
            return []
        if ends is None:
            ends = [len(ids) for _, ids in items]
        windows = [ids[st.prefix_offset : st.read_offset] for st, ids in items]
        windows += [ids[st.prefix_offset : e] for (st, ids), e in zip(items, ends)]
        texts = self.decode_batch(windows, skip_special_tokens=skip_special)
        n = len(items)
        return [_settle(st, ends[k], texts[k], texts[n + k]) for k, (st, _) in enumerate(items)]

    def final_texts(self, seqs: list[list[int]], skip_special: bool = True) -> list[str]:
        """The text `step` would have settled over each whole sequence, in one batch decode:
        all of it but an incomplete character at the end (decoded again without its last
        tokens, rarely, until it ends in a whole character)."""
        texts = self.decode_batch(seqs, skip_special_tokens=skip_special)
        for k, t in enumerate(texts):
            n = len(seqs[k])
            while t.endswith("\ufffd") and n > 0:  # held back by `step`: never settled
                n -= 1
                t = self.decode(seqs[k][:n], skip_special_tokens=skip_special)
            texts[k] = t
        return texts


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


def fill_final_texts(detok: IncrementalDetokenizer, outputs: list, skips: list[bool]) -> None:
    """The text of the deferred sequences of finished RequestOutputs (`LLM.generate`'s),
    one batch decode per skip_special_tokens setting (skips: each request's); their deltas
    hold all of it, as nothing was returned before."""
    groups: dict[bool, list] = {}
    for o, skip in zip(outputs, skips):
        groups.setdefault(skip, []).extend(c for c in o.outputs if c.text_ids is not None)
    for skip, cs in groups.items():
        for c, text in zip(cs, detok.final_texts([c.token_ids[: c.text_ids] for c in cs], skip)):
            c.text = c.delta_text = text
            c.text_ids = None


@dataclass
class _SeqText:
    state: DetokState
    pieces: list  # the settled text, piece by piece (append-only: outputs share it)
    n: int = 0  # token ids covered so far


class TextStage:
    """The text of outputs whose engine deferred it (`CompletionOutput.text_ids` set),
    filled in from the token ids, one batch decode per step's outputs.

    Fed every step's outputs in order (as the engine returned them), it settles exactly the
    text and deltas the engine would have: each step extends a sequence's ids by the same
    tokens. `open` a request (with its skip_special_tokens) before its first output; its
    state goes with its finished output or with `close` (an abort). One thread at a time."""

    def __init__(self, detok: IncrementalDetokenizer):
        self.detok = detok
        self._reqs: dict[str, tuple[bool, dict[int, _SeqText]]] = {}

    def open(self, request_id: str, skip_special_tokens: bool) -> None:
        self._reqs[request_id] = (skip_special_tokens, {})

    def close(self, request_id: str) -> None:
        self._reqs.pop(request_id, None)

    def __len__(self) -> int:
        return len(self._reqs)

    def fill(self, outputs: list) -> None:
        """Set text and delta_text of every deferred CompletionOutput of these
        RequestOutputs (text_ids becomes None: the text is final)."""
        work: dict[bool, list[tuple[_SeqText, object]]] = {}
        for o in outputs:
            req = self._reqs.get(o.request_id)
            for c in o.outputs:
                if c.text_ids is None:
                    continue
                if req is None:
                    raise RuntimeError(f"request {o.request_id}: its text was deferred but it was not opened here")
                t = req[1].get(c.index)
                if t is None:
                    t = req[1][c.index] = _SeqText(DetokState(), [])
                if c.text_ids > t.n:
                    work.setdefault(req[0], []).append((t, c))
                else:
                    c._share_text(t.pieces, "")
                    c.text_ids = None
            if o.finished:
                self._reqs.pop(o.request_id, None)
        for skip, items in work.items():
            ends = [c.text_ids for _, c in items]
            new = self.detok.step_many([(t.state, c._ids) for t, c in items], skip, ends)
            for (t, c), piece, end in zip(items, new, ends):
                t.n = end
                if piece:
                    t.pieces.append(piece)
                c._share_text(t.pieces, piece)
                c.text_ids = None
