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
    already produced (a step used to copy every sequence's whole lists). Pickling (the DP
    replicas' pipes) sends the sliced lists."""

    __slots__ = ("index", "text", "finish_reason", "delta_text", "_ids", "_lps", "_tops", "_n", "_n_lp", "_n_top",
                 "_sent", "_delta")

    def __init__(self, index: int, text: str = "", token_ids: list[int] | None = None, finish_reason: str | None = None,
                 logprobs: list[float] | None = None, top_logprobs: list | None = None, delta_text: str = "",
                 delta_token_ids: list[int] | None = None):
        self.index, self.text, self.finish_reason, self.delta_text = index, text, finish_reason, delta_text
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
        o.index, o.text, o.finish_reason, o.delta_text = own.index, own.text, own.finish_reason, delta_text
        o._ids, o._lps, o._tops = own._ids, own._lps, own._tops
        o._n, o._n_lp, o._n_top = len(own._ids), len(own._lps), len(own._tops)
        o._sent, o._delta = sent, None
        return o

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
                self.delta_text, self.delta_token_ids)

    def __reduce__(self):
        return (CompletionOutput, self._fields())

    def __eq__(self, other) -> bool:
        return isinstance(other, CompletionOutput) and self._fields() == other._fields()

    def __repr__(self) -> str:
        return ("CompletionOutput(index={!r}, text={!r}, token_ids={!r}, finish_reason={!r}, logprobs={!r}, "
                "top_logprobs={!r}, delta_text={!r}, delta_token_ids={!r})".format(*self._fields()))


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: dict = field(default_factory=dict)
