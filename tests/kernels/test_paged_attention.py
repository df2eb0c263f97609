"""Paged decode attention (one launch for every sequence) against a float64 reference,
under the Triton interpreter on the CPU and for real on CUDA."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mixq.kernels import paged_attention as pa

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
pytestmark = pytest.mark.skipif(pa.triton is None, reason="triton not installed")
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
# fp32: exact softmax and fp32 dots; fp16/bf16 on the GPU round q, k, v to the input dtype
# (their own error is in the reference too) and the probabilities to it before p @ v
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def make_cache(gen, ctx_lens, page, hkv, d, dtype, spare=3):
    """Caches with pages handed out in a shuffled order, so block tables are not ranges."""
    need = [-(-n // page) for n in ctx_lens]
    num_blocks = sum(need) + spare
    order = torch.randperm(num_blocks, generator=gen)
    tables = torch.zeros(len(ctx_lens), max(need) + 1, dtype=torch.int32)
    at = 0
    for i, nb in enumerate(need):
        tables[i, :nb] = order[at:at + nb]
        at += nb
    k = torch.randn(num_blocks, page, hkv, d, generator=gen).to(dtype)
    v = torch.randn(num_blocks, page, hkv, d, generator=gen).to(dtype)
    return k, v, tables


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("h,hkv,d,page", [(8, 2, 64, 16), (4, 4, 32, 8), (12, 4, 80, 16), (2, 1, 128, 32)])
def test_matches_float64_reference(dtype, h, hkv, d, page):
    gen = torch.Generator().manual_seed(h * 100 + d + page)
    ctx = [1, 2, page - 1, page, page + 1, 3 * page + 5] + ([257, 1000] if CUDA else [70])
    k, v, tables = make_cache(gen, ctx, page, hkv, d, dtype)
    q = torch.randn(len(ctx), h, d, generator=gen).to(dtype)
    lens = torch.tensor(ctx, dtype=torch.int32)
    scale = d**-0.5
    ref = pa.paged_decode_reference(q, k, v, tables, lens, scale)
    out = pa.paged_decode_attention(*(t.to(DEV) for t in (q, k, v, tables, lens)), scale)
    assert out.dtype == dtype and out.shape == q.shape
    err = (out.double().cpu() - ref).norm() / ref.norm()
    assert err < TOL[dtype], float(err)
    # each sequence on its own equals its row of the batched call (no cross-talk); the
    # split count is pinned to the batch's, as one sequence alone may be split further
    splits, _ = pa.plan_splits(q.to(DEV), k, tables)
    one = pa.paged_decode_attention(*(t[3:4].to(DEV) for t in (q,)), k.to(DEV), v.to(DEV), tables[3:4].to(DEV),
                                    lens[3:4].to(DEV), scale, num_splits=splits)
    assert torch.equal(one[0].cpu(), out[3].cpu())


def test_contract_violations_are_refused():
    q = torch.randn(2, 6, 16)
    k = torch.randn(4, 8, 4, 16)
    t = torch.zeros(2, 1, dtype=torch.int32)
    lens = torch.ones(2, dtype=torch.int32)
    with pytest.raises(ValueError, match="do not fit"):
        pa.paged_decode_attention(q, k, k, t, lens, 0.25)  # 6 heads over 4 KV heads
    with pytest.raises(ValueError, match="must match"):
        pa.paged_decode_attention(torch.randn(3, 4, 16), k, k, t, lens, 0.25)
    with pytest.raises(ValueError, match="cache dtype"):
        pa.paged_decode_attention(torch.randn(2, 4, 16), k.half(), k.half(), t, lens, 0.25)
    with pytest.raises(ValueError, match="num_splits"):
        pa.paged_decode_attention(torch.randn(2, 4, 16), k, k, t, lens, 0.25, num_splits=-1)


# Split-KV ("flash-decoding"): every forced split count and the automatic choice, on one
# ragged batch per head layout. Lengths 1 and 2 leave all but the first split empty, 63/64/65
# straddle a BLOCK_N step, and the longest row sets the table width, so with 5 splits of
# 128 keys over a 352-key table splits 3 and 4 are empty in every row (neutral partials).
# (H, Hkv, D, page): G = 1, 2, 3 (not a power of two; D = 48 pads to 64; page 1), 4.
SPLIT_HEADS = [(4, 4, 32, 16), (8, 4, 32, 16), (6, 2, 48, 1), (8, 2, 64, 16)]
SPLIT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]  # bf16 works here: the interpreter upcasts
SPLIT_CASES = [(n, heads, SPLIT_DTYPES[(i + j) % 3]) for i, n in enumerate([1, 2, 3, 5, 0])
               for j, heads in enumerate(SPLIT_HEADS)]
# Relative L2 error vs float64 over the whole output. The partials and their merge are fp32
# (as is the single pass), so splitting adds only fp32 rounding; the budget is the dtype's:
# the output rounds once to fp16 (2^-11) / bf16 (2^-8), and on the GPU the probabilities
# round to the input dtype before p @ v, a relative 2^-11 / 2^-8 per term.
SPLIT_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.mark.parametrize("num_splits,heads,dtype", SPLIT_CASES, ids=str)
def test_split_kv_matches_float64_reference(num_splits, heads, dtype):
    h, hkv, d, page = heads
    gen = torch.Generator().manual_seed(num_splits * 1000 + h * 10 + page)
    ctx = [1, 65, 2, 333, 64, 1, 200, 63] + ([1500, 4099] if CUDA else [])
    k, v, tables = make_cache(gen, ctx, page, hkv, d, dtype)
    q = torch.randn(len(ctx), h, d, generator=gen).to(dtype)
    lens = torch.tensor(ctx, dtype=torch.int32)
    scale = d**-0.5
    ref = pa.paged_decode_reference(q, k, v, tables, lens, scale)
    qd, kd, vd, td, ld = (t.to(DEV) for t in (q, k, v, tables, lens))
    splits, _ = pa.plan_splits(qd, kd, td, num_splits)
    assert splits == num_splits or (num_splits == 0 and splits > 1)  # auto splits this batch on 132 SMs
    out = pa.paged_decode_attention(qd, kd, vd, td, ld, scale, num_splits=num_splits)
    assert out.dtype == dtype and out.shape == q.shape
    err = (out.double().cpu() - ref).norm() / ref.norm()
    assert err < SPLIT_TOL[dtype], float(err)
    # every row on its own, per-row error too: a broken merge in one row must not hide in the norm
    row_err = (out.double().cpu() - ref).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1)
    assert row_err.max() < 4 * SPLIT_TOL[dtype], row_err.tolist()


def test_split_choice_uses_static_sizes_only():
    """The chooser fills ~WAVES waves of programs, never splits below MIN_SLICE keys, and
    every split it returns is non-empty for a full-length row."""
    for seqs, hkv, max_ctx, sms in [(1, 8, 16384, 132), (1, 8, 512, 132), (8, 8, 4096, 132), (64, 8, 16384, 132),
                                    (3, 1, 100_000, 78), (1, 2, 1, 132), (5, 4, 1000, 16)]:
        n = pa.choose_num_splits(seqs, hkv, max_ctx, sms)
        piece = pa.split_slice(max_ctx, n)
        assert n >= 1 and piece % pa.BLOCK_N == 0
        assert (n - 1) * piece < max_ctx <= n * piece  # the last split holds the last key
        if n > 1:
            assert piece >= pa.MIN_SLICE - pa.BLOCK_N  # rounding may trim one step
            assert (n - 1) * seqs * hkv < pa.WAVES * sms  # one fewer split would not fill the waves
        if seqs * hkv >= pa.WAVES * sms or max_ctx <= pa.MIN_SLICE:
            assert n == 1
        # more sequences never ask for more splits
        assert pa.choose_num_splits(seqs * 2, hkv, max_ctx, sms) <= n


class _GridSpy:
    """Stands in for a Triton kernel: records each launch grid, then launches."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


def test_same_shapes_new_context_lens_same_grid(monkeypatch):
    """A CUDA graph replays a fixed grid while context_lens changes in place: the launch must
    not depend on the values, and the result must be right for each set of lengths."""
    spy1 = _GridSpy(pa._paged_decode_kernel)
    spy2 = _GridSpy(pa._combine_splits_kernel)
    monkeypatch.setattr(pa, "_paged_decode_kernel", spy1)
    monkeypatch.setattr(pa, "_combine_splits_kernel", spy2)
    gen = torch.Generator().manual_seed(7)
    h, hkv, d, page = 4, 2, 32, 16
    k, v, tables = make_cache(gen, [600, 600], page, hkv, d, torch.float16)  # both rows may hold 600+ keys
    q = torch.randn(2, h, d, generator=gen).half()
    lens = torch.tensor([600, 3], dtype=torch.int32).to(DEV)
    qd, kd, vd, td = (t.to(DEV) for t in (q, k, v, tables))
    for new in ([600, 3], [1, 417], [129, 600]):
        lens.copy_(torch.tensor(new))  # in place, as the graph's input buffer is refilled
        out = pa.paged_decode_attention(qd, kd, vd, td, lens, d**-0.5)
        ref = pa.paged_decode_reference(q, k, v, tables, lens.cpu(), d**-0.5)
        assert (out.double().cpu() - ref).norm() / ref.norm() < SPLIT_TOL[torch.float16], new
    assert len(set(spy1.grids)) == 1 and spy1.grids[0][2] > 1, spy1.grids  # split, and always alike
    assert len(spy2.grids) == 3 and len(set(spy2.grids)) == 1


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA device")
def test_cuda_graph_replay_with_new_context_lens():
    gen = torch.Generator().manual_seed(11)
    h, hkv, d, page = 32, 8, 128, 16
    k, v, tables = make_cache(gen, [5000, 5000], page, hkv, d, torch.bfloat16)
    q = torch.randn(2, h, d, generator=gen).bfloat16()
    qd, kd, vd, td = (t.cuda() for t in (q, k, v, tables))
    lens = torch.tensor([5000, 17], dtype=torch.int32, device="cuda")
    pa.paged_decode_attention(qd, kd, vd, td, lens, d**-0.5)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = pa.paged_decode_attention(qd, kd, vd, td, lens, d**-0.5)
    for new in ([5000, 17], [1, 4096], [2049, 5000]):
        lens.copy_(torch.tensor(new))
        graph.replay()
        ref = pa.paged_decode_reference(q, k, v, tables, lens.cpu(), d**-0.5)
        assert (out.double().cpu() - ref).norm() / ref.norm() < SPLIT_TOL[torch.bfloat16], new


def test_custom_op_schema_and_fake():
    """The op (num_splits included) passes torch's own checks of schema, fake impl and
    tracing, so torch.compile and graph capture see the same contract as eager."""
    gen = torch.Generator().manual_seed(3)
    k, v, tables = make_cache(gen, [70, 5], 16, 2, 16, torch.float32)
    q = torch.randn(2, 4, 16, generator=gen)
    args = tuple(t.to(DEV) for t in (q, k, v, tables, torch.tensor([70, 5], dtype=torch.int32))) + (0.25,)
    torch.library.opcheck(torch.ops.mixq.paged_decode_attention.default, args, {"num_splits": 2})


@pytest.mark.skipif(CUDA, reason="the smoke mode is the CPU interpreter run; on a GPU run bench/attention.py")
def test_attention_benchmark_smoke(tmp_path):
    """bench/attention.py --smoke (tiny shapes, interpreter, ~10 s) runs end to end; the
    script itself fails when an output is off the float64 reference."""
    root = Path(__file__).parents[2]
    out = tmp_path / "attn.json"
    env = {**os.environ, "PYTHONPATH": str(root)}
    r = subprocess.run([sys.executable, "bench/attention.py", "--smoke", "--out", str(out)], cwd=root, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    # the smoke shape by hand (the script's docstring): 4 query heads over 2 KV heads of 32,
    # bf16, batch 1 and 3 x context 64 and 320
    assert [(row["batch"], row["context"]) for row in rows] == [(1, 64), (1, 320), (3, 64), (3, 320)]
    for row in rows:
        # K and V of every sequence read once: 2 x batch x context x 2 heads x 32 x 2 bytes
        assert row["kv_bytes"] == 2 * row["batch"] * row["context"] * 2 * 32 * 2
        for m in ("auto", "split1", "auto_padded", "sdpa"):
            x = row[m]
            # error vs float64: bf16 inputs are exact in the reference, the output rounds to bf16
            # (and the kernel's probabilities before p @ v): nonzero (a real comparison), within
            # the kernel tests' 1.6e-2 relative budget; |out| < 3 (a softmax average of N(0, 1)
            # values) bounds the absolute error by 3 x 2**-8 per element plus the p rounding
            assert 0 < x["rel_err"] < 1.6e-2 and 0 < x["max_abs_err"] < 0.05 and x["ok"], (m, x)
            assert x["GBps"] == pytest.approx(row["kv_bytes"] / x["us"] / 1e3, rel=1e-9)
        assert row["splits"]["split1"] == 1
    assert any(row["splits"]["auto"] > 1 for row in rows)  # the split path ran
