"""Detokenization off the engine loop (issue 18 point 5): the server's detokenizer thread
and `LLM.generate`'s one decode at the end give exactly the outputs of the synchronous path
(the engine detokenizing every step itself, `defer_text` off) — text, deltas, token ids,
logprobs, finish_reason — for plain requests, n > 1, stop strings that straddle tokens
(detokenized on the engine thread, held back in streams), skip_special_tokens off and
aborts mid-stream; and the thread ends with the engine's."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from mixq.engine.detokenizer import DetokState, IncrementalDetokenizer
from mixq.engine.engine import LLM
from mixq.engine.sampling_params import SamplingParams
from mixq.server.async_engine import AsyncEngine

FIX = Path(__file__).parents[1] / "fixtures" / "tiny-llama" / "bf16"


@pytest.fixture(scope="module", params=["fixture", "smollm2"])
def llm(request, default_model_root):
    """The tiny Llama; with smollm2's byte-level BPE as its tokenizer, its ids (< 256) are
    mostly single bytes, so characters split across tokens and steps."""
    tok = None if request.param == "fixture" else str(default_model_root / "bf16")
    llm = LLM(model_path=str(FIX), tokenizer_path=tok, max_total_tokens=4096, page_size=8, device="cpu",
              dtype="float32")
    yield llm
    llm.close()


def _sync(llm, reqs) -> dict[str, list]:
    """The synchronous path: the engine detokenizes every step; all requests added at once."""
    eng = llm.engine
    assert not eng.defer_text
    for rid, prompt, sp in reqs:
        eng.add_request(rid, prompt, sp)
    seen: dict[str, list] = {}
    while eng.has_unfinished():
        for o in eng.step():
            seen.setdefault(o.request_id, []).append(o)
    return seen


def _requests(llm, rng):
    """Plain, n=2 with logprobs, skip_special_tokens off, stop strings taken from a free
    run's text so that they straddle tokens (one word's end and the next one's start), and a
    stop token id (the token that ends it has no text) from a free run too."""
    prompts = [[rng.randrange(3, 250) for _ in range(rng.randint(3, 12))] for _ in range(6)]
    free = llm.generate(prompts[3:], SamplingParams(max_new_tokens=16, temperature=0, ignore_eos=True))
    stop_id = free[2].outputs[0].token_ids[5]
    stops = []
    for o in free[:2]:
        t = o.outputs[0].text
        assert len(t) >= 4, t
        a = len(t) // 3
        stops.append(t[a : a + 3])  # three characters from inside the text: a partial match is held back first
    return [("plain", prompts[0], SamplingParams(max_new_tokens=14, temperature=0, ignore_eos=True)),
            ("n2", prompts[1], SamplingParams(max_new_tokens=11, temperature=0.8, seed=5, n=2, logprobs=2)),
            ("special", prompts[2], SamplingParams(max_new_tokens=9, temperature=0, skip_special_tokens=False)),
            ("stop", prompts[3], SamplingParams(max_new_tokens=16, temperature=0, ignore_eos=True, stop=stops[:1])),
            ("stop2", prompts[4], SamplingParams(max_new_tokens=16, temperature=0, ignore_eos=True, n=2,
                                                 stop=[stops[1], "\u0100\u0101"])),
            ("stoptok", prompts[5], SamplingParams(max_new_tokens=16, temperature=0, ignore_eos=True,
                                                   skip_special_tokens=False, stop_token_ids=[stop_id]))]


async def _collect(aengine, reqs, abort_after=None) -> dict[str, list]:
    """Every request's outputs through the AsyncEngine; the adds are queued before the
    engine thread starts, so its first step batches them all, as the synchronous run does.
    abort_after: {request id: k} leaves that stream after k outputs (the client went away)."""
    abort_after = abort_after or {}
    got: dict[str, list] = {}

    async def one(rid, prompt, sp):
        got[rid] = []
        async for o in aengine.generate(rid, prompt, sp):
            got[rid].append(o)
            if len(got[rid]) == abort_after.get(rid):
                break

    tasks = [asyncio.ensure_future(one(*r)) for r in reqs]
    for _ in range(5):
        await asyncio.sleep(0)  # each task queues its add
    aengine.start()
    await asyncio.gather(*tasks)
    return got


def test_detokenizer_thread_gives_the_synchronous_outputs(llm):
    reqs = _requests(llm, random.Random(7))
    want = _sync(llm, reqs)
    assert [want[r][-1].outputs[0].finish_reason for r in ("stop", "stop2", "stoptok")] == ["stop"] * 3
    aengine = AsyncEngine(llm.engine)
    try:
        assert llm.engine.defer_text
        got = asyncio.run(_collect(aengine, reqs))
    finally:
        aengine.shutdown()
        llm.engine.set_defer_text(False)
    for rid, *_ in reqs:
        assert len(got[rid]) == len(want[rid]), rid
        for g, w in zip(got[rid], want[rid]):  # every step's output: text, deltas, ids, logprobs, reason
            assert g.finished == w.finished and g.outputs == w.outputs, (rid, g.outputs, w.outputs)
        final = got[rid][-1].outputs
        assert [len(c.token_ids) for c in final] == [len(c.token_ids) for c in want[rid][-1].outputs]  # usage
    assert any(c.text for rid in got for c in got[rid][-1].outputs)
    assert len(aengine.stage) == 0  # every request's text state went with its finished output


def test_abort_mid_stream_and_the_threads_end_with_the_engine(llm):
    reqs = _requests(llm, random.Random(11))
    want = _sync(llm, reqs)
    before = {t.ident for t in threading.enumerate()}
    aengine = AsyncEngine(llm.engine)
    try:
        got = asyncio.run(_collect(aengine, reqs, abort_after={"plain": 3, "n2": 2}))
        # what the aborted streams saw is what the synchronous path showed at those steps
        for rid, k in (("plain", 3), ("n2", 2)):
            assert len(got[rid]) == k
            assert [o.outputs for o in got[rid]] == [o.outputs for o in want[rid][:k]], rid
        deadline = time.monotonic() + 30
        while (llm.engine.requests or llm.engine.has_unfinished()) and time.monotonic() < deadline:
            time.sleep(0.01)  # the aborts reach the engine thread between its steps
        assert llm.engine.requests == {} and not llm.engine.has_unfinished()
        names = {t.name for t in threading.enumerate()}
        assert {"mixq-engine", "mixq-detok"} <= names
    finally:
        aengine.shutdown()
        llm.engine.set_defer_text(False)
    assert not aengine._thread.is_alive() and not aengine._detok_thread.is_alive()
    assert {t.ident for t in threading.enumerate() if t.name.startswith("mixq-")} <= before
    # the aborted requests' text state went with their aborts
    assert len(aengine.stage) == 0


def test_generate_decodes_once_at_the_end_what_the_steps_would_have(llm):
    """`LLM.generate` defers text (no detokenization per step) and decodes each sequence once
    when it ends; a stream of the same requests detokenizes every step. Same outputs."""
    rng = random.Random(3)
    reqs = _requests(llm, rng) + [(f"r{i}", [rng.randrange(3, 250) for _ in range(rng.randint(2, 10))],
             SamplingParams(max_new_tokens=rng.randint(1, 20), temperature=1.0, seed=i, n=1 + i % 2,
                            skip_special_tokens=bool(i % 3))) for i in range(8)]
    want = _sync(llm, reqs)
    got = llm.generate([p for _, p, _ in reqs], [sp for *_, sp in reqs])
    for (rid, *_), g in zip(reqs, got):
        w = want[rid][-1]
        for gc, wc in zip(g.outputs, w.outputs):
            assert (gc.text, gc.token_ids, gc.finish_reason, gc.logprobs) == \
                (wc.text, wc.token_ids, wc.finish_reason, wc.logprobs), rid
            assert gc.text_ids is None and gc.delta_text == "".join(o.outputs[gc.index].delta_text
                                                                    for o in want[rid])


@pytest.mark.parametrize("which", ["fixture", "smollm2"])
def test_final_texts_equal_the_settled_steps(which, default_model_root):
    """One decode of a whole sequence (final_texts) against `step` token by token, on random
    ids (byte-level ids that leave characters incomplete, at the end too) and real text."""
    tok = AutoTokenizer.from_pretrained(FIX if which == "fixture" else default_model_root / "bf16")
    det = IncrementalDetokenizer(tok)
    rng = random.Random(2)
    text = "Le café coûte 3€ — naïve 日本語 🙂 done. "
    seqs = [tok.encode(text, add_special_tokens=False)[: rng.randint(1, 30)] for _ in range(20)]
    seqs += [[rng.randrange(min(tok.vocab_size, 400)) for _ in range(rng.randint(0, 30))] for _ in range(200)]
    for skip in (True, False):
        want = []
        for ids in seqs:
            st, t = DetokState(), ""
            for n in range(1, len(ids) + 1):
                t += det.step(st, ids[:n], skip)
            want.append(t)
        assert det.final_texts(seqs, skip) == want
        if which == "smollm2":  # some end in an incomplete character, which the steps never settled
            assert any(t != det.decode(ids, skip) for t, ids in zip(want, seqs))
