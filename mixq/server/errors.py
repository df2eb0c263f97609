"""The server's errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

Every 4xx names the parameter and what it accepts. Request bodies are checked by pydantic
(mixq.server.protocol) for their shape and by `SamplingParams` for sampling values; this
module turns either kind of refusal into one readable line, never pydantic's own text.
"""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse
from pydantic import BaseModel


class APIError(Exception):
    """An error answered with `status` and OpenAI's error JSON (type from the status unless given)."""

    def __init__(self, status: int, message: str, type_: str | None = None, param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def error_body(status: int, message: str, type_: str | None = None, param=None, code=None) -> dict:
    type_ = type_ or ("invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(status: int, message: str, type_: str | None = None, param=None, code=None) -> JSONResponse:
    return JSONResponse(error_body(status, message, type_, param, code), status_code=status)


def _preview(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def _models_in(annotation) -> list[type[BaseModel]]:
    """The pydantic models an annotation holds (list[Model], Model | None, ...)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for a in getattr(annotation, "__args__", ()) or () for m in _models_in(a)]


def _field_at(model: type[BaseModel] | None, loc: list) -> tuple[str, str | None, str]:
    """Walk pydantic's error location through the request model: ('messages', 0, 'role',
    'str') -> ("messages[0].role", its description, ""). Location parts that name no field
    (a union member such as 'str' or 'list[int]') end the walk; list indices after the last
    field come back apart ("[3]": the bad item of a list field)."""
    name, desc, tail = "", None, ""
    for p in loc:
        if isinstance(p, int):
            if name:
                tail += f"[{p}]"
            continue
        f = model.model_fields.get(p) if model is not None else None
        if f is None:
            break
        name, tail = (f"{name}{tail}.{p}" if name else p), ""
        desc = f.description
        models = _models_in(f.annotation)
        model = models[0] if models else None
    return name, desc, tail


def _parameter_message(error: dict, route) -> tuple[str, str]:
    """A bad query/path/header parameter: its name, what it accepts (the `description` the
    route gave it) and what it got."""
    where, name = error["loc"][0], str(error["loc"][1])
    desc = None
    dependant = getattr(route, "dependant", None)
    for p in (getattr(dependant, f"{where}_params", None) or []):
        if p.name == name or getattr(p, "alias", None) == name:
            desc = p.field_info.description
    if error.get("type") == "missing":
        return f"{where} parameter {name} is required" + (f": {desc}" if desc else ""), name
    got = f"got {_preview(error.get('input'))}"
    return (f"{where} parameter {name} must be {desc}, {got}" if desc else
            f"{where} parameter {name} has an invalid value: {got}"), name


def validation_message(errors: list[dict], model: type[BaseModel] | None, route=None) -> tuple[str, str | None]:
    """(message, param) for pydantic's errors on a request of `model` (its body) and
    `route` (its parameters): the first bad field, what it accepts (its `description`) and
    what it got."""
    if not errors:
        return "invalid request", None
    first = errors[0]
    kind = first.get("type", "")
    if len(first.get("loc", ())) >= 2 and first["loc"][0] in ("query", "path", "header", "cookie"):
        return _parameter_message(first, route)
    if kind == "json_invalid":
        return f"malformed JSON body: {first.get('ctx', {}).get('error', 'not valid JSON')}", None
    loc = [p for p in first.get("loc", ()) if p != "body"]
    if kind == "extra_forbidden":
        name = ".".join(str(p) for p in loc)
        return f"unknown field {name!r:.80}", name
    param, accepts, item = _field_at(model, loc)
    if not param:
        got = first.get("input")
        if isinstance(got, (bytes, str)):  # not parsed as JSON: the Content-Type said otherwise
            return "the request body must be a JSON object sent with 'Content-Type: application/json'", None
        kind_of = {list: "an array", int: "a number", float: "a number", bool: "a boolean", type(None): "null"}
        return f"the request body must be a JSON object, got {kind_of.get(type(got), type(got).__name__)}", None
    if kind == "missing":
        return f"{param} is required" + (f": {accepts}" if accepts else ""), param
    got = first.get("input")
    got = f"{param}{item} is {_preview(got)}" if item else f"got {_preview(got)}"
    if accepts:
        return f"{param} must be {accepts}; {got}" if item else f"{param} must be {accepts}, {got}", param
    return f"{param} has an invalid value: {got}", param
