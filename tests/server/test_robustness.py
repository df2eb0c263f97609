"""No request can stop the server, cancel another's work or leak (issue 14's defects, each
as it was reported), and the OpenAI answers that count tokens or hold back stop strings
(issue 20). The server: the tiny model behind small limits (conftest.limited_server)."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest

from mixq.engine.engine import LLM
from mixq.engine.sampling_params import SamplingParams
from tests.engine.test_streams_and_penalties import straddling_stop
from tests.server.test_server import MODEL


@pytest.fixture(scope="module")
def ref():
    return LLM(model_path=str(MODEL), device="cpu", max_total_tokens=2048, page_size=8)


def post(url, h, path, body, **kw):
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return httpx.post(f"{url}{path}", content=content, headers={**h, "Content-Type": "application/json"},
                      timeout=kw.pop("timeout", 60), **kw)


def info(url, h) -> dict:
    return httpx.get(f"{url}/get_server_info", headers=h, timeout=30).json()


def idle(url, h, timeout=20.0) -> dict:
    """Wait until nothing is in flight; the server's load then."""
    deadline = time.time() + timeout
    while True:
        s = info(url, h)
        if (s["num_requests_in_flight"], s["num_engine_requests"], s["num_running_requests"],
                s["num_waiting_requests"], s["kv_blocks_used"]) == (0, 0, 0, 0, 0) or time.time() > deadline:
            return s


def metric(url, name) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def raw_post(url, path: str, body: dict, key: str = "k") -> socket.socket:
    """Send a POST on a bare socket and return it unread: closing it is a client leaving."""
    data = json.dumps(body).encode()
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (path.encode(), key.encode(), len(data), data))
    return sock


def greedy(ref, ids, n, **kw):
    return ref.generate([ids], SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True, **kw))[0].outputs


def assert_serving(url, h):
    assert httpx.get(f"{url}/health", timeout=30).status_code == 200
    r = post(url, h, "/v1/completions", {"prompt": "the cat", "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3, r.text


def assert_error(r, status, param, *fragments):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error", err
    for f in fragments:
        assert f in err["message"], (f, err["message"])


def test_huge_top_k_and_seed_are_refused_and_leave_nothing_behind(limited_server):
    """Defects 1 and 2: a top_k past 64 bits crashed the engine thread (then 503 forever);
    a seed >= 2**64 was refused after its sequence was queued (the next request got 500)."""
    url, h = limited_server
    r = post(url, h, "/v1/completions", '{"prompt": "hi", "max_tokens": 4, "temperature": 1, '
                                        '"top_k": 100000000000000000000}')
    assert_error(r, 400, "top_k", "top_k must be -1 or 0 (off), or an integer in [1, 2147483647]")
    assert_serving(url, h)
    r = post(url, h, "/v1/completions", '{"prompt": "hi", "max_tokens": 4, "temperature": 1, '
                                        '"seed": 18446744073709551616}')
    assert_error(r, 400, "seed", "seed must be")
    r = post(url, h, "/generate", {"text": "hi", "sampling_params": {"seed": 2**64, "temperature": 1}})
    assert_error(r, 400, "sampling_params.seed", "sampling_params.seed must be")
    assert_serving(url, h)
    s = idle(url, h)
    assert (s["num_engine_requests"], s["kv_blocks_used"]) == (0, 0)


def test_a_reused_rid_neither_cancels_nor_blocks_the_running_request(limited_server, ref):
    """Defect 3: a /generate with an rid in use got a 400 and cancelled the original, which
    then hung. Ids are the server's: the rid is only echoed back, and both run to the end."""
    url, h = limited_server
    ids = ref.engine.tokenizer.encode("the cat sat")
    want = greedy(ref, ids, 300)[0].token_ids
    sp = {"max_new_tokens": 300, "temperature": 0, "ignore_eos": True}
    events: list = []

    def first():
        with httpx.stream("POST", f"{url}/generate", headers=h, timeout=120,
                          json={"input_ids": ids, "rid": "same", "stream": True, "sampling_params": sp}) as s:
            events.extend(line[6:] for line in s.iter_lines() if line.startswith("data: "))

    t = threading.Thread(target=first)
    t.start()
    deadline = time.time() + 60
    while info(url, h)["num_requests_in_flight"] == 0 and time.time() < deadline:
        time.sleep(0.02)
    r = post(url, h, "/generate", {"input_ids": ids, "rid": "same", "sampling_params": {**sp, "max_new_tokens": 5}})
    assert r.status_code == 200, r.text
    assert r.json()["meta_info"]["id"] == "same" and r.json()["output_ids"] == want[:5]
    t.join(120)
    assert not t.is_alive() and events[-1] == "[DONE]"
    last = json.loads(events[-2])
    assert last["output_ids"] == want and last["meta_info"]["id"] == "same"
    assert last["meta_info"]["finish_reason"] == {"type": "length"}


def test_bodies_over_the_limit_get_413_and_huge_prompts_are_refused_untokenized(limited_server):
    """Defect 4: no body limit, and a 20 MB prompt was tokenized on the event loop. Over
    --max-request-body-mb (1 here): 413, with or without Content-Length; a text prompt
    that cannot fit the context is refused by its length in characters, not tokenized."""
    url, h = limited_server
    big = json.dumps({"prompt": "cat " * 300_000, "max_tokens": 1})  # 1.2 MB
    r = post(url, h, "/v1/completions", big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert "--max-request-body-mb" in r.json()["error"]["message"]

    def chunks():  # chunked transfer encoding: no Content-Length to refuse up front
        for i in range(0, len(big), 65536):
            yield big[i: i + 65536].encode()

    r = httpx.post(f"{url}/v1/completions", content=chunks(), headers={**h, "Content-Type": "application/json"},
                   timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large", r.text
    r = post(url, h, "/v1/completions", {"prompt": "cat " * 200_000, "max_tokens": 1})  # 800 KB: under the limit
    assert_error(r, 400, "prompt", "maximum context length is 512 tokens; a prompt of 800000 characters cannot fit")
    r = post(url, h, "/v1/chat/completions", {"messages": [{"role": "user", "content": "cat " * 200_000}]})
    assert_error(r, 400, "messages", "messages of 800000 characters cannot fit")
    assert_serving(url, h)


def test_a_client_leaving_a_non_streaming_request_aborts_it_and_it_is_counted(limited_server):
    """Defects 5 and 11: a non-streaming request went on generating after its client left,
    and aborted requests were not counted (and leaked metrics bookkeeping). The client here
    sends the request on a bare socket and closes it once the engine holds the request."""
    url, h = limited_server
    idle(url, h)
    aborted, generated = metric(url, 'mixq_requests_total{reason="abort"}'), metric(url, "mixq_generation_tokens_total")
    sock = raw_post(url, "/v1/completions", {"prompt": "the", "max_tokens": 500, "n": 4, "ignore_eos": True})
    deadline = time.time() + 30
    while info(url, h)["num_engine_requests"] == 0 and time.time() < deadline:
        time.sleep(0.01)
    sock.close()  # 4 x 500 tokens take far longer than this
    s = idle(url, h)
    assert (s["num_requests_in_flight"], s["num_engine_requests"], s["kv_blocks_used"]) == (0, 0, 0)
    assert metric(url, 'mixq_requests_total{reason="abort"}') == aborted + 4  # its four completions
    assert metric(url, "mixq_generation_tokens_total") - generated < 4 * 500  # it did not run to its end


def test_generate_caps_n_and_returns_every_sample(limited_server, ref):
    """Defect 6: /generate had no cap on n and returned only the first sample."""
    url, h = limited_server
    ids = ref.engine.tokenizer.encode("the blue sky")
    r = post(url, h, "/generate", {"input_ids": ids, "sampling_params": {"n": 5, "max_new_tokens": 2}})
    assert_error(r, 400, "sampling_params.n", "sampling_params.n must be at most 4 on this server (--max-n), got 5")
    sp = {"n": 3, "max_new_tokens": 6, "temperature": 1.0, "seed": 7, "ignore_eos": True}
    r = post(url, h, "/generate", {"input_ids": ids, "sampling_params": sp})
    assert r.status_code == 200, r.text
    body = r.json()
    want = ref.generate([ids], SamplingParams(max_new_tokens=6, temperature=1.0, seed=7, n=3, ignore_eos=True))[0]
    assert isinstance(body, list) and [b["index"] for b in body] == [0, 1, 2]
    assert [b["output_ids"] for b in body] == [o.token_ids for o in want.outputs]
    assert len({tuple(b["output_ids"]) for b in body}) > 1  # three samples, not one repeated
    with httpx.stream("POST", f"{url}/generate", headers=h, timeout=60,
                      json={"input_ids": ids, "stream": True, "sampling_params": sp}) as s:
        events = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    last = {}
    for e in events[:-1]:
        d = json.loads(e)
        last[d["index"]] = d["output_ids"]
    assert [last[i] for i in range(3)] == [o.token_ids for o in want.outputs]


def test_temperatures_too_small_are_greedy_and_infinite_ones_refused(limited_server, ref):
    """Defect 8: temperature 1e-300 returned token 0 repeatedly; Infinity was accepted."""
    url, h = limited_server
    ids = ref.engine.tokenizer.encode("the cat sat on")
    want = greedy(ref, ids, 8)[0].token_ids
    r = post(url, h, "/generate", {"input_ids": ids, "sampling_params": {
        "max_new_tokens": 8, "temperature": 1e-300, "ignore_eos": True}})
    assert r.status_code == 200 and r.json()["output_ids"] == want, r.text
    for raw in ("Infinity", "-Infinity", "NaN"):
        r = post(url, h, "/v1/completions", f'{{"prompt": "hi", "max_tokens": 2, "temperature": {raw}}}')
        assert_error(r, 400, "temperature", "temperature must be a finite number >= 0")
    r = post(url, h, "/v1/completions", '{"prompt": "hi", "max_tokens": 2, "top_p": NaN}')
    assert_error(r, 400, "top_p", "top_p must be a number in (0, 1]")


def test_api_key_scheme_and_open_paths(limited_server):
    """Defect 10: 'bearer' in any case is the Bearer scheme (RFC 7235); /health and
    /metrics stay open (probes and scrapers carry no key, as in SGLang); every other path,
    the API and the native one, needs the key."""
    url, _ = limited_server
    for value in ("Bearer k", "bearer k", "BEARER k", "Bearer  k"):
        assert httpx.get(f"{url}/v1/models", headers={"Authorization": value}).status_code == 200, value
    for value in ("k", "Basic k", "Bearer kk", "Bearer K", "Bearer", "Bearerk"):
        r = httpx.get(f"{url}/v1/models", headers={"Authorization": value})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error", value
    for path in ("/health", "/metrics"):
        assert httpx.get(f"{url}{path}").status_code == 200
    for path in ("/get_server_info", "/get_model_info", "/memory_stats"):
        assert httpx.get(f"{url}{path}").status_code == 401
    assert httpx.post(f"{url}/generate", json={"text": "hi"}).status_code == 401


# (route, body, param, what the message must say): each names the field and what it takes
BAD_BODIES = [
    ("/v1/completions", {"prompt": 5}, "prompt", "prompt must be a string, a list of one string, a list of token ids"),
    ("/v1/completions", {"prompt": ["a", 1]}, "prompt", "prompt must be a string"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "4"}, "max_tokens", "max_tokens must be an integer in [1, "),
    ("/v1/completions", {"prompt": "x", "max_tokens": 2.5}, "max_tokens", "got 2.5"),
    ("/v1/completions", {"prompt": "x", "stop": [1]}, "stop", "stop must be a string or a list of at most 16 strings"),
    ("/v1/completions", {"prompt": "x", "logprobs": 21}, "logprobs", "logprobs must be null or an integer in [0, 20]"),
    ("/v1/completions", {"prompt": "x", "echo": "yes"}, "echo", "echo must be true or false, got 'yes'"),
    ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": 1}}, "stream_options.include_usage",
     "true or false"),
    ("/v1/completions", {"prompt": "x", "n": 0}, "n", "n must be an integer >= 1, got 0"),
    ("/v1/completions", {"prompt": "x", "min_tokens": 9, "max_tokens": 3}, "min_tokens",
     "min_tokens must be in [0, max_new_tokens 3], got 9"),
    ("/v1/chat/completions", {"messages": "hi"}, "messages", "messages must be a non-empty list of {role, content}"),
    ("/v1/chat/completions", {"messages": [{"role": "bot", "content": "x"}]}, "messages[0].role",
     "messages[0].role must be one of 'system', 'user'"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}], "top_logprobs": 2}, "top_logprobs",
     "top_logprobs needs logprobs: true"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, "temperature",
     "temperature must be a finite number >= 0 (0: greedy), got 'hot'"),
    ("/generate", {"text": "x", "sampling_params": {"max_new_tokens": "5"}}, "sampling_params.max_new_tokens",
     "sampling_params.max_new_tokens must be an integer"),  # was: '>=' not supported between 'str' and 'int'
    ("/generate", {"text": "x", "sampling_params": []}, "sampling_params",
     "sampling_params must be a JSON object of SGLang sampling parameters"),
    ("/generate", {"input_ids": ["a"]}, "input_ids", "input_ids must be a list of token ids"),
    ("/generate", {"text": "x", "sampling_params": {"temprature": 1}}, "sampling_params.temprature",
     "unknown sampling parameter sampling_params.temprature (known: "),
    ("/generate", {"text": "x", "input_ids": [1]}, "text", "give exactly one of 'text' or 'input_ids'"),
    ("/generate", {"text": 3}, "text", "text must be a string"),
]


@pytest.mark.parametrize("path, body, param, says", BAD_BODIES)
def test_every_4xx_names_the_parameter_and_what_it_accepts(limited_server, path, body, param, says):
    """Defect 13: pydantic's and Python's own text ('prompt.str: Input should be a valid
    string', "'>=' not supported between instances of 'str' and 'int'") reached clients."""
    url, h = limited_server
    r = post(url, h, path, body)
    assert_error(r, 400, param, says)
    msg = r.json()["error"]["message"]
    assert not any(s in msg for s in ("Input should", "not supported between", "<class", "Traceback")), msg


def test_top_level_body_errors(limited_server):
    url, h = limited_server
    r = post(url, h, "/v1/completions", "[1, 2]")
    assert r.status_code == 400 and r.json()["error"]["message"] == "the request body must be a JSON object, got an array"
    r = httpx.post(f"{url}/v1/completions", content='{"prompt": "x"}', headers={**h, "Content-Type": "text/plain"})
    assert r.status_code == 400 and "Content-Type: application/json" in r.json()["error"]["message"]
    r = post(url, h, "/v1/completions", '{"prompt": "x",')
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("malformed JSON body")


def test_a_full_queue_is_503_and_the_others_go_on(limited_server):
    """--max-running-requests 4 + --max-queued-requests 4: with eight long requests in
    flight a ninth is refused with SGLang's 503 'The request queue is full.'; once they
    are gone (their clients leave), requests are served again."""
    url, h = limited_server
    idle(url, h)
    socks = [raw_post(url, "/v1/completions", {"prompt": f"the cat {i}", "max_tokens": 400, "ignore_eos": True})
             for i in range(8)]
    try:
        deadline = time.time() + 60
        while info(url, h)["num_requests_in_flight"] < 8 and time.time() < deadline:
            time.sleep(0.02)
        s = info(url, h)
        assert s["num_requests_in_flight"] == 8 and s["num_running_requests"] == 4, s
        r = post(url, h, "/v1/completions", {"prompt": "late", "max_tokens": 2})
        assert r.status_code == 503 and r.json()["error"] == {
            "message": "The request queue is full.", "type": "server_error", "param": None, "code": "queue_full"}
    finally:
        for sock in socks:
            sock.close()
    s = idle(url, h)
    assert (s["num_requests_in_flight"], s["kv_blocks_used"]) == (0, 0), s
    assert_serving(url, h)


def test_usage_counts_every_choice(limited_server):
    """Issue 20: usage.completion_tokens is the sum over the n choices (here 3 x 5, all
    cut by max_tokens), streaming or not."""
    url, h = limited_server
    body = {"prompt": "the cat", "max_tokens": 5, "n": 3, "temperature": 1.0, "seed": 1, "ignore_eos": True}
    for path, extra in (("/v1/completions", {}), ("/v1/chat/completions", {})):
        b = {**body, **extra}
        if path.endswith("chat/completions"):
            b = {**{k: v for k, v in b.items() if k != "prompt"}, "messages": [{"role": "user", "content": "hi"}]}
        r = post(url, h, path, b)
        assert r.status_code == 200, r.text
        u = r.json()["usage"]
        assert len(r.json()["choices"]) == 3 and u["completion_tokens"] == 15
        assert u["total_tokens"] == u["prompt_tokens"] + 15
        with httpx.stream("POST", f"{url}{path}", headers=h, timeout=60,
                          json={**b, "stream": True, "stream_options": {"include_usage": True}}) as s:
            events = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and json.loads(events[-2])["usage"] == u


def test_a_stream_holds_back_a_partial_stop_string(limited_server, ref):
    """Issue 20: with a stop string that starts inside a token, the stream must send what
    the non-streaming answer holds, not the stop string's first characters."""
    url, h = limited_server
    tok = ref.engine.tokenizer
    ids = tok.encode("the cat sat on the mat and")
    base = greedy(ref, ids, 24)[0]
    stop, at = straddling_stop(tok, base.token_ids, base.text)
    body = {"prompt": ids, "max_tokens": 24, "temperature": 0, "ignore_eos": True, "stop": [stop]}
    whole = post(url, h, "/v1/completions", body).json()["choices"][0]
    assert whole["text"] == base.text[:at] and whole["finish_reason"] == "stop"
    with httpx.stream("POST", f"{url}/v1/completions", headers=h, timeout=60, json={**body, "stream": True}) as s:
        events = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
    chunks = [json.loads(e)["choices"][0] for e in events[:-1]]
    assert "".join(c["text"] for c in chunks) == base.text[:at], (stop, chunks)
    assert chunks[-1]["finish_reason"] == "stop"
