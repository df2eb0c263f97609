"""Per-request sampling parameters and the one place they are checked (plain Python).

Every way into the engine — `/v1/completions`, `/v1/chat/completions`, `/generate`,
`mixq generate` and the Python API — builds a `SamplingParams`, and its construction
checks every field's type and range before anything is queued: integers are integers (not
booleans, not floats) of a bounded size, floats are finite, lists are bounded. A refusal is
a `SamplingParamError` naming the parameter, what it accepts and what it got.

`SamplingParams.from_dict` is the door for API requests: it maps the names a request uses
(OpenAI's `max_tokens`, vLLM's `min_tokens`, ...) onto the fields, applies the server's cap
on `n`, and names the request's own field in any error. A new request field is a new
dataclass field plus one `_RULES` entry.

Structured outputs (`json_schema`, `regex`: SGLang's names) are checked here as far as
plain Python can: the type, the size, that a schema is JSON text of an object or a boolean,
that at most one constraint is given. Whether the grammar library takes the schema or the
regex, and whether this model's vocabulary can begin the output it allows, needs the
tokenizer: `mixq.engine.grammar.GrammarBackend.compile` checks that, off the event loop,
raising the same `SamplingParamError`; `SamplingParams.renamed` names its field as the
request did.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields

from mixq.errors import MixqError

INT32_MAX = 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_STOP_TOKEN_IDS = 1024
MAX_GRAMMAR_CHARS = 128 * 1024  # a json_schema or regex (OpenAI caps a schema's strings at 120k characters)
GRAMMAR_FIELDS = ("json_schema", "regex")  # the structured-output constraints (one at most)
# Below this a temperature is greedy: dividing logits by it would overflow to inf (vLLM's eps).
GREEDY_TEMPERATURE = 1e-5


class SamplingParamError(MixqError, ValueError):
    """A sampling parameter out of its type or range; `param` names it as the caller did."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def _preview(v) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def _is_int(v) -> bool:
    return type(v) is int  # bool is an int subclass: refused


def _is_num(v) -> bool:
    return (type(v) is int or type(v) is float) and math.isfinite(v)


def _int_in(lo: int, hi: int):
    return lambda v: _is_int(v) and lo <= v <= hi


def _num_in(lo: float, hi: float, lo_open: bool = False):
    return lambda v: _is_num(v) and (lo < v if lo_open else lo <= v) and v <= hi


def _grammar_text_ok(v) -> bool:
    return v is None or (isinstance(v, str) and 0 < len(v) <= MAX_GRAMMAR_CHARS)


def _stop_ok(v) -> bool:
    items = [v] if isinstance(v, str) else v
    return (isinstance(items, list) and len(items) <= MAX_STOP_STRINGS
            and all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in items))


# field -> (check, what it accepts). Ranges follow SGLang's SamplingParams where it has one.
_RULES: dict[str, tuple] = {
    "max_new_tokens": (_int_in(1, INT32_MAX), f"an integer in [1, {INT32_MAX}]"),
    "min_new_tokens": (_int_in(0, INT32_MAX), "an integer in [0, max_new_tokens]"),
    "temperature": (_num_in(0, math.inf), "a finite number >= 0 (0: greedy)"),
    "top_k": (lambda v: _is_int(v) and (v == -1 or 0 <= v <= INT32_MAX),
              f"-1 or 0 (off), or an integer in [1, {INT32_MAX}]"),
    "top_p": (_num_in(0, 1, lo_open=True), "a number in (0, 1]"),
    "min_p": (_num_in(0, 1), "a number in [0, 1]"),
    "repetition_penalty": (_num_in(0, 2, lo_open=True), "a number in (0, 2] (1: off)"),
    "frequency_penalty": (_num_in(-2, 2), "a number in [-2, 2]"),
    "presence_penalty": (_num_in(-2, 2), "a number in [-2, 2]"),
    "seed": (lambda v: v is None or _int_in(INT64_MIN, INT64_MAX)(v), "a 64-bit signed integer (or null: unseeded)"),
    "stop": (_stop_ok, f"a string or a list of at most {MAX_STOP_STRINGS} strings, each of 1 to "
                       f"{MAX_STOP_CHARS} characters"),
    "stop_token_ids": (lambda v: isinstance(v, list) and len(v) <= MAX_STOP_TOKEN_IDS
                       and all(_int_in(0, INT32_MAX)(t) for t in v),
                       f"a list of at most {MAX_STOP_TOKEN_IDS} token ids (integers >= 0)"),
    "ignore_eos": (lambda v: type(v) is bool, "true or false"),
    "n": (_int_in(1, INT32_MAX), "an integer >= 1"),
    "logprobs": (lambda v: v is None or _int_in(0, MAX_LOGPROBS)(v),
                 f"null or an integer in [0, {MAX_LOGPROBS}] (the number of top logprobs)"),
    "skip_special_tokens": (lambda v: type(v) is bool, "true or false"),
    "json_schema": (_grammar_text_ok, f"null or a JSON schema (an object or a boolean, as JSON text) of at most "
                                      f"{MAX_GRAMMAR_CHARS} characters"),
    "regex": (_grammar_text_ok, f"null or a regular expression of 1 to {MAX_GRAMMAR_CHARS} characters"),
}


@dataclass
class SamplingParams:
    """SGLang/vLLM names. temperature 0 (or below 1e-5) is greedy; top_k -1 or 0 and top_p 1
    are off. Checked on construction: SamplingParamError names a bad field."""

    max_new_tokens: int = 128
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    n: int = 1
    logprobs: int | None = None  # None: no logprobs; k >= 0: chosen token + top-k
    skip_special_tokens: bool = True
    # structured outputs (mixq.engine.grammar): the output must match one of these
    json_schema: str | None = None  # JSON text (a dict is serialized on construction)
    regex: str | None = None

    def __post_init__(self):
        if self.stop is None:
            self.stop = []
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        if isinstance(self.stop_token_ids, tuple):
            self.stop_token_ids = list(self.stop_token_ids)
        if isinstance(self.stop, tuple):
            self.stop = list(self.stop)
        if isinstance(self.json_schema, (dict, bool)):  # the Python API and OpenAI's schema objects
            try:
                self.json_schema = json.dumps(self.json_schema, allow_nan=False)
            except (TypeError, ValueError, RecursionError) as e:
                raise SamplingParamError("json_schema", f"json_schema must be a JSON schema: {e}") from None
        self.validate()
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop, self.stop_token_ids = list(self.stop), list(self.stop_token_ids)

    def validate(self) -> None:
        """Check every field (again: the server adjusts max_new_tokens after construction)."""
        for name, (ok, accepts) in _RULES.items():
            value = getattr(self, name)
            if not ok(value):
                raise SamplingParamError(name, f"{name} must be {accepts}, got {_preview(value)}")
        if self.min_new_tokens > self.max_new_tokens:
            raise SamplingParamError("min_new_tokens", f"min_new_tokens must be in [0, max_new_tokens "
                                     f"{self.max_new_tokens}], got {self.min_new_tokens}")
        given = [f for f in GRAMMAR_FIELDS if getattr(self, f) is not None]
        if len(given) > 1:
            raise SamplingParamError(given[1], f"{given[1]} and {given[0]} both constrain the output; give one")
        if self.json_schema is not None:
            try:
                schema = json.loads(self.json_schema)
            except ValueError as e:
                raise SamplingParamError("json_schema", f"json_schema must be a JSON schema; it is not valid JSON: "
                                         f"{e}") from None
            except RecursionError:
                raise SamplingParamError("json_schema", "json_schema must be a JSON schema; it is nested too "
                                         "deeply to read") from None
            if not isinstance(schema, (dict, bool)):
                raise SamplingParamError("json_schema", f"json_schema must be a JSON schema (an object or a "
                                         f"boolean), got {_preview(schema)}")

    @property
    def constraint(self) -> tuple[str, str] | None:
        """(field, text) of the structured-output constraint, or None: the grammar's cache key."""
        for f in GRAMMAR_FIELDS:
            if getattr(self, f) is not None:
                return f, getattr(self, f)
        return None

    def renamed(self, e: SamplingParamError) -> SamplingParamError:
        """`e` (about one of this object's fields, raised after construction, e.g. by the
        grammar compiler) naming the field as the request that built it did (`from_dict`)."""
        return _renamed(e, getattr(self, "_request_names", {}).get(e.param, e.param))

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @classmethod
    def from_dict(cls, d: dict, *, aliases: dict[str, str] | None = None, max_n: int | None = None,
                  prefix: str = "") -> SamplingParams:
        """From an API request's fields. `aliases` maps a request's names onto fields (OpenAI's
        `max_tokens` and vLLM's `min_tokens` always are); null values keep the defaults;
        unknown names and `n` above `max_n` are errors. Errors name the field as the request
        did, after `prefix` (e.g. "sampling_params.")."""
        if not isinstance(d, dict):
            raise SamplingParamError(prefix.rstrip(".") or "sampling_params",
                                     f"{prefix.rstrip('.') or 'sampling_params'} must be a JSON object, "
                                     f"got {_preview(d)}")
        names = {"max_tokens": "max_new_tokens", "min_tokens": "min_new_tokens", **(aliases or {})}
        known = {f.name for f in fields(cls)}
        values, asked_as = {}, {}
        for key, v in d.items():
            name = names.get(key, key)
            if name not in known:
                raise SamplingParamError(prefix + str(key), f"unknown sampling parameter {prefix}{key!s:.60} "
                                         f"(known: {', '.join(sorted(known))})")
            if name in values and v is not None:
                raise SamplingParamError(prefix + key, f"{prefix}{key} and {prefix}{asked_as[name]} set the "
                                         "same parameter; give one")
            if v is not None:
                values[name], asked_as[name] = v, key
        given = [prefix + asked_as[f] for f in GRAMMAR_FIELDS if f in values]
        if len(given) > 1:
            raise SamplingParamError(given[1], f"{given[1]} and {given[0]} both constrain the output; give one")
        try:
            params = cls(**values)
        except SamplingParamError as e:
            raise _renamed(e, prefix + asked_as.get(e.param, e.param)) from None
        params._request_names = {name: prefix + key for name, key in asked_as.items()}
        if max_n is not None and params.n > max_n:
            asked = prefix + asked_as.get("n", "n")
            raise SamplingParamError(asked, f"{asked} must be at most {max_n} on this server (--max-n), "
                                     f"got {params.n}")
        return params


def _renamed(e: SamplingParamError, asked: str) -> SamplingParamError:
    """`e` naming its parameter `asked` (also where its message begins with the old name)."""
    msg = str(e)
    if msg.startswith(e.param):
        msg = asked + msg[len(e.param):]
    return SamplingParamError(asked, msg)
