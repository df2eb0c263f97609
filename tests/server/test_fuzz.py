"""Property-based fuzzing of the running server (hypothesis): generated bodies for the three
generation routes — valid, out of range, wrong-typed, huge, nested, not JSON at all — and
after every one: the status is 2xx, or 4xx with OpenAI's error JSON naming the problem in
words (never pydantic's or Python's own text); a stream is well-formed SSE ending in
[DONE]; /health is 200. Once all have ended, the KV cache is back to its idle free-block
count and no request is left anywhere.

Bounded and repeatable for CI: derandomized (the same examples every run), no example
database, at most MAX_EXAMPLES requests and BUDGET_S seconds (past it the remaining
examples are skipped, not failed). The server: conftest.limited_server (the tiny model).
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter

import httpx
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.server.test_robustness import idle

MAX_EXAMPLES = 200
BUDGET_S = 60.0
FORBIDDEN = ("Input should", "not supported between", "Traceback", "<class", "object has no attribute")

BOUNDARY_INTS = [-(2**63) - 1, -(2**63), -2, -1, 0, 1, 2, 3, 4, 5, 16, 17, 20, 21, 255, 256, 511, 512, 513,
                 2**31 - 1, 2**31, 2**63 - 1, 2**63, 2**64, 10**30]
BOUNDARY_FLOATS = [0.0, -0.0, 1e-300, 1e-6, 0.1, 0.5, 0.99, 1.0, 1.5, 2.0, 2.01, -1.0, -2.0, -2.5, 1e300,
                   math.inf, -math.inf, math.nan]
scalar = st.one_of(st.none(), st.booleans(), st.sampled_from(BOUNDARY_INTS), st.sampled_from(BOUNDARY_FLOATS),
                   st.text(max_size=12))
junk = st.recursive(scalar, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                          max_size=3), max_leaves=8)


text = st.one_of(st.text(max_size=40), st.sampled_from(["the cat sat on the mat", "", "\x00\ud7ff\U0001f642",
                                                         "cat " * 3000]))
good_text = st.one_of(st.text(min_size=1, max_size=30), st.just("the cat sat on the mat"))
token_ids = st.lists(st.integers(0, 300), max_size=12)  # the vocabulary is 256: some are out of range
good_ids = st.lists(st.integers(1, 255), min_size=1, max_size=12)

# each sampling field: values it accepts, and values it must refuse (boundaries past the
# range, wrong types, huge, nested)
GOOD = {
    "temperature": st.one_of(st.sampled_from([0, 0.0, 1e-300, 0.7, 1.0, 1e300]), st.floats(0, 2)),
    "top_p": st.one_of(st.just(1), st.floats(0.05, 1.0)),
    "top_k": st.sampled_from([-1, 0, 1, 5, 255, 256, 2**31 - 1]),
    "min_p": st.sampled_from([0, 0.0, 0.05, 0.5, 1.0]),
    "n": st.integers(1, 4),
    "stop": st.one_of(st.none(), good_text.map(lambda t: t[:5]), st.lists(st.text(min_size=1, max_size=6),
                                                                            max_size=3)),
    "stop_token_ids": st.lists(st.integers(0, 300), max_size=3),
    "seed": st.one_of(st.none(), st.sampled_from([-(2**63), -1, 0, 1, 2**63 - 1])),
    "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2),
    "repetition_penalty": st.one_of(st.just(1.0), st.floats(0.1, 2)),
    "ignore_eos": st.booleans(),
    "min_tokens": st.integers(0, 1),
    "skip_special_tokens": st.booleans(),
    "regex": st.sampled_from(["[a-z]+", "(the|a)[a-z]*"]),  # structured outputs (the vocabulary is words)
}
def pick(values: list):
    """One of `values`, about evenly (sampled_from favours the first ones)."""
    return st.permutations(values).map(lambda p: p[0])


# values each must refuse: past its range, wrong types, huge, nested (never null or a
# value some other reading would accept)
BAD = {
    "temperature": pick([-1e-9, -1, math.inf, -math.inf, math.nan, "1", True, [1.0]]),
    "top_p": pick([0, -0.1, 1.0000001, 2, math.nan, "0.5", {"p": 1}]),
    "top_k": pick([-2, 2**31, 2**64, 10**30, 1.0, "5", False]),
    "min_p": pick([-0.1, 1.5, math.nan, "0"]),
    "n": pick([0, -1, 5, 1000, 2**64, 1.0, True, "2"]),
    "stop": st.one_of(pick([[""], "", "y" * 300, [1], {"s": "x"}, 5]),
                      st.lists(st.text(min_size=1, max_size=2), min_size=17, max_size=18)),
    "stop_token_ids": pick([[-1], [1.5], "1", [2**31], list(range(1025)), 7]),
    "seed": pick([2**63, 2**64, -(2**63) - 1, 1.5, "3", True]),
    "presence_penalty": pick([2.5, -3, math.inf, math.nan, "0"]),
    "frequency_penalty": pick([2.01, -2.01, -math.inf, "1"]),
    "repetition_penalty": pick([0, -1, 2.5, math.inf, "1"]),
    "ignore_eos": pick([1, "true", [True]]),
    "min_tokens": pick([-1, 2**31, "1", 10**9]),
    "skip_special_tokens": pick([0, "false"]),
    "regex": pick(["(a|", "", "[z-a]", 5, ["a"], "x" * 131073]),
}


@st.composite
def sampling(draw, max_name: str, mode: str) -> tuple[dict, str | None]:
    """The request's sampling fields and the one spoiled: all valid ("valid"), valid but
    one ("one_bad"), or anything at all ("chaos")."""
    good = {**GOOD, max_name: st.integers(1, 8)}
    bad = {**BAD, max_name: pick([0, -1, 2**31, 1.0, "4", [4], True])}
    names = draw(st.lists(st.sampled_from(sorted(good)), min_size=mode == "one_bad", max_size=6, unique=True))
    if max_name not in names and draw(pick([True] * 9 + [False])):
        names.append(max_name)  # mostly bounded: a default of 128 tokens x n would be slow
    out = {}
    spoil = draw(pick(names)) if mode == "one_bad" and names else None
    for k in names:
        if mode == "chaos":
            out[k] = draw(st.one_of(good[k], bad[k], junk))
        else:
            out[k] = draw(bad[k] if k == spoil else good[k])
    return out, spoil


@st.composite
def completion(draw, mode: str):
    p = draw(st.one_of(good_text, good_ids) if mode != "chaos" else st.one_of(text, token_ids, junk, st.lists(
        text, min_size=1, max_size=2), st.lists(token_ids, max_size=2)))
    fields, spoil = draw(sampling("max_tokens", mode))
    body = {"prompt": p, **fields}
    extra = {"stream": st.booleans(), "echo": st.booleans(), "logprobs": st.integers(0, 5),
             "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()})}
    for k in draw(st.lists(st.sampled_from(sorted(extra)), max_size=3, unique=True)):
        body[k] = draw(extra[k] if mode != "chaos" else st.one_of(extra[k], junk))
    return mode, spoil, "/v1/completions", body


message = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system"])}, optional={
    "content": st.one_of(good_text, st.none(), st.lists(st.fixed_dictionaries(
        {"type": st.sampled_from(["text", "image_url"])}, optional={"text": good_text}), max_size=2))})


@st.composite
def chat(draw, mode: str):
    msgs = draw(st.lists(message, min_size=1, max_size=3) if mode != "chaos" else st.one_of(
        st.lists(message, max_size=3), junk, st.lists(junk, max_size=2)))
    fields, spoil = draw(sampling("max_tokens", mode))
    body = {"messages": msgs, **fields}
    extra = {"stream": st.booleans(), "logprobs": st.booleans(), "top_logprobs": st.integers(0, 3)}
    if mode == "chaos":
        extra["model"] = st.sampled_from(["bf16", "other"])
    for k in draw(st.lists(st.sampled_from(sorted(extra)), max_size=2, unique=True)):
        body[k] = draw(extra[k] if mode != "chaos" else st.one_of(extra[k], junk))
    if "top_logprobs" in body and mode != "chaos":
        body["logprobs"] = True  # OpenAI: top_logprobs needs logprobs
    return mode, spoil, "/v1/chat/completions", body


@st.composite
def native(draw, mode: str):
    if mode == "chaos":
        src = draw(st.one_of(st.fixed_dictionaries({"text": st.one_of(text, junk)}), st.just({}),
                             st.fixed_dictionaries({"input_ids": st.one_of(token_ids, junk)}),
                             st.fixed_dictionaries({"text": text, "input_ids": token_ids})))
    else:
        src = draw(st.one_of(st.fixed_dictionaries({"text": good_text}),
                             st.fixed_dictionaries({"input_ids": good_ids})))
    sp, spoil = draw(sampling("max_new_tokens", mode))
    if mode == "chaos" and draw(st.booleans()):
        sp = draw(junk)
    body = {**src, "sampling_params": sp}
    for k, v in (("stream", st.booleans()), ("rid", st.text(max_size=8))):
        if draw(st.booleans()):
            body[k] = draw(v if mode != "chaos" else st.one_of(v, junk))
    return mode, spoil and f"sampling_params.{spoil}", "/generate", body


# a body may also be no JSON object at all, or not JSON
raw = st.tuples(st.just("chaos"), st.none(), st.sampled_from(["/v1/completions", "/v1/chat/completions", "/generate"]),
                st.one_of(junk.map(json.dumps), st.sampled_from(['{"prompt": "x",', "", "nul\x00l", '{"prompt": "x"}' * 2])))
request = pick(["valid", "valid", "one_bad", "one_bad", "chaos"]).flatmap(
    lambda mode: st.one_of(completion(mode), chat(mode), native(mode))) | raw


def check_response(r: httpx.Response, stream: bool, body) -> None:
    assert 200 <= r.status_code < 300 or 400 <= r.status_code < 500, (r.status_code, body, r.text[:500])
    if r.status_code >= 400:
        err = r.json()["error"]
        assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str), err
        assert set(err) == {"message", "type", "param", "code"}, err
        assert not any(f in err["message"] for f in FORBIDDEN), (body, err["message"])
        return
    if not stream:
        doc = r.json()
        assert isinstance(doc, (dict, list)), doc
        return
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert events and events[-1] == "[DONE]", r.text[-500:]
    for e in events[:-1]:
        assert "error" not in json.loads(e), e  # error events are for a stopping engine only


def test_fuzzed_requests_never_break_the_server(limited_server):
    url, h = limited_server
    s = idle(url, h)
    idle_free = s["kv_blocks"] - s["kv_blocks_used"]
    started = time.monotonic()
    sent = []

    @settings(max_examples=MAX_EXAMPLES, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(req=request, wrong_key=st.sampled_from([False] * 9 + [True]))  # simplest (likeliest) first
    # the reports that opened issue 14, always tried first
    @example(req=("one_bad", "top_k", "/v1/completions", {"prompt": "hi", "max_tokens": 4, "temperature": 1,
                                                          "top_k": 10**20}), wrong_key=False)
    @example(req=("one_bad", "seed", "/v1/completions", {"prompt": "hi", "max_tokens": 4, "temperature": 1,
                                                         "seed": 2**64}), wrong_key=False)
    @example(req=("one_bad", "temperature", "/v1/completions", {"prompt": "hi", "max_tokens": 4,
                                                                "temperature": math.inf}), wrong_key=False)
    @example(req=("valid", None, "/generate", {"text": "hi", "sampling_params": {"max_new_tokens": 3,
                                                                                  "temperature": 1e-300}}),
             wrong_key=False)
    def one(req, wrong_key):
        if time.monotonic() - started > BUDGET_S:
            return  # bounded in time: the rest are skipped, not failed
        mode, spoil, path, body = req
        auth = {"Authorization": "Bearer nope"} if mode == "chaos" and wrong_key else h
        content = body if isinstance(body, str) else json.dumps(body)
        stream = isinstance(body, dict) and body.get("stream") is True
        r = httpx.post(f"{url}{path}", content=content.encode(), timeout=120,
                       headers={**auth, "Content-Type": "application/json"})
        sent.append((mode, r.status_code))
        check_response(r, stream, body)
        if mode == "valid":  # every valid request is served
            assert r.status_code == 200, (body, r.text[:500])
        elif mode == "one_bad" and spoil is not None:  # refused, naming the one bad field
            assert r.status_code == 400 and r.json()["error"]["param"] == spoil, (body, spoil, r.text[:500])
        assert httpx.get(f"{url}/health", timeout=30).status_code == 200, body

    one()
    s = idle(url, h)
    assert (s["num_requests_in_flight"], s["num_engine_requests"], s["num_running_requests"],
            s["num_waiting_requests"]) == (0, 0, 0, 0), s
    assert s["kv_blocks"] - s["kv_blocks_used"] == idle_free == s["kv_blocks"], s  # every block is free again
    # the mix exercised both sides: generation and refusals
    served = sum(200 <= c < 300 for _, c in sent)
    assert len(sent) >= 50 and served >= 15 and len(sent) - served >= 15, Counter(sent)
