"""The real server in a subprocess on a free loopback port, driven by the openai client."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from mixq.engine.engine import LLM
from mixq.engine.sampling_params import SamplingParams
from tests.server.launch_utils import start_server, stop_server

ROOT = Path(__file__).parents[2]
MODEL = ROOT / "tests" / "fixtures" / "tiny-llama" / "bf16"
KEY = "test-key"


@pytest.fixture(scope="module")
def server():
    proc, url = start_server("--model-path", str(MODEL), "--api-key", KEY, "--served-model-name", "tiny",
                             "--max-total-tokens", "2048", "--page-size", "8", "--log-level", "warning")
    yield url
    # SIGTERM: graceful shutdown, engine thread stopped, exit 0
    assert "mixq: shut down cleanly" in stop_server(proc)


@pytest.fixture(scope="module")
def reference():
    return LLM(model_path=str(MODEL), device="cpu")


def client(url, key=KEY):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)


def greedy(reference, prompt_ids, n=12):
    out = reference.generate([prompt_ids], SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True))[0]
    return out.outputs[0].text


def test_completions_and_chat_equal_the_engines_greedy_output(server, reference):
    c = client(server)
    tok = reference.engine.tokenizer
    prompt = "the cat sat on the mat"
    want = greedy(reference, tok.encode(prompt))
    r = c.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    assert r.choices[0].text == want and r.usage.completion_tokens == 12
    assert r.usage.prompt_tokens == len(tok.encode(prompt))
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="tiny", prompt=prompt, max_tokens=12, temperature=0, stream=True, extra_body={"ignore_eos": True}))
    assert streamed == want

    msgs = [{"role": "user", "content": "hello there"}]
    chat_ids = tok.encode(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True),
                          add_special_tokens=False)
    want_chat = greedy(reference, chat_ids)
    r = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].message.content == want_chat and r.choices[0].message.role == "assistant"
    parts = [ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
        model="tiny", messages=msgs, max_tokens=12, temperature=0, stream=True, extra_body={"ignore_eos": True})
        if ch.choices]
    assert "".join(parts) == want_chat


def test_logprobs_n_seed_and_native_generate(server, reference):
    c = client(server)
    r = c.completions.create(model="tiny", prompt="a b c", max_tokens=4, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == 4 and all(v <= 0 for v in lp.token_logprobs)
    assert all(len(t) == 2 for t in lp.top_logprobs)
    assert max(lp.top_logprobs[0].values()) == pytest.approx(lp.token_logprobs[0], abs=1e-5)  # greedy = top-1
    r1 = c.completions.create(model="tiny", prompt="a b c", max_tokens=6, temperature=1.0, seed=3, n=2)
    r2 = c.completions.create(model="tiny", prompt="a b c", max_tokens=6, temperature=1.0, seed=3, n=2)
    assert [x.text for x in r1.choices] == [x.text for x in r2.choices] and len(r1.choices) == 2
    h = {"Authorization": f"Bearer {KEY}"}
    g = httpx.post(f"{server}/generate", headers=h, json={
        "text": "the cat", "sampling_params": {"max_new_tokens": 5, "temperature": 0, "ignore_eos": True}}).json()
    assert g["text"] == greedy(reference, reference.engine.tokenizer.encode("the cat"), 5)
    assert g["meta_info"]["completion_tokens"] == 5
    models = c.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert httpx.get(f"{server}/get_model_info", headers=h).json()["architecture"] == "LlamaForCausalLM"
    mem = httpx.get(f"{server}/memory_stats", headers=h).json()
    assert mem["compression_ratio"] > 0 and "by_format" in mem


def metric(url, name) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no metric {name}")


def kv_used(url) -> float:
    return metric(url, "mixq_kv_cache_used_blocks")


def test_32_concurrent_streams_and_an_abort_frees_blocks(server, reference):
    tok = reference.engine.tokenizer
    prompts = [" ".join(["cat", "mat", "sat", "the"][(i + j) % 4] for j in range(3 + i % 7)) for i in range(32)]
    wants = [greedy(reference, tok.encode(p), 10) for p in prompts]

    async def one(ac, p):
        s = await ac.completions.create(model="tiny", prompt=p, max_tokens=10, temperature=0, stream=True,
                                        extra_body={"ignore_eos": True})
        return "".join([ch.choices[0].text async for ch in s])

    async def main():
        ac = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)
        return await asyncio.gather(*(one(ac, p) for p in prompts))

    assert asyncio.run(main()) == wants
    baseline = kv_used(server)
    assert baseline == 0
    gen_before = metric(server, "mixq_generation_tokens_total")
    with httpx.stream("POST", f"{server}/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": "tiny", "prompt": "the cat", "max_tokens": 500, "stream": True,
                            "ignore_eos": True}, timeout=30) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i >= 2:
                break  # the client goes away mid-stream
    deadline = time.time() + 10
    while kv_used(server) != baseline and time.time() < deadline:
        time.sleep(0.05)
    assert kv_used(server) == baseline
    time.sleep(0.5)
    # aborted: it never ran to its 500 tokens
    assert metric(server, "mixq_generation_tokens_total") - gen_before < 500
    metrics = httpx.get(f"{server}/metrics").text
    assert "mixq_time_to_first_token_seconds_count" in metrics and "mixq_inter_token_latency_seconds_bucket" in metrics


@pytest.mark.parametrize("body, status, message", [
    ("{not json", 400, "malformed JSON"),
    (json.dumps({"model": "other", "prompt": "x"}), 404, "The model 'other' does not exist"),
    (json.dumps({"model": "tiny", "prompt": "x", "temperature": -1}), 400, "temperature"),
    (json.dumps({"model": "tiny", "prompt": "x", "top_p": 2}), 400, "top_p"),
    (json.dumps({"model": "tiny"}), 400, "prompt"),
    (json.dumps({"model": "tiny", "prompt": "cat " * 600}), 400, "maximum context length is 512 tokens"),
    (json.dumps({"model": "tiny", "prompt": [99999]}), 400, "token ids must be in"),
    # 300 prompt tokens + 300 requested > 512: refused, naming both parts (vLLM's rule)
    (json.dumps({"model": "tiny", "prompt": [5] * 300, "max_tokens": 300}), 400,
     "However, you requested 600 tokens (300 in the prompt, 300 in the completion)"),
    (json.dumps({"model": "tiny", "prompt": [5], "max_tokens": 512}), 400, "(1 in the prompt, 512 in the completion)"),
])
def test_errors_use_openai_error_json(server, body, status, message):
    r = httpx.post(f"{server}/v1/completions", content=body, timeout=30,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert message in err["message"] and err["type"]


def test_unknown_routes_and_methods_answer_openai_error_json(server):
    r = httpx.post(f"{server}/v1/embeddings", json={"input": "x"}, headers=H, timeout=30)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = httpx.get(f"{server}/v1/completions", headers=H, timeout=30)
    assert r.status_code == 405 and "Method Not Allowed" in r.json()["error"]["message"]


def test_api_key_is_required(server):
    with pytest.raises(openai.AuthenticationError):
        client(server, key="wrong").models.list()
    assert httpx.get(f"{server}/health").status_code == 200  # health stays open for probes


@pytest.mark.parametrize("args, message", [
    (["--device", "cuda", "--tp-size", "2", "--dp-size", "2"], "needs 4 GPUs per node but"),
    (["--model-path", "/nonexistent"], "--model-path /nonexistent: no such directory"),
    (["--enable-mixed-precision"], "--enable-mixed-precision needs --mixed-precision-config"),
    (["--mixed-precision-config", "/nonexistent.yaml"], "no such file"),
    (["--mem-fraction-static", "1.5"], "--mem-fraction-static must be in (0, 1)"),
    (["--nnodes", "2"], "--nnodes > 1 needs --dist-init-addr"),
])
def test_launcher_refusals_are_one_line_and_fast(args, message, tmp_path):
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "mixq.launch_server", *args], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and message in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr
    assert time.time() - t0 < 30


def test_config_with_errors_is_refused_before_loading(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"mixed_precision:\n  fp16_path: {MODEL}\n  weight_mapping: {{'x.weight': fp9}}\n")
    r = subprocess.run([sys.executable, "-m", "mixq", "serve", "--mixed-precision-config", str(bad)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "unknown precision 'fp9'" in r.stderr


H = {"Authorization": f"Bearer {KEY}"}


def test_requests_without_the_bearer_key_get_401(server):
    for headers in ({}, {"Authorization": KEY}, {"Authorization": "Bearer nope"}):
        r = httpx.post(f"{server}/v1/completions", headers=headers, json={"model": "tiny", "prompt": "x"})
        assert r.status_code == 401
        err = r.json()["error"]
        assert err["type"] == "authentication_error" and "API key" in err["message"]
    for path in ("/v1/models", "/get_model_info", "/get_server_info", "/memory_stats"):
        assert httpx.get(f"{server}{path}").status_code == 401, path
        assert httpx.get(f"{server}{path}", headers=H).status_code == 200, path


def test_server_info_and_memory_stats(server, reference):
    from mixq.tracking.memory import MemoryStats

    info = httpx.get(f"{server}/get_server_info", headers=H).json()
    assert (info["served_model_name"], info["page_size"], info["max_model_len"], info["max_total_tokens"]) == (
        "tiny", 8, 512, 2048)
    from mixq.engine.engine_config import cpu_has_native_bf16

    cpu_default = "bfloat16" if cpu_has_native_bf16() else "float32"  # --dtype auto on a CPU
    assert info["kv_blocks"] == 2048 // 8 and info["device"] == "cpu" and info["dtype"] == cpu_default
    assert KEY not in json.dumps(info)  # the API key is never echoed
    mem = httpx.get(f"{server}/memory_stats", headers=H).json()
    kv = mem.pop("kv_cache")
    # the same checkpoint loaded the same way in this process holds the same bytes
    want = MemoryStats.from_weights(reference.engine.weights).as_dict()
    assert mem == json.loads(json.dumps(want))
    # the KV cache in the CPU default dtype: 2 layers x (K, V) x 2 KV heads x 32 dims x its
    # bytes a token (4 float32, 2 bf16), 2048 tokens
    size = {"float32": 4, "bfloat16": 2}[cpu_default]
    assert (kv["dtype"], kv["bytes_per_token"], kv["bf16_bytes_per_token"], kv["capacity_tokens"]) == (
        cpu_default, 256 * size, 512, 2048)
    assert kv["memory_mb"] == 256 * size * 2048 / 2**20 and kv["memory_saved_mb"] == (512 - 256 * size) * 2048 / 2**20


def test_native_generate_text_ids_stream_and_errors(server, reference):
    tok = reference.engine.tokenizer
    ids = tok.encode("the blue sky")
    want = greedy(reference, ids, 6)
    sp = {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True}
    r = httpx.post(f"{server}/generate", headers=H, json={"input_ids": ids, "sampling_params": sp}).json()
    assert r["text"] == want and len(r["output_ids"]) == 6 and r["meta_info"]["prompt_tokens"] == len(ids)
    assert r["meta_info"]["finish_reason"] == {"type": "length"}
    with httpx.stream("POST", f"{server}/generate", headers=H,
                      json={"text": "the blue sky", "sampling_params": sp, "stream": True}, timeout=30) as s:
        events = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and len(events) >= 3
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["text"] == want and [len(c["output_ids"]) for c in chunks] == sorted(len(c["output_ids"]) for c in chunks)
    for body, status, msg in [({"text": "a", "input_ids": [1]}, 400, "exactly one of 'text' or 'input_ids'"),
                              ({"text": "a", "sampling_params": {"temprature": 1}}, 400, "temprature"),
                              ({"text": "a", "sampling_params": {"top_p": 0}}, 400, "top_p"),
                              ({"input_ids": [999999]}, 400, "token ids must be in")]:
        r = httpx.post(f"{server}/generate", headers=H, json=body)
        assert r.status_code == status and msg in r.json()["error"]["message"], (body, r.text)


def test_metrics_count_one_request_exactly(server, reference):
    def snap():
        text = httpx.get(f"{server}/metrics").text
        vals = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                vals[name] = float(value)
        return vals

    assert metric(server, "mixq_num_running_requests") == 0 and metric(server, "mixq_num_queue_requests") == 0
    before = snap()
    prompt = "the cat sat on a mat"
    r = client(server).completions.create(model="tiny", prompt=prompt, max_tokens=7, temperature=0,
                                          extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 7
    time.sleep(0.2)  # metrics are updated by the engine thread right after the step
    after = snap()

    def d(name):
        return after.get(name, 0) - before.get(name, 0)

    assert d("mixq_time_to_first_token_seconds_count") == 1
    assert d("mixq_inter_token_latency_seconds_count") == 6  # between 7 tokens
    assert d("mixq_e2e_request_latency_seconds_count") == 1
    assert d("mixq_generation_tokens_total") == 7
    assert d("mixq_prompt_tokens_total") == r.usage.prompt_tokens
    assert d('mixq_requests_total{reason="length"}') == 1
    assert d("mixq_time_to_first_token_seconds_sum") > 0 and after["mixq_kv_cache_usage"] == 0


def test_stop_strings_chat_logprobs_and_chat_errors(server, reference):
    c = client(server)
    tok = reference.engine.tokenizer
    prompt = "the cat sat on the mat"
    full = greedy(reference, tok.encode(prompt), 12)
    stop = full[3:6]
    r = c.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0, stop=[stop],
                             extra_body={"ignore_eos": True})
    assert r.choices[0].text == full[: full.index(stop)] and r.choices[0].finish_reason == "stop"
    r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                  temperature=0, logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == 3 and all(len(x.top_logprobs) == 2 for x in content)
    assert all(x.logprob == pytest.approx(x.top_logprobs[0].logprob, abs=1e-5) for x in content)  # greedy
    for body, status, msg in [("{oops", 400, "malformed JSON"),
                              (json.dumps({"model": "tiny", "messages": []}), 400, "messages"),
                              (json.dumps({"model": "nope", "messages": [{"role": "user", "content": "x"}]}), 404,
                               "The model 'nope' does not exist"),
                              (json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                                           "max_tokens": 0}), 400, "max_tokens")]:
        r = httpx.post(f"{server}/v1/chat/completions", content=body,
                       headers={**H, "Content-Type": "application/json"})
        assert r.status_code == status and msg in r.json()["error"]["message"], (body, r.text)


def test_a_repeated_prompt_reuses_its_cached_blocks(server, reference):
    """The second request of the same 40-odd-token prompt computes only what follows its
    whole cached pages (page size 8; the last prompt token is always computed): /metrics
    counts those tokens as cached, and the answer is the engine's greedy one."""
    tok = reference.engine.tokenizer
    prompt = "you are a helpful assistant and you answer briefly " * 4 + "the cat sat on"
    n = len(tok.encode(prompt))
    want = greedy(reference, tok.encode(prompt), 5)
    c = client(server)
    c.completions.create(model="tiny", prompt=prompt, max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    time.sleep(0.2)  # metrics are updated by the engine thread right after the step
    before = metric(server, "mixq_cached_tokens")
    r = c.completions.create(model="tiny", prompt=prompt, max_tokens=5, temperature=0,
                             extra_body={"ignore_eos": True})
    time.sleep(0.2)
    assert r.choices[0].text == want and r.usage.prompt_tokens == n
    assert metric(server, "mixq_cached_tokens") - before == (n - 1) // 8 * 8
    assert 0 < metric(server, "mixq_cache_hit_rate") < 1
