"""CPU defaults: the dtype that is fast on the running CPU, threads = the usable cores."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import mixq.engine.engine as engine_mod
from mixq.engine.engine import LLM
from mixq.engine.engine_config import cpu_has_native_bf16, resolve_dtype, usable_cpus

FIX = Path(__file__).parents[1] / "fixtures" / "tiny-llama" / "bf16"
SPR = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
ICELAKE = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_vnni\n"
GRAVITON3 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"


@pytest.mark.parametrize("cpuinfo,native", [(SPR, True), (ICELAKE, False), (GRAVITON3, True), ("", False)])
def test_native_bf16_from_cpu_flags(cpuinfo, native):
    assert cpu_has_native_bf16(cpuinfo) is native


def test_auto_dtype_on_cpu_follows_the_hardware():
    want = torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    assert resolve_dtype("auto", torch.device("cpu"), {"torch_dtype": "float32"}) == want
    assert resolve_dtype("float32", torch.device("cpu"), {}) == torch.float32


@pytest.mark.parametrize("v2,v1,cap", [("150000 100000", None, 2), ("max 100000", None, None),
                                       (None, ("50000", "100000"), 1), (None, ("-1", "100000"), None)])
def test_usable_cpus_honours_a_cgroup_quota(tmp_path, v2, v1, cap):
    if v2 is not None:
        (tmp_path / "cpu.max").write_text(v2 + "\n")
    if v1 is not None:
        (tmp_path / "cpu").mkdir()
        (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text(v1[0])
        (tmp_path / "cpu" / "cpu.cfs_period_us").write_text(v1[1])
    mask = len(os.sched_getaffinity(0))
    assert usable_cpus(tmp_path) == (mask if cap is None else min(mask, cap))


def test_engine_caps_threads_at_the_usable_cores(monkeypatch):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(max(2, before))
        monkeypatch.setattr(engine_mod, "usable_cpus", lambda: 1)
        LLM(model_path=str(FIX), device="cpu", max_total_tokens=64)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
