"""What a step returns: one RequestOutput per request that progressed, one CompletionOutput
per sequence of it (mixq.engine.engine re-exports both)."""

from __future__ import annotations

from dataclasses import dataclass, field


class CompletionOutput:
    """One sequence's output as of a step: token_ids, logprobs and top_logprobs produced so
    far, its text, finish_reason, and delta_text / delta_token_ids (new since the request's
    previous RequestOutput).

    An output the engine returns is a snapshot that shares the engine's append-only lists
    and slices them when a field is first read, so returning it costs nothing per token
    already produced (a step used to copy every sequence's whole lists). The text is kept
    the same way, as a list of pieces joined when `text` is first read (appending to one
    string copied the whole text every step). Pickling (the DP replicas' pipes) sends the
    sliced lists and the joined text.

    text_ids: None when `text` is final as given; else the text is left to a text stage
    off the engine loop (mixq.engine.detokenizer.TextStage, or `LLM.generate`'s one decode
    at the end) and covers the first `text_ids` token ids (an EOS or stop token that ended
    the sequence has no text)."""

    __slots__ = ("index", "finish_reason", "delta_text", "_ids", "_lps", "_tops", "_n", "_n_lp", "_n_top",
                 "_sent", "_delta", "_pieces", "_np", "_text", "text_ids")

    def __init__(self, index: int, text: str = "", token_ids: list[int] | None = None, finish_reason: str | None = None,
                 logprobs: list[float] | None = None, top_logprobs: list | None = None, delta_text: str = "",
                 delta_token_ids: list[int] | None = None, text_ids: int | None = None):
        self.index, self.finish_reason, self.delta_text, self.text_ids = index, finish_reason, delta_text, text_ids
        self.text = text
        self._ids = [] if token_ids is None else token_ids
        self._lps = [] if logprobs is None else logprobs
        self._tops = [] if top_logprobs is None else top_logprobs
        self._n = self._n_lp = self._n_top = None  # None: the lists are this object's own
        self._sent = 0
        self._delta = [] if delta_token_ids is None else delta_token_ids

    @classmethod
    def _snapshot(cls, own: CompletionOutput, sent: int, delta_text: str) -> CompletionOutput:
        """`own` (the engine's accumulating output) as of now, new tokens from `sent` on."""
        o = cls.__new__(cls)
        o.index, o.finish_reason, o.delta_text, o.text_ids = own.index, own.finish_reason, delta_text, own.text_ids
        o._pieces, o._np, o._text = own._pieces, len(own._pieces), own._text
        o._ids, o._lps, o._tops = own._ids, own._lps, own._tops
        o._n, o._n_lp, o._n_top = len(own._ids), len(own._lps), len(own._tops)
        o._sent, o._delta = sent, None
        return o

    @property
    def text(self) -> str:
        if self._text is None:
            self._text = "".join(self._pieces[: self._np])
        return self._text

    @text.setter
    def text(self, value: str) -> None:
        """Replaces the text (a new piece list: snapshots taken before keep theirs)."""
        self._pieces, self._np, self._text = [value] if value else [], None, value

    def _append_text(self, piece: str) -> None:
        """Add a piece to an accumulating (engine- or stage-owned) output."""
        self._pieces.append(piece)
        self._text = None

    def _share_text(self, pieces: list[str], delta: str) -> None:
        """Show `pieces` (another owner's append-only list) as of now, `delta` new."""
        self._pieces, self._np, self._text, self.delta_text = pieces, len(pieces), None, delta

    @property
    def token_ids(self) -> list[int]:
        if self._n is not None:
            self._materialize()
        return self._ids

    @property
    def logprobs(self) -> list[float]:
        if self._n is not None:
            self._materialize()
        return self._lps

    @property
    def top_logprobs(self) -> list[list[tuple[int, float]]]:
        if self._n is not None:
            self._materialize()
        return self._tops

    @property
    def delta_token_ids(self) -> list[int]:
        if self._delta is None:
            self._delta = self._ids[self._sent : self._n] if self._n is not None else self._ids[self._sent :]
        return self._delta

    def _materialize(self) -> None:
        self._ids, self._lps, self._tops = self._ids[: self._n], self._lps[: self._n_lp], self._tops[: self._n_top]
        self._n = self._n_lp = self._n_top = None

    def _fields(self) -> tuple:
        return (self.index, self.text, self.token_ids, self.finish_reason, self.logprobs, self.top_logprobs,
                self.delta_text, self.delta_token_ids, self.text_ids)

    def __reduce__(self):
        return (CompletionOutput, self._fields())

    def __eq__(self, other) -> bool:
        return isinstance(other, CompletionOutput) and self._fields() == other._fields()

    def __repr__(self) -> str:
        return ("CompletionOutput(index={!r}, text={!r}, token_ids={!r}, finish_reason={!r}, logprobs={!r}, "
                "top_logprobs={!r}, delta_text={!r}, delta_token_ids={!r}, text_ids={!r})".format(*self._fields()))


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: dict = field(default_factory=dict)
