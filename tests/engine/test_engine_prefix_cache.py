"""Prefix caching in the engine on the tiny Llama fixture: the same greedy tokens with and
without the cache (--disable-radix-cache), on many concurrent requests sharing prompt
prefixes, under chunked prefill, a cache small enough to evict and preempt, aborts, and the
CUDA-graph decode path; the reused tokens are counted."""

from __future__ import annotations

import random

import pytest

from mixq.engine.engine import LLM
from mixq.engine.sampling_params import SamplingParams
from tests.devices import DEVICE
from tests.engine.test_cuda_graph import CAPTURE, needs_triton
from tests.engine.test_engine import FIX


def shared_prefix_prompts(tok, n: int, seed: int = 0, rounds: bool = False) -> list[list[int]]:
    """n token-id prompts: one of three system prompts (27-61 tokens) + a question of 0-20
    tokens; every fifth repeats an earlier prompt whole. rounds: the system prompts take
    turns in runs of four (A A A A B B B B C C C C A ...), so that under a small cache a
    system prompt's blocks are evicted before it comes back."""
    rng = random.Random(seed)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "then", "ran", "to", "house", "blue", "sky", "you",
             "are", "helpful", "assistant", "answer", "briefly"]
    systems = [tok.encode(" ".join(rng.choice(words) for _ in range(k))) for k in (27, 40, 61)]
    out: list[list[int]] = []
    for i in range(n):
        if i % 5 == 4 and not rounds:
            out.append(list(out[rng.randrange(len(out))]))
        else:
            q = tok.encode(" " + " ".join(rng.choice(words) for _ in range(rng.randint(0, 20))))
            out.append((systems[i // 4 % 3] if rounds else rng.choice(systems)) + q)
    return out


def run(llm: LLM, ps, params, abort_every: int = 0) -> dict[str, list[int]]:
    """Requests added in waves while earlier ones run (so later ones find cached prefixes);
    with abort_every, every abort_every-th request is aborted after its first token.
    Returns the token ids and their logprobs of the requests that finished."""
    eng = llm.engine
    pending = list(enumerate(zip(ps, params)))
    done: dict[str, tuple[list[int], list[float]]] = {}
    while pending or eng.has_unfinished():
        for _ in range(4):
            if pending:
                i, (p, sp) = pending.pop(0)
                eng.add_request(f"q{i}", p, sp)
        for o in eng.step():
            i = int(o.request_id[1:])
            if o.finished:
                done[o.request_id] = (o.outputs[0].token_ids, o.outputs[0].logprobs)
            elif abort_every and i % abort_every == 1:
                assert eng.abort(o.request_id)
    return done


def assert_same(got: dict, ref: dict) -> None:
    """Same tokens, and logprobs equal to fp32 rounding: the cached K/V were computed in
    other batches (other GEMM row counts), ~1e-6 apart; a wrong block moves them by ~1e-2
    on this tiny model, whose greedy tokens barely depend on early positions."""
    for r, (toks, lps) in got.items():
        assert toks == ref[r][0], r
        assert max(abs(a - b) for a, b in zip(lps, ref[r][1])) < 1e-4, r


def make(caching: bool, **kw) -> LLM:
    base = dict(model_path=str(FIX / "bf16"), max_running_requests=16, page_size=8, chunked_prefill_size=44,
                device=DEVICE, dtype="float32", disable_radix_cache=not caching)
    return LLM(**{**base, **kw})


@pytest.mark.parametrize("cache_tokens,n", [(4096, 32), (320, 24)])
def test_identical_tokens_with_and_without_the_cache(cache_tokens, n):
    """n concurrent requests over three shared system prompts; with 320 tokens of KV cache
    (40 blocks) the system prompts take turns, cached blocks are evicted before their
    prompt comes back and running requests are preempted."""
    on, off = make(True, max_total_tokens=cache_tokens), make(False, max_total_tokens=cache_tokens)
    ps = shared_prefix_prompts(on.engine.tokenizer, n, seed=cache_tokens, rounds=cache_tokens < 1000)
    rng = random.Random(1)
    params = [SamplingParams(max_new_tokens=rng.randint(1, 12), temperature=0, ignore_eos=True, logprobs=0)
              for _ in ps]
    got, ref = run(on, ps, params), run(off, ps, params)
    assert len(got) == n
    assert_same(got, ref)
    s_on, s_off = on.engine.scheduler, off.engine.scheduler
    assert s_off.cached_tokens == 0 and s_off.blocks.num_cached == 0
    assert s_on.cached_tokens > 0.4 * sum(len(p) for p in ps), (s_on.cached_tokens, s_on.admitted_tokens)
    assert s_on.blocks.num_free == s_on.blocks.num_blocks  # everything released, cached content kept
    if cache_tokens == 320:
        assert s_on.blocks.num_evicted > 0


def test_aborts_never_free_blocks_another_request_reads():
    """Every third request is aborted after its first token while others share its prefix
    blocks: the survivors' tokens equal those of the uncached engine."""
    on, off = make(True, max_total_tokens=512), make(False, max_total_tokens=512)
    ps = shared_prefix_prompts(on.engine.tokenizer, 12, seed=7)
    params = [SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True, logprobs=0) for _ in ps]
    got = run(on, ps, params, abort_every=3)
    ref = run(off, ps, params)
    assert_same(got, ref)
    assert len(got) == 8 and on.engine.scheduler.cached_tokens > 0


@needs_triton
def test_cached_prefixes_through_the_extend_kernel_and_graph_decode():
    """The triton backend (extend kernel for prefill chunks continuing a cached prefix,
    decode steps through the CUDA-graph buffers) gives the uncached engine's tokens."""
    on = make(True, max_total_tokens=1024, attention_backend="triton", max_running_requests=8)
    runner = on.engine.runner
    runner.capture_decode_graphs([1, 2, 4, 8], -(-on.engine.max_model_len // 8), capture=CAPTURE)
    off = make(False, max_total_tokens=1024, attention_backend="triton", max_running_requests=8,
               disable_cuda_graph=True)
    ps = shared_prefix_prompts(on.engine.tokenizer, 8, seed=3)
    params = [SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True, logprobs=0) for _ in ps]
    got = run(on, ps, params)
    assert len(got) == 8
    assert_same(got, run(off, ps, params))
    assert on.engine.scheduler.cached_tokens > 0


def test_perplexity_scoring_does_not_overwrite_cached_prefixes():
    from mixq.engine.perplexity import perplexity

    llm = make(True, max_total_tokens=256)
    ps = shared_prefix_prompts(llm.engine.tokenizer, 4, seed=5)
    sp = SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True, logprobs=0)
    first = [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in llm.generate(ps, sp)]
    cached = llm.engine.scheduler.blocks.num_cached
    perplexity(llm.engine, "the cat sat on the mat and then ran to the house " * 8, window=64)
    # scoring took never-used blocks or evicted cached ones through the block manager
    assert llm.engine.scheduler.blocks.num_cached <= cached
    again = [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in llm.generate(ps, sp)]
    assert_same(dict(enumerate(again)), dict(enumerate(first)))
    assert llm.engine.scheduler.cached_tokens > 0


def test_disable_radix_cache_flag_reaches_the_scheduler():
    import argparse

    from mixq.server.args import add_server_flags, from_namespace
    from mixq.server.launch import engine_config

    p = argparse.ArgumentParser()
    add_server_flags(p)
    base = ["--model-path", str(FIX / "bf16")]
    assert engine_config(from_namespace(p.parse_args(base))).disable_radix_cache is False
    cfg = engine_config(from_namespace(p.parse_args([*base, "--disable-radix-cache"])))
    assert cfg.disable_radix_cache is True
    assert LLM(**{**vars(cfg), "show_progress": False, "max_total_tokens": 256,
                  "device": DEVICE}).engine.scheduler.blocks.enable_caching is False
