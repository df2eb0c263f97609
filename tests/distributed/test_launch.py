"""The launcher with SGLang's parallel flags, as real processes on loopback: --dp-size 2
(two replicas behind one server, shortest-queue dispatch, /metrics per replica) and a
two-"node" --tp-size 2 (two launchers, --node-rank 0 and 1, --dist-init-addr). Each gives
the single-process engine's greedy tokens, shuts down cleanly on SIGTERM and leaves no
process behind."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from mixq.engine.engine import LLM
from mixq.engine.sampling_params import SamplingParams
from tests.distributed.test_parallel_engine import KW, prompts

HERE = Path(__file__).parent
MIX = str(HERE / "mix-llama.yaml")
COMMON = ["--mixed-precision-config", MIX, "--device", "cpu", "--dtype", "float32", "--max-total-tokens", "512",
          "--page-size", "8", "--log-level", "warning"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(log: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mixq.launch_server", *COMMON, *args], stdout=log.open("w"),
                            stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def descendants(pid: int) -> set[int]:
    """Every process below pid (from /proc), to check that none outlives the test."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.add(c)
            todo.append(c)
    return out


def alive(pids: set[int]) -> set[int]:
    out = set()
    for p in pids:
        try:
            if Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                out.add(p)
        except OSError:
            pass
    return out


def wait_healthy(url: str, procs: list[subprocess.Popen], logs: list[Path], timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        for p, log in zip(procs, logs):
            if p.poll() is not None:
                raise RuntimeError(f"a launcher exited ({p.returncode}):\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("the server did not come up:\n" + "\n".join(log.read_text()[-2000:] for log in logs))


@pytest.fixture(scope="module")
def reference():
    """Greedy tokens and their logprobs from the single-process engine."""
    ps = prompts(7, 6)
    with LLM(mixed_precision_config=MIX, **{**KW, "device": "cpu"}) as llm:  # the servers run on the CPU
        outs = llm.generate(ps, SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True, logprobs=1))
    return ps, [o.outputs[0].token_ids for o in outs], [o.outputs[0].logprobs for o in outs]


def check_against(url: str, reference) -> None:
    """Concurrent requests (the DP front spreads them): the same greedy tokens, and
    logprobs within 1e-5 (fp32; TP all-reduces reorder sums, ~1e-6 here)."""
    ps, want, want_lp = reference

    def one(ids):
        g = httpx.post(f"{url}/generate", timeout=120, json={
            "input_ids": ids, "sampling_params": {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True}})
        c = httpx.post(f"{url}/v1/completions", timeout=120, json={
            "prompt": ids, "max_tokens": 8, "temperature": 0, "ignore_eos": True, "logprobs": 1})
        g.raise_for_status()
        c.raise_for_status()
        return g.json()["output_ids"], c.json()["choices"][0]["logprobs"]["token_logprobs"]

    with ThreadPoolExecutor(len(ps)) as pool:
        got = list(pool.map(one, ps))
    assert [g[0] for g in got] == want
    for (_, lp), ref in zip(got, want_lp):
        assert lp == pytest.approx(ref, abs=1e-5)


def stop(procs: list[subprocess.Popen], tree: set[int]) -> None:
    """SIGTERM the first launcher (rank 0 / the server); every launcher must exit 0 and
    every process they started must be gone. Kills everything on failure."""
    try:
        procs[0].send_signal(signal.SIGTERM)
        for p in procs:
            assert p.wait(timeout=60) == 0
        deadline = time.time() + 15
        while alive(tree) and time.time() < deadline:
            time.sleep(0.2)
        assert not alive(tree), f"left behind: {alive(tree)}"
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for pid in alive(tree):
            os.kill(pid, signal.SIGKILL)


def metric(text: str, line_start: str) -> float:
    for line in text.splitlines():
        if line.startswith(line_start):
            return float(line.split()[-1])
    raise AssertionError(f"no {line_start} in /metrics")


def test_dp2_replicas_behind_one_server(tmp_path, reference):
    port = free_port()
    log = tmp_path / "server.log"
    proc = launch(log, "--dp-size", "2", "--port", str(port))
    url, tree = f"http://127.0.0.1:{port}", set()
    try:
        wait_healthy(url, [proc], [log])
        tree = descendants(proc.pid)
        assert len(tree) >= 2  # the two replica processes
        # a constraint the grammar library refuses is the front's 400, before any replica sees it
        bad = httpx.post(f"{url}/generate", json={"text": "a", "sampling_params": {"regex": "(a|"}}, timeout=60)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "sampling_params.regex", bad.text
        check_against(url, reference)
        text = httpx.get(f"{url}/metrics").text
        per_replica = [metric(text, f'mixq_generation_tokens_total{{dp_rank="{i}"}}') for i in (0, 1)]
        assert sum(per_replica) == 2 * 8 * len(reference[0]) and min(per_replica) > 0  # both replicas served
        assert metric(text, 'mixq_kv_cache_used_blocks{dp_rank="1"}') == 0  # all finished, blocks freed
        info = httpx.get(f"{url}/get_server_info").json()
        assert info["dp_size"] == 2
    finally:
        stop([proc], tree | descendants(proc.pid))
    assert "mixq: shut down cleanly" in log.read_text()


def test_two_nodes_tp2_over_loopback(tmp_path, reference):
    port, rendezvous = free_port(), f"127.0.0.1:{free_port()}"
    dist = ["--tp-size", "2", "--nnodes", "2", "--dist-init-addr", rendezvous]
    logs = [tmp_path / "node0.log", tmp_path / "node1.log"]
    node1 = launch(logs[1], *dist, "--node-rank", "1")
    node0 = launch(logs[0], *dist, "--node-rank", "0", "--port", str(port))
    url, tree = f"http://127.0.0.1:{port}", set()
    try:
        wait_healthy(url, [node0, node1], logs)
        tree = descendants(node0.pid) | descendants(node1.pid)
        check_against(url, reference)
    finally:
        stop([node0, node1], tree | descendants(node0.pid) | descendants(node1.pid))
    assert "mixq: shut down cleanly" in logs[0].read_text()
    assert "mixq: shut down cleanly" in logs[1].read_text()
