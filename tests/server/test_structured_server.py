"""Structured outputs through the real server: OpenAI's response_format (json_schema,
json_object) with the openai client on both OpenAI routes, streamed and not; SGLang's
regex / json_schema on /generate; refused constraints are 400s naming the field, and the
server keeps serving. Outputs are checked with jsonschema and Python's re, not the engine."""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pytest

from tests.server.launch_utils import start_server, stop_server

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 5},
                                           "n": {"type": "integer", "minimum": 1, "maximum": 9},
                                           "ok": {"type": "boolean"}},
          "required": ["name", "n", "ok"]}
REGEX = r"[a-z]{2,4}-[0-9]{1,3}"


@pytest.fixture(scope="module")
def server(byte_model):
    proc, url = start_server("--model-path", str(byte_model), "--served-model-name", "m", "--max-total-tokens", "2048",
                             "--page-size", "8", "--log-level", "warning")
    yield url
    out = stop_server(proc)
    assert "mixq: shut down cleanly" in out and "Traceback" not in out, out[-3000:]


def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)


def test_response_format_and_generate_constraints(server):
    c = client(server)
    fmt = {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA, "strict": True}}
    msgs = [{"role": "user", "content": "a thing"}]
    r = c.chat.completions.create(model="m", messages=msgs, max_tokens=60, temperature=1.0, seed=1, n=2,
                                  response_format=fmt)
    for ch in r.choices:
        assert ch.finish_reason == "stop"
        jsonschema.validate(json.loads(ch.message.content), SCHEMA)
    parts = [ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
        model="m", messages=msgs, max_tokens=60, temperature=0, stream=True, response_format=fmt) if ch.choices]
    jsonschema.validate(json.loads("".join(parts)), SCHEMA)

    r = c.completions.create(model="m", prompt="{", max_tokens=60, temperature=0.7, seed=2,
                             extra_body={"response_format": {"type": "json_object"}})
    if r.choices[0].finish_reason == "stop":  # an open-ended object may run out of tokens
        assert isinstance(json.loads(r.choices[0].text), dict)
    else:
        assert r.choices[0].text.startswith("{") and r.choices[0].finish_reason == "length"

    g = httpx.post(f"{server}/generate", json={"text": "id:", "sampling_params": {
        "max_new_tokens": 20, "temperature": 1.0, "regex": REGEX}}, timeout=60).json()
    assert re.fullmatch(REGEX, g["text"]) and g["meta_info"]["finish_reason"]["type"] == "stop", g
    g = httpx.post(f"{server}/generate", json={"text": "json:", "sampling_params": {
        "max_new_tokens": 60, "temperature": 0, "json_schema": json.dumps(SCHEMA)}}, timeout=60).json()
    jsonschema.validate(json.loads(g["text"]), SCHEMA)


@pytest.mark.parametrize("route, body, param, message", [
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"type": 5}}}}}},
     "response_format.json_schema.schema", "is not a JSON schema the grammar library (xgrammar) accepts"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format.json_schema.schema", "is required with response_format type json_schema"),
    ("/v1/completions", {"response_format": {"type": "yaml"}}, "response_format.type", "must be one of"),
    ("/v1/completions", {"regex": "[a-", "json_schema": None}, "regex", "is not a regular expression"),
    ("/generate", {"sampling_params": {"regex": "(a|"}}, "sampling_params.regex", "is not a regular expression"),
    ("/generate", {"sampling_params": {"json_schema": "{\"type\": "}}, "sampling_params.json_schema",
     "not valid JSON"),
    ("/generate", {"sampling_params": {"json_schema": "{}", "regex": "a"}}, "sampling_params.regex",
     "both constrain the output"),
])
def test_a_refused_constraint_is_a_400_naming_it_and_the_server_keeps_serving(server, route, body, param, message):
    base = {"/v1/chat/completions": {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
            "/v1/completions": {"model": "m", "prompt": "hi"}, "/generate": {"text": "hi"}}[route]
    r = httpx.post(f"{server}{route}", json={**base, **body}, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and message in err["message"] and param in err["message"], err
    ok = httpx.post(f"{server}/generate", json={"text": "hi", "sampling_params": {"max_new_tokens": 3}}, timeout=60)
    assert ok.status_code == 200 and httpx.get(f"{server}/health").status_code == 200
    info = httpx.get(f"{server}/get_server_info").json()
    assert info["num_requests_in_flight"] == 0 and info["kv_blocks_used"] == 0
