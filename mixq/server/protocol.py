"""OpenAI-compatible and SGLang-native request bodies.

pydantic checks each body's shape (strict types: no string-to-number coercion); every
field's `description` says what it accepts, and mixq.server.errors quotes it when a value
is refused. Sampling values are passed through untouched (`Any`) to
`SamplingParams.from_dict`, the one place that checks them, via `sampling_params()`.

Structured outputs: OpenAI's `response_format` (`json_object`: any JSON object;
`json_schema`: its `schema`) becomes `SamplingParams.json_schema`, named in errors as the
request gave it (`response_format.json_schema.schema`); SGLang's `regex` and `json_schema`
are passed through like the other sampling fields (on `/generate`, inside
`sampling_params`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from mixq.engine.sampling_params import SamplingParamError, SamplingParams

_CHECKED = "checked as a sampling parameter"
# the OpenAI routes' sampling fields passed as they are (max_tokens, logprobs: see _params)
_SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "n", "stop", "stop_token_ids", "seed",
                    "presence_penalty", "frequency_penalty", "repetition_penalty", "ignore_eos", "min_tokens",
                    "skip_special_tokens", "regex", "json_schema")
# OpenAI's json_object: any JSON object (as vLLM and SGLang compile it)
JSON_OBJECT_SCHEMA = '{"type": "object"}'



class _Req(BaseModel):
    # Unknown fields are ignored, as OpenAI-compatible servers do (clients send extras).
    model_config = ConfigDict(extra="ignore", strict=True)


def _s(desc: str = _CHECKED) -> Any:
    return Field(default=None, description=desc)


class _Sampling(_Req):
    """The sampling fields both OpenAI routes take (OpenAI's, plus vLLM/SGLang extras)."""

    model: str | None = Field(default=None, description="the served model's name (GET /v1/models)")
    max_tokens: Any = _s()
    max_completion_tokens: Any = _s()
    temperature: Any = _s()
    top_p: Any = _s()
    top_k: Any = _s()
    min_p: Any = _s()
    n: Any = _s()
    stop: Any = _s()
    stop_token_ids: Any = _s()
    seed: Any = _s()
    presence_penalty: Any = _s()
    frequency_penalty: Any = _s()
    repetition_penalty: Any = _s()
    ignore_eos: Any = _s()
    min_tokens: Any = _s()
    skip_special_tokens: Any = _s()
    regex: Any = _s()
    json_schema: Any = _s()
    response_format: ResponseFormat | None = Field(
        default=None, description='{"type": "text"}, {"type": "json_object"} or {"type": "json_schema", '
                                  '"json_schema": {"name": ..., "schema": {...}}}')
    stream: bool = Field(default=False, description="true or false")
    stream_options: StreamOptions | None = Field(default=None, description='an object such as {"include_usage": true}')
    user: str | None = Field(default=None, description="a string")

    @property
    def explicit_max_tokens(self) -> bool:
        return self.max_completion_tokens is not None or self.max_tokens is not None

    def _params(self, logprobs: tuple[str, Any], max_n: int | None) -> SamplingParams:
        d = {k: getattr(self, k) for k in _SAMPLING_FIELDS}
        # max_completion_tokens is OpenAI's newer name for max_tokens; it wins when both are set
        key = "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"
        d[key] = getattr(self, key) if self.explicit_max_tokens else 16
        d["temperature"] = 1.0 if self.temperature is None else self.temperature
        d[logprobs[0]] = logprobs[1]
        aliases = {"max_completion_tokens": "max_new_tokens", "top_logprobs": "logprobs"}
        rf = self.response_format
        if rf is not None and rf.type != "text":
            # the name errors give: a missing schema is the request's, a refused one is its schema's
            name = "response_format" if rf.type == "json_object" else "response_format.json_schema.schema"
            if rf.type == "json_object":
                d[name] = JSON_OBJECT_SCHEMA
            elif rf.json_schema is None or rf.json_schema.schema_ is None:
                raise SamplingParamError(name, f"{name} is required with response_format type json_schema: "
                                         "a JSON schema (a JSON object)")
            else:
                d[name] = rf.json_schema.schema_
            aliases[name] = "json_schema"
        return SamplingParams.from_dict(d, aliases=aliases, max_n=max_n)


class JsonSchemaFormat(_Req):
    """OpenAI's response_format.json_schema."""

    model_config = ConfigDict(extra="ignore", strict=True, populate_by_name=True)
    name: str | None = Field(default=None, description="a string (the schema's name)")
    description: str | None = Field(default=None, description="a string")
    schema_: Any = Field(default=None, alias="schema", description="a JSON schema (a JSON object)")
    strict: bool | None = Field(default=None, description="true or false (outputs always follow the schema)")


class ResponseFormat(_Req):
    type: Literal["text", "json_object", "json_schema"] = Field(
        description="one of 'text', 'json_object', 'json_schema'")
    json_schema: JsonSchemaFormat | None = Field(
        default=None, description='an object {"name": ..., "schema": {...}} (with type json_schema)')


class StreamOptions(_Req):
    include_usage: bool = Field(default=False, description="true or false")


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="a string, a list of one string, a list of token ids, or a list of one list of token ids")
    logprobs: Any = _s()
    echo: bool = Field(default=False, description="true or false")

    def sampling_params(self, max_n: int | None = None) -> SamplingParams:
        return self._params(("logprobs", self.logprobs), max_n)


class ChatMessage(_Req):
    role: Literal["system", "user", "assistant", "tool", "developer"] = Field(
        description="one of 'system', 'user', 'assistant', 'tool', 'developer'")
    content: str | list[ContentPart] | None = Field(
        default=None, description='a string, null, or a list of {"type": "text", "text": ...} parts')


class ContentPart(_Req):
    type: str = Field(description="a string ('text' parts are read, others ignored)")
    text: str | None = Field(default=None, description="a string")


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, description="a non-empty list of {role, content} objects")
    logprobs: bool = Field(default=False, description="true or false")
    top_logprobs: Any = _s()
    add_generation_prompt: bool = Field(default=True, description="true or false")

    def sampling_params(self, max_n: int | None = None) -> SamplingParams:
        # chat's logprobs is a switch; top_logprobs is the count (0 when only the switch is on)
        if self.logprobs:
            value = 0 if self.top_logprobs is None else self.top_logprobs
        elif self.top_logprobs is not None:
            raise SamplingParamError("top_logprobs", "top_logprobs needs logprobs: true")
        else:
            value = None
        return self._params(("top_logprobs", value), max_n)


class GenerateRequest(_Req):
    """SGLang's native /generate."""

    text: str | None = Field(default=None, description="a string (give text or input_ids, not both)")
    input_ids: list[int] | None = Field(default=None, description="a list of token ids (give text or input_ids, not both)")
    sampling_params: dict[str, Any] = Field(default_factory=dict,
                                            description="a JSON object of SGLang sampling parameters")
    stream: bool = Field(default=False, description="true or false")
    rid: str | None = Field(default=None, description="a string (echoed as meta_info.id)")

    def params(self, max_n: int | None = None) -> SamplingParams:
        return SamplingParams.from_dict(self.sampling_params, max_n=max_n, prefix="sampling_params.")


_Sampling.model_rebuild()
ChatMessage.model_rebuild()
