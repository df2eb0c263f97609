"""The launcher and the server's life: --help lists every flag, bad flags are one line,
--allow-auto-truncate, the queue gauge, graceful and forced shutdown with streams in
flight (exit code, every stream ended, no process left behind), and the README's
newcomer path on the embedded default model."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from mixq.engine.engine import LLM
from mixq.engine.sampling_params import SamplingParams
from tests.server.launch_utils import free_port, start_server
from tests.server.test_server import MODEL, metric

ROOT = Path(__file__).parents[2]
# MISSION.md's launch flags, plus the three issue 4 adds
MISSION_FLAGS = ("--model-path --mixed-precision-config --enable-mixed-precision --tp-size --dp-size --ep-size "
                 "--enable-ep-moe --dtype --max-running-requests --max-total-tokens --chunked-prefill-size "
                 "--mem-fraction-static --kv-cache-dtype --host --port --trust-remote-code --disable-cuda-graph "
                 "--dist-init-addr --nnodes --node-rank --api-key --served-model-name --log-level").split()


def test_help_documents_every_flag():
    r = subprocess.run([sys.executable, "-m", "mixq", "serve", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0
    documented = set(re.findall(r"^\s+(--[a-z-]+)", r.stdout, re.M))  # flags with a help entry
    assert set(MISSION_FLAGS) <= documented, set(MISSION_FLAGS) - documented
    r2 = subprocess.run([sys.executable, "-m", "mixq.launch_server", "--help"], capture_output=True, text=True,
                        timeout=60)
    assert r2.stdout == r.stdout


@pytest.mark.parametrize("args, message", [
    (["--tp-size", "two"], "argument --tp-size: invalid int value: 'two'"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--port"], "argument --port: expected one argument"),
])
def test_bad_flags_are_one_line(args, message):
    r = subprocess.run([sys.executable, "-m", "mixq", "serve", *args], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and message in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr


def test_config_errors_found_by_the_plan_are_one_line_before_loading(tmp_path):
    """A mapping key matching no tensor is found from headers, before any weight is read."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"mixed_precision:\n  fp16_path: {MODEL}\n  weight_mapping: {{'model.layers.*.mlp.gate.weight': bf16}}\n")
    r = subprocess.run([sys.executable, "-m", "mixq", "serve", "--mixed-precision-config", str(bad), "--device", "cpu"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert "weight_mapping['model.layers.*.mlp.gate.weight']: pattern matches no tensor" in r.stderr
    assert "loading weights" not in r.stdout + r.stderr


def descendants(pid: int) -> set[int]:
    """Every live process whose parent chain reaches pid (from /proc)."""
    parent = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    out, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, pp in parent.items() if pp in frontier} - out
        out |= frontier
    return out


def alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def start(*args, env=None) -> tuple[subprocess.Popen, str]:
    return start_server(*args, env=env)


class Streams:
    """n concurrent SSE completions in threads; records events and how each ended."""

    def __init__(self, url, n, max_tokens):
        self.events = [[] for _ in range(n)]
        self.errors: list = [None] * n
        self.threads = [threading.Thread(target=self._run, args=(url, i, max_tokens)) for i in range(n)]
        for t in self.threads:
            t.start()

    def _run(self, url, i, max_tokens):
        body = {"prompt": f"the cat {i}", "max_tokens": max_tokens, "stream": True, "ignore_eos": True}
        try:
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        self.events[i].append(line[6:])
        except httpx.HTTPError as e:
            self.errors[i] = e

    def join(self):
        for t in self.threads:
            t.join(180)
        assert not any(t.is_alive() for t in self.threads)


def wait_for(cond, timeout=60.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return False


def test_truncation_queue_and_graceful_sigterm_with_streams_in_flight():
    proc, url = start("--model-path", str(MODEL), "--max-running-requests", "2", "--allow-auto-truncate",
                      "--max-total-tokens", "4096", "--page-size", "8", "--served-model-name", "tiny")
    try:
        # --allow-auto-truncate: an over-long prompt keeps its last max_model_len - 1 tokens.
        # Its head and tail differ, and echo returns the prompt the model saw: the test can
        # tell which end was kept.
        ref = LLM(model_path=str(MODEL), device="cpu")
        tok = ref.engine.tokenizer
        long_ids = tok.encode("the cat sat on the mat " * 60) + tok.encode("a blue house under a red sky " * 60,
                                                                            add_special_tokens=False)
        assert len(long_ids) > 600 and tok.decode(long_ids[-511:]) != tok.decode(long_ids[:511])
        r = httpx.post(f"{url}/v1/completions", timeout=60, json={
            "model": "tiny", "prompt": long_ids, "max_tokens": 4, "temperature": 0, "echo": True})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["usage"]["prompt_tokens"] == 511
        assert body["usage"]["completion_tokens"] == 1  # max_tokens clipped to the one position left
        want = ref.generate([long_ids[-511:]], SamplingParams(max_new_tokens=4, temperature=0))[0].outputs[0]
        assert body["choices"][0]["text"] == tok.decode(long_ids[-511:]) + want.text
        assert body["choices"][0]["finish_reason"] == "length"
        # a text prompt longer than any 512 tokens can be: only its tail is tokenized, and the
        # tokens kept are the last 511 of the whole text's tokenization
        text = tok.decode(long_ids[1:]) * 20
        r = httpx.post(f"{url}/v1/completions", timeout=60, json={
            "model": "tiny", "prompt": text, "max_tokens": 1, "echo": True})
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 511, r.text
        assert r.json()["choices"][0]["text"].startswith(tok.decode(tok.encode(text)[-511:]))

        # 4 long streams, 2 may run: the other 2 wait, and the gauges say so
        streams = Streams(url, 4, 300)
        assert wait_for(lambda: metric(url, "mixq_num_queue_requests") == 2
                        and metric(url, "mixq_num_running_requests") == 2)
        children = descendants(proc.pid)
        proc.send_signal(signal.SIGTERM)  # now: 2 streams running, 2 queued; they must all finish
        streams.join()
        assert proc.wait(timeout=60) == 0
        out = proc.stdout.read()
        assert "mixq: shut down cleanly" in out
        for i, ev in enumerate(streams.events):  # running and queued requests all completed
            assert streams.errors[i] is None and ev[-1] == "[DONE]", (i, ev[-2:], streams.errors[i])
            assert json.loads(ev[-2])["choices"][0]["finish_reason"] == "length"
        assert not [p for p in children if alive(p)], "processes outlived the server"
    finally:
        proc.kill()


def test_forced_shutdown_ends_every_request_cleanly():
    """SIGTERM then SIGINT (as a second Ctrl-C): the server stops waiting for requests in
    flight and ends each cleanly: a stream gets an error event and then [DONE] (never a cut
    connection), a waiting non-streaming client a 503 in OpenAI's error JSON; the log has
    no traceback, and the process exits 0. The server runs the example mix
    (--enable-mixed-precision --mixed-precision-config)."""
    mix = ROOT / "examples" / "tiny-llama-mix.yaml"
    proc, url = start("--enable-mixed-precision", "--mixed-precision-config", str(mix), "--max-total-tokens", "4096",
                      "--page-size", "8")
    try:
        mem = httpx.get(f"{url}/memory_stats").json()
        assert set(mem["by_format"]) == {"bf16", "fp8", "int8", "int4"}  # the config is applied (dtype bf16)
        streams = Streams(url, 3, 480)
        plain: list = []
        waiter = threading.Thread(target=lambda: plain.append(httpx.post(
            f"{url}/v1/completions", json={"prompt": "a", "max_tokens": 480, "ignore_eos": True}, timeout=120)))
        waiter.start()
        assert wait_for(lambda: all(len(e) >= 2 for e in streams.events)
                        and httpx.get(f"{url}/get_server_info").json()["num_engine_requests"] == 4)
        children = descendants(proc.pid)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        assert httpx.get(f"{url}/health").status_code == 503  # draining: new work is refused
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        out = proc.stdout.read()
        assert "mixq: shut down cleanly" in out and "Traceback" not in out, out[-3000:]
        streams.join()
        waiter.join(60)
        for i, ev in enumerate(streams.events):
            assert streams.errors[i] is None and ev[-1] == "[DONE]", (i, ev[-2:], streams.errors[i])
            err = json.loads(ev[-2])["error"]
            assert err["code"] == "engine_stopped" and "shutting down" in err["message"], ev[-2]
        assert plain[0].status_code == 503 and "shutting down" in plain[0].json()["error"]["message"]
        assert not [p for p in children if alive(p)]
    finally:
        proc.kill()


def test_serve_on_a_port_in_use_fails_before_loading():
    """`mixq serve` on a busy port: one line naming it, before any weight is read."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "mixq", "serve", "--model-path", str(MODEL), "--device", "cpu",
                            "--port", str(port)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert f"--port {port}: cannot listen on 127.0.0.1:{port}: Address already in use" in r.stderr
    assert "loading weights" not in r.stderr + r.stdout and "serving" not in r.stdout


def test_readme_serve_and_curl_on_the_default_model(default_model_root):
    """README: `mixq serve --port 30000` (no model flags: the embedded default mix) prints
    how to query it, and its curl example, sent as written, returns a completion."""
    readme = (ROOT / "README.md").read_text()
    assert re.search(r"^mixq serve --port 30000", readme, re.M)
    curl = re.search(r"^(curl http://127\.0\.0\.1:30000/v1/completions .*?)\n```", readme, re.M | re.S).group(1)
    argv = shlex.split(curl.replace("\\\n", " "))
    url_path = argv[1].removeprefix("http://127.0.0.1:30000")
    headers = dict(h.split(": ", 1) for h in (argv[i + 1] for i, a in enumerate(argv) if a == "-H"))
    data = argv[argv.index("-d") + 1]
    env = {"MIXQ_CACHE": str(default_model_root.parent)}
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mixq", "serve", "--port", str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", **env})
    try:
        url = f"http://127.0.0.1:{port}"
        assert wait_for(lambda: proc.poll() is not None or _ok(url), timeout=300), "server did not start"
        assert proc.poll() is None
        r = httpx.post(url + url_path, content=data, headers=headers, timeout=120)
        assert r.status_code == 200, r.text
        req, body = json.loads(data), r.json()
        assert body["model"] == req["model"] == "smollm2-135m-instruct"
        assert "Paris" in body["choices"][0]["text"]  # greedy; tests/test_default_model.py checks the mix
        assert body["usage"]["completion_tokens"] <= req["max_tokens"]
        # the default config's server/inference sections apply under the flags
        info = httpx.get(f"{url}/get_server_info").json()
        assert (info["port"], info["max_running_requests"], info["max_model_len"], info["dtype"]) == (
            port, 32, 2048, "bfloat16")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        out = proc.stdout.read()
        assert f"try: curl {url}/v1/completions" in out and "mixq: shut down cleanly" in out
    finally:
        proc.kill()


def _ok(url) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_config_sections_are_defaults_under_explicit_flags(tmp_path):
    import argparse

    from mixq.server.args import add_server_flags, from_namespace

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"mixed_precision: {{fp16_path: {MODEL}}}\n"
                   "inference: {max_seq_length: 256, max_batch_size: 5, dtype: float16}\n"
                   "server: {host: 0.0.0.0, port: 8123}\n")
    p = argparse.ArgumentParser()
    add_server_flags(p)
    a = from_namespace(p.parse_args(["--mixed-precision-config", str(cfg)]))
    assert (a.host, a.port, a.context_length, a.max_running_requests, a.dtype, a.enable_mixed_precision) == (
        "0.0.0.0", 8123, 256, 5, "float16", True)
    a = from_namespace(p.parse_args(["--mixed-precision-config", str(cfg), "--port", "9000", "--dtype", "bfloat16",
                                     "--max-running-requests", "7", "--context-length", "128"]))
    assert (a.host, a.port, a.context_length, a.max_running_requests, a.dtype) == (
        "0.0.0.0", 9000, 128, 7, "bfloat16")
