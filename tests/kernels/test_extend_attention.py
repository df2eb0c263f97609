"""Paged extend attention (a mixed step of prefill chunks and decodes in one launch) against
a float64 reference, under the Triton interpreter on the CPU and for real on CUDA; and the
engine with --attention-backend triton against torch_native on chunked-prefill steps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mixq.kernels import extend_attention as ea
from tests.devices import DEVICE
from tests.kernels.test_paged_attention import make_cache

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
pytestmark = pytest.mark.skipif(ea.triton is None, reason="triton not installed")
# Relative L2 error vs float64 over the whole output. fp32: fp32 dots (ieee) and softmax,
# only summation order differs. fp16 / bf16: q, k, v are exact in the reference too; the
# output rounds once to the dtype (2^-11 / 2^-8 relative) and on the GPU the probabilities
# round to it before p @ v (2^-11 / 2^-8 per term, averaging down over the keys). The
# decode kernel's budgets, whose error sources are the same.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def mixed_batch(tq: int) -> list[tuple[int, int]]:
    """(tokens already in the cache, new tokens) per sequence: a fresh prefill of 37, a chunk
    of 13 continuing a prefix of 20, decodes at context 1 and 50, two whole tiles after a
    prefix of 5, a chunk of 3 after 61 (its diagonal straddles a 64-key block)."""
    return [(0, 37), (20, 13), (0, 1), (49, 1), (5, 2 * tq), (61, 3)] + ([(700, 300), (0, 513)] if CUDA else [])


def build(seqs, h, hkv, d, page, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    ctx = [a + n for a, n in seqs]
    k, v, tables = make_cache(gen, ctx, page, hkv, d, dtype)
    qs = [0]
    for _, n in seqs:
        qs.append(qs[-1] + n)
    q = torch.randn(qs[-1], h, d, generator=gen).to(dtype)
    return q, k, v, tables, qs, ctx


# (H, Hkv, D, page, block_m): G = 1, 2, 4 and 3 (not a power of two: 5 tokens per 16-row
# tile, a padding row); D = 48 pads to 64; page 1; block_m 0 takes the device's default.
HEADS = [(4, 4, 32, 16, 16), (8, 4, 32, 1, 32), (8, 2, 48, 16, 16), (6, 2, 32, 16, 16), (8, 2, 64, 16, 0)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]  # bf16 works here: the interpreter upcasts
CASES = [(heads, DTYPES[(i + j) % 3]) for i, heads in enumerate(HEADS) for j in range(2)]


@pytest.mark.parametrize("heads,dtype", CASES, ids=str)
def test_mixed_batch_matches_float64_reference(heads, dtype):
    h, hkv, d, page, block_m = heads
    g = h // hkv
    bm = block_m or ea.extend_config(g, d, DEV).block_m
    seqs = mixed_batch(bm // g)
    q, k, v, tables, qs, ctx = build(seqs, h, hkv, d, page, dtype, seed=h * 100 + d + page + bm)
    qs_t, ctx_t = torch.tensor(qs), torch.tensor(ctx, dtype=torch.int32)
    scale = d**-0.5
    ref = ea.paged_extend_reference(q, k, v, tables, qs_t, ctx_t, scale)
    tiles = ea.plan_tiles(qs, ctx, g, d, DEV, block_m)
    assert tiles.block_m == bm and tiles.tiles.shape[1] > len(seqs)  # some sequences span several tiles
    out = ea.paged_extend_attention(*(t.to(DEV) for t in (q, k, v, tables, qs_t, ctx_t)), scale, tiles)
    assert out.dtype == dtype and out.shape == q.shape
    out = out.double().cpu()
    err = (out - ref).norm() / ref.norm()
    assert err < TOL[dtype], float(err)
    # per token too: a wrong mask on one row (a decode, a tile edge) must not hide in the norm
    row_err = (out - ref).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1)
    assert row_err.max() < 4 * TOL[dtype], row_err.argmax()


def test_tokens_of_a_sequence_do_not_depend_on_the_batch():
    """A sequence alone gives the same rows as in the batch (tiles are per sequence, so
    there is no cross-talk; the same tile shapes make it bit-exact)."""
    h, hkv, d, page = 4, 2, 32, 16
    seqs = [(20, 13), (0, 37), (49, 1)]
    q, k, v, tables, qs, ctx = build(seqs, h, hkv, d, page, torch.float16, seed=5)
    args = [t.to(DEV) for t in (q, k, v, tables)]
    out = ea.paged_extend_attention(*args, torch.tensor(qs, device=DEV), torch.tensor(ctx, device=DEV), d**-0.5)
    one = ea.paged_extend_attention(args[0][qs[1]:qs[2]], args[1], args[2], args[3][1:2],
                                    torch.tensor([0, 37], device=DEV), torch.tensor([37], device=DEV), d**-0.5)
    assert torch.equal(one.cpu(), out[qs[1]:qs[2]].cpu())


def test_plan_tiles_covers_every_token_once_longest_first():
    qs, ctx = [0, 37, 50, 51, 51, 83], [37, 33, 50, 7, 600]  # one sequence has no new tokens
    t = ea.plan_tiles(qs, ctx, group=4, head_dim=128, device="cpu", block_m=64)  # 16 tokens per tile
    assert t.tokens_per_tile == 16 and t.tiles.dtype == torch.int32
    seq, first = t.tiles.tolist()
    covered = sorted((s, f + j) for s, f in zip(seq, first) for j in range(min(16, qs[s + 1] - qs[s] - f)))
    assert covered == [(s, j) for s in range(5) for j in range(qs[s + 1] - qs[s])]
    keys = [ctx[s] - (qs[s + 1] - qs[s]) + min(f + 16, qs[s + 1] - qs[s]) for s, f in zip(seq, first)]
    assert keys == sorted(keys, reverse=True) and keys[0] == 600
    with pytest.raises(ValueError, match="power of two"):
        ea.plan_tiles(qs, ctx, group=4, head_dim=128, device="cpu", block_m=48)
    with pytest.raises(ValueError, match="new tokens but a context"):
        ea.plan_tiles([0, 9], [8], group=1, head_dim=128, device="cpu")


def test_contract_violations_are_refused():
    q = torch.randn(5, 6, 16)
    k = torch.randn(4, 8, 4, 16)
    t = torch.zeros(2, 1, dtype=torch.int32)
    qs, lens = torch.tensor([0, 3, 5]), torch.tensor([3, 2])
    with pytest.raises(ValueError, match="do not fit"):
        ea.paged_extend_attention(q, k, k, t, qs, lens, 0.25)  # 6 heads over 4 KV heads
    q = torch.randn(5, 8, 16)
    with pytest.raises(ValueError, match="must match"):
        ea.paged_extend_attention(q, k, k, t, torch.tensor([0, 5]), lens, 0.25)
    with pytest.raises(ValueError, match="cache dtype"):
        ea.paged_extend_attention(q, k.half(), k.half(), t, qs, lens, 0.25)
    with pytest.raises(ValueError, match="contiguous head dim"):
        ea.paged_extend_attention(q.transpose(1, 2).contiguous().transpose(1, 2), k, k, t, qs, lens, 0.25)
    with pytest.raises(ValueError, match="tiles planned for 4"):
        ea.paged_extend_attention(q, k, k, t, qs, lens, 0.25, ea.plan_tiles([0, 3, 5], [3, 2], 4, 16, "cpu"))


def test_custom_op_schema_and_fake():
    """The op passes torch's checks of schema, fake impl and tracing."""
    q, k, v, tables, qs, ctx = build([(3, 17), (9, 1)], 4, 2, 16, 16, torch.float32, seed=3)
    tiles = ea.plan_tiles(qs, ctx, 2, 16, DEV, 16)
    args = tuple(t.to(DEV) for t in (q, k, v, tables, torch.tensor(qs), torch.tensor(ctx), tiles.tiles))
    torch.library.opcheck(torch.ops.mixq.paged_extend_attention.default, args + (0.25, 16))


def test_engine_triton_backend_matches_torch_native_on_chunked_prefill(monkeypatch, tmp_path):
    """--attention-backend triton vs torch_native with chunked prefill of 16 tokens, so
    prefill chunks (fresh and continued) share steps with decodes: identical greedy tokens,
    logprobs equal to fp32 rounding, and the extend kernel ran on every non-decode step.
    Both backends share the engine's positions, rotary and KV-slot code, so both are also
    held to a float64 forward written from scratch (own rotary, positions 0..T-1, full
    causal attention, no cache) on a model whose outputs depend strongly on position."""
    from mixq.engine.engine import LLM
    from mixq.engine.sampling_params import SamplingParams
    from mixq.layers import attention
    from tests.engine.position_model import logprobs_float64, make_position_model
    from tests.engine.test_engine import prompts

    if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the triton backend runs on the CPU only under TRITON_INTERPRET=1")
    model = make_position_model(tmp_path / "model")
    kw = dict(model_path=str(model), max_total_tokens=1024, page_size=8, chunked_prefill_size=16,
              device=DEVICE, dtype="float32", disable_cuda_graph=True)  # decode steps eager too
    ref_llm = LLM(**kw, attention_backend="torch_native")
    fast = LLM(**kw, attention_backend="triton")
    launches = []
    kernel = attention.paged_extend_attention
    monkeypatch.setattr(attention, "paged_extend_attention", lambda *a: launches.append(1) or kernel(*a))
    steps = []  # per step: (start, new tokens) of each sequence
    forward = fast.engine.runner.forward
    monkeypatch.setattr(fast.engine.runner, "forward",
                        lambda chunks, *prev: steps.append([(c.start_pos, len(c.token_ids)) for c in chunks])
                        or forward(chunks, *prev))
    ps = prompts(5, seed=4)
    params = SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True, logprobs=1)
    got = fast.generate(ps, params)
    mixed = [s for s in steps if any(n > 1 for _, n in s) and any(n == 1 for _, n in s)]
    continued = [s for s in steps if any(a > 0 and n > 1 for a, n in s)]
    assert mixed and continued, steps  # the batch exercised what this test is about
    layers = sum(isinstance(m, attention.PagedAttention) for m in fast.engine.model.modules())
    assert len(launches) == sum(any(n > 1 for _, n in s) for s in steps) * layers
    ref = ref_llm.generate(ps, params)
    for a, b in zip(ref, got):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        # fp32 everywhere; the online softmax sums in another order: ~1e-6 relative
        assert max(abs(x - y) for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs)) < 1e-4
        # fp32 engine vs float64: ~1e-5 after the model's sharp attention; a position off by
        # a chunk start moves these by >= 1e-1
        out = b.outputs[0]
        want = logprobs_float64(model, b.prompt_token_ids + out.token_ids)[len(b.prompt_token_ids) - 1: -1]
        want = want.gather(1, torch.tensor(out.token_ids)[:, None])[:, 0]
        assert max(abs(x - float(y)) for x, y in zip(out.logprobs, want)) < 2e-3, (out.logprobs, want)


@pytest.mark.skipif(CUDA, reason="the smoke mode is the CPU interpreter run; on a GPU run bench/extend_attention.py")
def test_extend_benchmark_smoke(tmp_path):
    """bench/extend_attention.py --smoke (tiny shapes, interpreter) runs end to end; the
    script itself fails when an output is off the float64 reference."""
    root = Path(__file__).parents[2]
    out = tmp_path / "extend.json"
    env = {**os.environ, "PYTHONPATH": str(root)}
    r = subprocess.run([sys.executable, "bench/extend_attention.py", "--smoke", "--out", str(out)], cwd=root,
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    # the smoke cases by hand (the script's CASES): (tokens in the cache, new tokens) per sequence
    want = {"prefill 64": [(0, 64)], "2 x 32": [(0, 32)] * 2, "16 after 48": [(48, 16)],
            "32 + 3 decodes @40": [(0, 32)] + [(39, 1)] * 3}
    assert {row["case"]: [tuple(x) for x in row["seqs"]] for row in rows} == want
    for row in rows:
        seqs = want[row["case"]]
        assert row["tokens"] == sum(n for _, n in seqs)
        # causal FLOPs: query row j of a chunk after a tokens attends a + j + 1 keys; q.k and
        # p.v are 2 FLOPs per key per head dim each, 4 query heads of 32
        assert row["flops"] == 4 * 4 * 32 * sum(a + j + 1 for a, n in seqs for j in range(n))
        for m in ("extend", "sdpa", "layer_torch", "layer_triton"):
            x = row[m]
            # vs float64: bf16 inputs exact, bf16 probabilities and output: nonzero, within the
            # kernel tests' 1.6e-2 relative budget, |out| < 3 bounds the absolute error
            assert 0 < x["rel_err"] < 1.6e-2 and 0 < x["max_abs_err"] < 0.05 and x["ok"], (row["case"], m, x)
            assert x["TFLOPs"] == pytest.approx(row["flops"] / x["us"] / 1e6, rel=1e-9)
