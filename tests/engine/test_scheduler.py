"""Block manager and scheduler, without torch."""

from __future__ import annotations

import random
import subprocess
import sys
from collections import Counter

import pytest

from mixq.engine.block_manager import BlockManager
from mixq.engine.sampling_params import SamplingParams
from mixq.engine.scheduler import Scheduler, SchedulerConfig
from mixq.engine.sequence import SeqStatus, Sequence


def seq(n, max_new=4, rid=None, **kw):
    return Sequence(rid or f"r{random.random()}", list(range(1, n + 1)), SamplingParams(max_new_tokens=max_new, **kw))


def test_engine_core_imports_no_torch():
    code = ("import sys, mixq.engine.scheduler, mixq.engine.block_manager, mixq.engine.sampling_params; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_block_manager_grows_and_frees_across_block_boundaries():
    bm = BlockManager(num_blocks=4, block_size=4)
    s = seq(3)
    bm.reserve(s, 3)
    assert len(s.block_table) == 1 and bm.num_free == 3
    bm.reserve(s, 4)
    assert len(s.block_table) == 1
    bm.reserve(s, 5)
    assert len(s.block_table) == 2
    assert not bm.can_reserve(s, 17) and bm.can_reserve(s, 16)
    with pytest.raises(RuntimeError, match="out of KV blocks"):
        bm.reserve(s, 17)
    bm.free(s)
    assert bm.num_free == 4 and s.block_table == []


def run_to_completion(sched, check=None, max_steps=10_000, eos_at=None):
    """Drive the scheduler with fake tokens; returns per-step batches."""
    steps = []
    for _ in range(max_steps):
        if not sched.has_unfinished():
            return steps
        batch = sched.schedule()
        assert batch, "nothing scheduled while requests are pending"
        steps.append(batch)
        toks = [7 for i in batch.items if i.samples]
        sched.postprocess(batch, toks)
        if check:
            check(sched)
    raise AssertionError("did not finish")


def invariants(sched):
    """Reference counts equal the tables holding each block; free blocks are held by
    nobody; a block held twice is a registered (full, written) one; a sequence's blocks
    from its next position on are its own and unregistered (never shared while written)."""
    bm = sched.blocks
    holders = Counter(b for s in sched.running for b in s.block_table)
    assert bm.ref == [holders.get(b, 0) for b in range(bm.num_blocks)]
    free = [*bm.never_used, *bm.evictable]
    assert len(free) == len(set(free)) == bm.num_free and not set(free) & set(holders)
    assert len(holders) + bm.num_free == bm.num_blocks
    assert all(bm.key[b] is not None for b, n in holders.items() if n > 1)
    for s in sched.running:
        for b in s.block_table[s.num_computed // bm.block_size:]:
            assert holders[b] == 1 and bm.key[b] is None, f"{s!r} would write block {b}, which is shared"
    for s in sched.waiting:
        assert s.block_table == [] and s.num_computed == 0


def test_fcfs_and_max_running():
    sched = Scheduler(SchedulerConfig(num_blocks=100, block_size=4, max_running_requests=2))
    seqs = [seq(5, rid=f"r{i}") for i in range(3)]
    for s in seqs:
        sched.add(s)
    b = sched.schedule()
    assert [i.seq.request_id for i in b.items] == ["r0", "r1"]
    assert all(i.samples and i.num_new_tokens == 5 for i in b.items)
    sched.postprocess(b, [7, 7])
    b = sched.schedule()
    assert [(i.seq.request_id, i.num_new_tokens) for i in b.items] == [("r0", 1), ("r1", 1)]


def test_chunked_prefill_splits_and_only_the_last_chunk_samples():
    sched = Scheduler(SchedulerConfig(num_blocks=100, block_size=4, chunked_prefill_size=8))
    s = seq(21, max_new=2)
    sched.add(s)
    sizes = []
    for _ in range(3):
        b = sched.schedule()
        (item,) = b.items
        sizes.append((item.num_new_tokens, item.samples))
        sched.postprocess(b, [7] if item.samples else [])
    assert sizes == [(8, False), (8, False), (5, True)]  # ceil(21 / 8) steps
    assert s.output_token_ids == [7] and s.num_computed == 21


def test_token_budget_is_shared_between_decode_and_prefill():
    sched = Scheduler(SchedulerConfig(num_blocks=100, block_size=4, chunked_prefill_size=10))
    a, b_ = seq(4, max_new=10, rid="a"), seq(30, rid="b")
    sched.add(a)
    sched.postprocess(sched.schedule(), [7])
    sched.add(b_)
    batch = sched.schedule()
    assert [(i.seq.request_id, i.num_new_tokens) for i in batch.items] == [("a", 1), ("b", 9)]
    assert batch.num_tokens == 10


def test_preemption_frees_blocks_and_the_victim_completes_later():
    # 6 blocks of 4 tokens; two sequences that each grow to 12 tokens (3 blocks) fit only
    # if they never overlap at their largest: the newest is preempted and recomputed
    sched = Scheduler(SchedulerConfig(num_blocks=5, block_size=4))
    a, b = seq(7, max_new=6, rid="a"), seq(7, max_new=6, rid="b")
    sched.add(a)
    sched.add(b)
    steps = run_to_completion(sched, invariants)
    assert any(s.preempted for s in steps)
    assert {x.request_id for s in steps for x in s.preempted} == {"b"}
    assert len(a.output_token_ids) == 6 and len(b.output_token_ids) == 6
    assert a.finish_reason == b.finish_reason == "length"
    assert sched.blocks.num_free == 5


@pytest.mark.parametrize("where", ["waiting", "running", "mid-prefill"])
def test_abort_frees_blocks(where):
    sched = Scheduler(SchedulerConfig(num_blocks=50, block_size=4, chunked_prefill_size=8, max_running_requests=1))
    first, s = seq(20, rid="first"), seq(20, rid="x")
    if where == "waiting":
        sched.add(first)
        sched.add(s)
        sched.schedule()
    else:
        sched.add(s)
        b = sched.schedule()
        if where == "running":
            for _ in range(3):
                sched.postprocess(b, [7] if b.items[0].samples else [])
                b = sched.schedule()
    assert sched.abort("x")
    assert s.status == SeqStatus.FINISHED and s.finish_reason == "abort" and s.block_table == []
    used = sum(len(q.block_table) for q in sched.running)
    assert sched.blocks.num_free == 50 - used


def test_requests_that_can_never_fit_are_refused():
    sched = Scheduler(SchedulerConfig(num_blocks=4, block_size=4, max_model_len=64))
    with pytest.raises(ValueError, match=r"request big: prompt of 17 tokens exceeds the limit of 16"):
        sched.add(seq(17, rid="big"))
    with pytest.raises(ValueError, match=r"request long: prompt 10 \+ max_new_tokens 10 exceeds the KV cache capacity of 16"):
        sched.add(seq(10, max_new=10, rid="long"))


def test_stop_tokens_eos_and_min_tokens():
    sched = Scheduler(SchedulerConfig(num_blocks=20, block_size=4, eos_token_ids=(2,)))
    a, b, c = seq(3, max_new=5, rid="a"), seq(3, max_new=5, rid="b", ignore_eos=True), seq(3, max_new=5, rid="c",
                                                                                             stop_token_ids=[9])
    for s in (a, b, c):
        sched.add(s)
    sched.postprocess(sched.schedule(), [2, 2, 9])
    assert a.finish_reason == "stop" and c.finish_reason == "stop" and not b.is_finished
    m = seq(3, max_new=5, rid="m", min_new_tokens=2)
    sched.add(m)
    sched.postprocess(sched.schedule(), [2, 2])  # b, m: m ignores EOS before its 2nd token
    assert not m.is_finished


def test_randomized_simulation_all_finish_with_invariants():
    rng = random.Random(0)
    sched = Scheduler(SchedulerConfig(num_blocks=40, block_size=4, max_running_requests=8, chunked_prefill_size=16,
                                      max_model_len=128))
    seqs = []
    for i in range(60):
        s = seq(rng.randint(1, 40), max_new=rng.randint(1, 20), rid=f"q{i}")
        seqs.append(s)
        sched.add(s)
    run_to_completion(sched, invariants)
    for s in seqs:
        assert s.finish_reason == "length" and len(s.output_token_ids) == s.params.max_new_tokens
    assert sched.blocks.num_free == 40


def test_no_sequence_ever_exceeds_max_model_len():
    """The context limit, directly: with max_model_len 32, a prompt may hold at most 31
    tokens (one position left to generate into), every sequence stops with "length" at
    exactly 32 tokens whatever its max_new_tokens, and none is ever seen at 33, under
    chunked prefill and preemption."""
    m = 32
    sched = Scheduler(SchedulerConfig(num_blocks=24, block_size=4, max_model_len=m, chunked_prefill_size=8,
                                      max_running_requests=6))
    with pytest.raises(ValueError, match=r"a prompt of 32 tokens leaves no room to generate within max_model_len 32"):
        sched.check(seq(m, max_new=1))
    with pytest.raises(ValueError, match="leaves no room"):
        sched.add(seq(m + 5, max_new=1))
    assert not sched.waiting
    lengths = [1, 2, 15, 16, 17, 30, 31, 31, 29, 8]
    seqs = [seq(n, max_new=10_000, rid=f"c{i}") for i, n in enumerate(lengths)]  # only the context stops them
    for s in seqs:
        sched.add(s)
    longest = []

    def check(sc):
        for s in seqs:
            assert s.num_tokens <= m, f"{s!r} holds {s.num_tokens} tokens > max_model_len {m}"
        longest.append(max(s.num_tokens for s in seqs))
        invariants(sc)

    steps = run_to_completion(sched, check)
    assert any(b.preempted for b in steps)  # 10 sequences of up to 8 blocks in 24 blocks
    for n, s in zip(lengths, seqs):
        assert (s.num_tokens, s.finish_reason, len(s.output_token_ids)) == (m, "length", m - n)
    assert max(longest) == m and sched.blocks.num_free == 24
