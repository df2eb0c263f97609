"""The overlap schedule (mixq.engine.overlap) on the tiny Llama fixture, on the CPU: the same
code path as on the GPU, one step behind, with the sampled tokens fed to the next step as
placeholders resolved by tensor ops. Its outputs are compared with the engine that records
each step at once (--disable-overlap-schedule) and with expected values taken from a
plain greedy run."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from mixq.engine.engine import LLM
from mixq.engine.sampler import SampleResult
from mixq.engine.sampling_params import SamplingParams
from mixq.engine.scheduler import Scheduler, SchedulerConfig
from mixq.engine.sequence import SeqStatus, Sequence
from tests.devices import DEVICE

FIX = Path(__file__).parents[1] / "fixtures" / "tiny-llama" / "bf16"


def make(overlap: bool, **kw) -> LLM:
    opts = dict(max_total_tokens=2048, page_size=8, chunked_prefill_size=32, device=DEVICE, dtype="float32")
    return LLM(model_path=str(FIX), disable_overlap_schedule=not overlap, **{**opts, **kw})


@pytest.fixture(scope="module")
def engines():
    on, off = make(True), make(False)
    assert on.engine.overlap and not off.engine.overlap
    return on, off


def token_prompts(n: int, seed: int, shared: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    head = [rng.randrange(3, 250) for _ in range(shared)]
    return [head + [rng.randrange(3, 250) for _ in range(rng.randint(3, 30))] for _ in range(n)]


def test_the_next_step_is_queued_before_the_last_is_read(engines, monkeypatch):
    """With overlap, step i's samples are read (the host sync) only after step i+1 was
    queued, which took step i's tokens as placeholders; without, read right after."""
    for llm, overlap in zip(engines, (True, False)):
        events = []
        forward, output = llm.engine.runner.forward, SampleResult.output

        def spy_forward(chunks, prev=None, _f=forward, events=events):
            events.append(("F", any(t < 0 for c in chunks for t in c.token_ids), prev is not None))
            return _f(chunks, prev) if prev is not None else _f(chunks)

        def spy_output(self, _o=output, events=events):
            events.append(("R",))
            return _o(self)

        monkeypatch.setattr(llm.engine.runner, "forward", spy_forward)
        monkeypatch.setattr(SampleResult, "output", spy_output)
        short = [[5, 9, 14, 3], [7, 7, 21], [30, 4, 11, 12, 13]]  # one prefill step for all three
        llm.generate(short, SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True))
        monkeypatch.undo()
        kinds = "".join(e[0] for e in events)
        decodes = [e for e in events if e[0] == "F"][1:]  # every forward after the prefill decodes
        if overlap:
            assert kinds == "F" + "FR" * 5 + "R", kinds  # 6 steps, each read after the next was queued
            assert all(e[1] and e[2] for e in decodes)  # fed from the device: placeholders + prev tokens
        else:
            assert kinds == "FR" * 6, kinds
            assert not any(e[1] or e[2] for e in decodes)


def _compare(a, b) -> None:
    for x, y in zip(a, b):
        for p, q in zip(x.outputs, y.outputs):
            assert (p.token_ids, p.text, p.finish_reason) == (q.token_ids, q.text, q.finish_reason)
            assert len(p.logprobs) == len(q.logprobs)
            # the same math on the same rows; a batch may hold one row more with overlap (a
            # sequence that stopped, computed once more and dropped): fp32 GEMMs of another
            # height may round differently in the last bits
            assert all(abs(s - t) < 1e-5 for s, t in zip(p.logprobs, q.logprobs))
            assert [[i for i, _ in r] for r in p.top_logprobs] == [[i for i, _ in r] for r in q.top_logprobs]


def test_same_outputs_with_and_without_overlap(engines):
    """One batch mixing what the record one step late must still get exactly right: lengths,
    stop strings and stop tokens, logprobs, penalties (which count the token in flight),
    seeded sampling with n = 2, and prompts sharing a cached prefix."""
    on, off = engines
    ps = token_prompts(8, seed=2, shared=20)
    base = off.generate(ps[0], SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True))[0].outputs[0]
    stop_str = base.text[len(base.text) // 2 : len(base.text) // 2 + 3]
    params = [
        SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True, stop=[stop_str]),
        SamplingParams(max_new_tokens=1, temperature=0, logprobs=2),
        SamplingParams(max_new_tokens=9, temperature=0, logprobs=0, stop_token_ids=[base.token_ids[4]]),
        SamplingParams(max_new_tokens=14, temperature=0, repetition_penalty=1.5, frequency_penalty=0.7,
                       presence_penalty=0.3),
        SamplingParams(max_new_tokens=10, temperature=0.9, top_p=0.9, top_k=20, seed=5, n=2, logprobs=1),
        SamplingParams(max_new_tokens=7, temperature=0, ignore_eos=True, min_new_tokens=7),
        SamplingParams(max_new_tokens=11, temperature=0),
        SamplingParams(max_new_tokens=5, temperature=0, stop=["\n", "e"]),
    ]
    a, b = on.generate(ps, params), off.generate(ps, params)
    assert a[0].outputs[0].finish_reason == "stop" and stop_str not in a[0].outputs[0].text
    assert len(a[1].outputs[0].top_logprobs[0]) == 2
    _compare(a, b)
    for o, sp in zip(a, params):
        for c in o.outputs:
            if c.finish_reason == "length":
                assert len(c.token_ids) == sp.max_new_tokens
    for llm in engines:
        s = llm.engine.scheduler
        assert s.blocks.num_used == 0 and not s.running and not s.waiting and not llm.engine.has_unfinished()


def test_streamed_deltas_are_the_same(engines):
    on, off = engines
    p = token_prompts(1, seed=4)[0]
    sp = SamplingParams(max_new_tokens=10, temperature=0, ignore_eos=True, stop=["zz"])
    a, b = list(on.stream(p, sp)), list(off.stream(p, sp))
    assert a == b and "".join(a) == on.generate(p, sp)[0].outputs[0].text


def test_min_new_tokens_counts_the_token_in_flight(engines):
    """EOS/stop tokens are banned before min_new_tokens *including* the token still on the
    device: a stop token due at position k with min_new_tokens = k ends the sequence there
    (k + 1 tokens, the greedy run's), not later."""
    on, off = engines
    greedy = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)
    for p in token_prompts(8, seed=6):  # a prompt whose greedy run has a new token at k >= 2
        base = off.generate(p, greedy)[0].outputs[0].token_ids
        k = next((j for j in range(2, 12) if base[j] not in base[:j]), None)
        if k is not None:
            break
    assert k is not None, "no greedy run with a fresh token: pick other prompts"
    sp = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True, stop_token_ids=[base[k]],
                        min_new_tokens=k)
    for llm in engines:
        out = llm.generate(p, sp)[0].outputs[0]
        assert (out.token_ids, out.finish_reason) == (base[: k + 1], "stop")


def test_abort_while_its_step_is_in_flight(engines):
    """A request aborted while a step that holds it runs: nothing more comes out for it,
    its blocks are free at once, and the other request's outputs are untouched."""
    on, off = engines
    eng = on.engine
    pa, pb = [12, 40, 7, 99, 3], [8, 8, 61, 5]  # both prefilled in the first step
    sp = SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True, logprobs=0)
    eng.add_request("a", pa, sp)
    eng.add_request("b", pb, sp)
    seen = [o for _ in range(3) for o in eng.step()]
    assert eng._in_flight is not None and any(i.seq.request_id == "a" for i in eng._in_flight.batch.items)
    assert eng.abort("a")
    assert all(s.request_id == "b" for s in eng.scheduler.running)
    while eng.has_unfinished():
        seen += eng.step()
    assert not [o for o in seen[4:] if o.request_id == "a"]  # the first three steps: a and b each
    final_b = [o for o in seen if o.request_id == "b" and o.finished]
    alone = off.generate(pb, sp)[0]
    _compare(final_b, [alone])
    assert eng.scheduler.blocks.num_used == 0


def test_preemption_with_a_token_in_flight():
    """A tiny cache forces preemptions while the victims' tokens are in flight: the victim
    keeps that token (recorded after it was preempted) and recomputes it."""
    on, off = make(True, max_total_tokens=96, chunked_prefill_size=16), make(False, max_total_tokens=96,
                                                                            chunked_prefill_size=16)
    victims = []
    orig = on.engine.scheduler._preempt

    def spy(seq):
        victims.append(seq.num_pending)
        orig(seq)

    on.engine.scheduler._preempt = spy
    ps = token_prompts(6, seed=3)
    sp = SamplingParams(max_new_tokens=10, temperature=0, ignore_eos=True, logprobs=0)
    _compare(on.generate(ps, sp), off.generate(ps, sp))
    assert any(victims), victims  # some victim had a token in flight


def test_scheduler_one_step_ahead():
    """Plain scheduler bookkeeping: step i+1 scheduled before step i is recorded."""
    s = Scheduler(SchedulerConfig(num_blocks=8, block_size=4, eos_token_ids=(2,)))
    a = Sequence("a", [5, 6, 7], SamplingParams(max_new_tokens=2))
    b = Sequence("b", [5, 6, 8, 9], SamplingParams(max_new_tokens=5))
    s.add(a)
    s.add(b)
    b1 = s.schedule()
    assert [(i.num_new_tokens, i.samples) for i in b1.items] == [(3, True), (4, True)]
    assert (a.num_computed, a.num_pending) == (3, 1)
    b2 = s.schedule()  # both decode their token in flight
    assert [(i.seq.request_id, i.start, i.num_new_tokens) for i in b2.items] == [("a", 3, 1), ("b", 4, 1)]
    assert a.num_pending == 2
    s.postprocess(b1, [9, 2])  # b ends on EOS; a got its first token
    assert b.status == SeqStatus.FINISHED and a.output_token_ids == [9] and a.num_pending == 1
    b3 = s.schedule()  # a's token in flight is its second and last: nothing left to compute
    assert not b3
    s.postprocess(b2, [4, 4])  # b's token is dropped
    assert a.output_token_ids == [9, 4] and a.finish_reason == "length" and b.output_token_ids == [2]
    assert s.blocks.num_used == 0 and not s.has_unfinished()


def test_disable_overlap_schedule_flag_reaches_the_engine():
    import argparse

    from mixq.server.args import add_server_flags, from_namespace
    from mixq.server.launch import engine_config

    p = argparse.ArgumentParser()
    add_server_flags(p)
    base = ["--model-path", str(FIX)]
    assert engine_config(from_namespace(p.parse_args(base))).disable_overlap_schedule is False
    assert engine_config(from_namespace(p.parse_args([*base, "--disable-overlap-schedule"]))).disable_overlap_schedule


@pytest.mark.skipif(DEVICE != "cuda", reason="host syncs are a CUDA matter (MIXQ_TEST_DEVICE=cuda)")
def test_decode_steps_never_wait_for_the_device():
    """In steady decode (CUDA graphs, the overlap schedule) a step queues the next batch and
    reads the last one's samples through an event: no stream or device sync, no blocking
    copy (torch's sync debug mode raises on any)."""
    eng = make(True, max_running_requests=8).engine
    assert eng.runner.graphs is not None
    for i, p in enumerate(token_prompts(4, seed=9)):
        eng.add_request(str(i), p, SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True))
    for _ in range(3):  # prefill and the first decodes: compiles, allocations
        eng.step()
    torch.cuda.set_sync_debug_mode("error")
    try:
        outs = [o for _ in range(5) for o in eng.step()]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert len(outs) == 20
