"""Expert tracking through the real server (a subprocess on a free loopback port): counts
equal the routing recomputed from HF transformers' hidden states, exports stay inside
--expert-stats-dir, SGLang's record endpoints, and clear 4xx errors when tracking is off."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import pytest
import torch

from tests.server.launch_utils import start_server, stop_server
from tests.tracking.routing_ref import FIXTURE, HFRouter, slot_counts

MODEL = FIXTURE["qwen3-moe"]
PROMPT = [17, 93, 5, 201, 44, 8, 150, 77, 31, 9, 120, 66]


def start(args: list[str]):
    return start_server("--model-path", str(MODEL), "--dtype", "float32", "--max-total-tokens", "1024",
                        "--page-size", "8", "--log-level", "warning", *args, timeout=120)


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    root = tmp_path_factory.mktemp("srv")
    stats_dir, outside = root / "stats", root / "outside"
    stats_dir.mkdir()
    outside.mkdir()
    proc, url = start(["--enable-expert-tracking", "--expert-stats-dir", str(stats_dir)])
    yield url, stats_dir, outside
    stop_server(proc)


def generate(url, ids, n=5):
    r = httpx.post(f"{url}/generate", json={"input_ids": ids, "sampling_params": {
        "max_new_tokens": n, "temperature": 0, "ignore_eos": True}}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["output_ids"]


def counts(doc, layers, E):
    return torch.tensor([[[doc["expert_stats"][f"layer_{lid}_expert_{e}"]["total_tokens_processed"] for e in range(E)]]
                         for lid in layers])


def test_stats_equal_the_routing_of_hf_hidden_states(tracked):
    url, _, _ = tracked
    assert httpx.post(f"{url}/expert_stats/reset").status_code == 200
    out = generate(url, PROMPT)
    ref = HFRouter("qwen3-moe", MODEL)
    want = slot_counts(ref.route(PROMPT + out[:-1]), ref.num_experts)  # [L, k, E]
    doc = httpx.get(f"{url}/expert_stats", params={"top_k": 3}).json()
    assert torch.equal(torch.tensor([doc["tokens_by_slot"][str(lid)] for lid in ref.layers]), want)
    assert torch.equal(counts(doc, ref.layers, ref.num_experts)[:, 0], want.sum(1))
    assert doc["meta"]["num_forward_passes"] == len(out)  # one prefill step, then a decode step per token but the last
    assert len(doc["top_experts"]) == 3 and doc["requests"]["num_requests"] == 1
    assert doc["requests"]["input_tokens"] == len(PROMPT) and doc["requests"]["output_tokens"] == len(out)
    one = httpx.get(f"{url}/expert_stats", params={"layer_id": 1, "expert_id": 2, "top_k": 1}).json()
    assert one["expert_stats"] == {"layer_1_expert_2": doc["expert_stats"]["layer_1_expert_2"]}
    for params, status, msg in (({"layer_id": 7}, 400, "layer_id 7 is not a tracked MoE layer"),
                                ({"expert_id": 4}, 400, "expert_id 4 is out of range"),
                                ({"top_k": -1}, 400, "query parameter top_k must be an integer >= 0, got '-1'"),
                                ({"layer_id": "x"}, 400, "query parameter layer_id must be a MoE layer's index")):
        r = httpx.get(f"{url}/expert_stats", params=params)
        assert r.status_code == status and msg in r.json()["error"]["message"], r.text
    assert httpx.post(f"{url}/expert_stats/reset").json()["status"] == "ok"
    doc = httpx.get(f"{url}/expert_stats").json()
    assert all(v["total_tokens_processed"] == 0 for v in doc["expert_stats"].values())


def test_export_stays_inside_the_stats_dir(tracked):
    url, stats_dir, outside = tracked
    generate(url, [3, 4, 5])
    r = httpx.post(f"{url}/expert_stats/export", json={"path": "runs/a.json", "top_k": 100})
    assert r.status_code == 200, r.text
    written = json.loads((stats_dir / "runs" / "a.json").read_text())
    assert written == httpx.get(f"{url}/expert_stats", params={"top_k": 100}).json()
    (stats_dir / "link").symlink_to(outside, target_is_directory=True)
    (stats_dir / "evil.json").symlink_to(outside / "evil.json")
    for path in ("../escape.json", str(outside / "abs.json"), "link/x.json", "evil.json", "runs/../../escape.json"):
        r = httpx.post(f"{url}/expert_stats/export", json={"path": path})
        assert r.status_code == 403 and "outside the directory --expert-stats-dir allows" in r.json()["error"]["message"]
    assert list(outside.iterdir()) == [] and not (stats_dir.parent / "escape.json").exists()
    r = httpx.post(f"{url}/expert_stats/export", json={"path": str(stats_dir / "inside.json")})  # absolute, inside
    assert r.status_code == 200 and (stats_dir / "inside.json").is_file()
    for body, msg in (({"path": "runs"}, "is a directory"), ({}, "path is required"),
                      ({"path": "x", "bogus": 1}, "unknown field 'bogus'"),
                      ({"path": "n" * 300 + ".json"}, "File name too long"),  # was a 500
                      ({"path": "x", "top_k": "3"}, "top_k must be an integer >= 0, got '3'"),
                      ({"path": "runs/a.json/x.json"}, "File exists")):
        r = httpx.post(f"{url}/expert_stats/export", json=body)
        assert r.status_code == 400 and msg in r.json()["error"]["message"], r.text


def test_sglang_record_endpoints(tracked):
    url, stats_dir, _ = tracked
    assert httpx.post(f"{url}/start_expert_distribution_record").json()["recording"] is True
    assert sum(v["total_tokens_processed"] for v in httpx.get(f"{url}/expert_stats").json()["expert_stats"].values()) == 0
    assert httpx.post(f"{url}/stop_expert_distribution_record").json()["recording"] is False
    generate(url, [9, 10, 11])  # not recorded
    assert sum(v["total_tokens_processed"] for v in httpx.get(f"{url}/expert_stats").json()["expert_stats"].values()) == 0
    assert httpx.get(f"{url}/start_expert_distribution_record").status_code == 200  # GET works as in SGLang
    out = generate(url, [9, 10, 11], n=3)
    dump = httpx.post(f"{url}/dump_expert_distribution_record").json()
    stats = dump["stats"]
    assert sum(ls["total_tokens"] for ls in stats["layer_stats"].values()) == (3 + len(out) - 1) * 2 * 2  # k=2, 2 layers
    assert json.loads(open(dump["path"]).read()) == stats and os.path.dirname(dump["path"]) == str(stats_dir.resolve())
    after = httpx.get(f"{url}/expert_stats").json()  # a dump clears the record, recording goes on
    assert sum(v["total_tokens_processed"] for v in after["expert_stats"].values()) == 0 and dump["recording"] is True


def test_tracking_off_answers_4xx_saying_how_to_enable_it(tmp_path):
    r = subprocess.run([sys.executable, "-m", "mixq.launch_server", "--model-path", str(MODEL), "--expert-stats-dir",
                        str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--expert-stats-dir needs --enable-expert-tracking" in r.stderr
    proc, url = start([])
    try:
        for method, path in (("GET", "/expert_stats"), ("POST", "/expert_stats/reset"),
                             ("POST", "/start_expert_distribution_record"), ("POST", "/stop_expert_distribution_record"),
                             ("GET", "/dump_expert_distribution_record")):
            r = httpx.request(method, f"{url}{path}")
            assert r.status_code == 400 and "--enable-expert-tracking" in r.json()["error"]["message"], (path, r.text)
        r = httpx.post(f"{url}/expert_stats/export", json={"path": "a.json"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "expert_tracking_disabled"
        assert len(generate(url, [3, 4])) == 5  # and it serves as usual
    finally:
        stop_server(proc)
