"""Prefix caching in the block manager and scheduler, without torch.

The simulation runs a fake model over a fake paged KV cache: each computed position's slot
receives the exact token prefix it was computed from (what a real K/V entry depends on),
every step reads each scheduled sequence's whole context back through its block table
and checks it slot by slot, and the sampled token is a function of what was read. So a
block matched wrongly, or overwritten while another sequence still reads it, changes a
read and fails the check; and every request's output is compared with the same function
iterated over its prompt alone, without any scheduler.
"""

from __future__ import annotations

import random

import pytest

from mixq.engine.block_manager import BlockManager
from mixq.engine.sampling_params import SamplingParams
from mixq.engine.scheduler import Scheduler, SchedulerConfig
from mixq.engine.sequence import SeqStatus, Sequence
from tests.engine.test_scheduler import invariants


def mkseq(tokens, max_new=4, rid=None):
    return Sequence(rid or f"r{random.random()}", list(tokens), SamplingParams(max_new_tokens=max_new, ignore_eos=True))


def next_token(context: tuple[int, ...]) -> int:
    """The fake model: a token from the whole context (order-sensitive)."""
    h = 0
    for t in context:
        h = (h * 31 + t) % 1_000_003
    return 3 + h % 97


def reference_output(prompt: list[int], n: int) -> list[int]:
    ctx = list(prompt)
    for _ in range(n):
        ctx.append(next_token(tuple(ctx)))
    return ctx[len(prompt):]


class FakeKV:
    """slot -> the token prefix whose last position was computed into it."""

    def __init__(self, num_blocks: int, block_size: int):
        self.bs = block_size
        self.slots: list[tuple | None] = [None] * (num_blocks * block_size)

    def step(self, sched: Scheduler) -> list[int]:
        batch = sched.schedule()
        assert batch, "nothing scheduled while requests are pending"
        bs = self.bs
        for it in batch.items:  # write the new tokens' entries (as the model runner does)
            assert it.num_new_tokens >= 1, f"{it.seq!r}: nothing to compute (a sampling row needs its last token)"
            toks, table = it.seq.token_ids, it.seq.block_table
            for p in range(it.start, it.start + it.num_new_tokens):
                self.slots[table[p // bs] * bs + p % bs] = tuple(toks[: p + 1])
        sampled = []
        for it in batch.items:  # attention reads every position of the context
            toks, table = it.seq.token_ids, it.seq.block_table
            end = it.start + it.num_new_tokens
            for p in range(end):
                got = self.slots[table[p // bs] * bs + p % bs]
                assert got == tuple(toks[: p + 1]), f"{it.seq!r}: position {p} reads another prefix's entry"
            if it.samples:
                sampled.append(next_token(tuple(toks[:end])))
        sched.postprocess(batch, sampled)
        return sampled


def test_register_match_and_the_one_token_short_rule():
    bm = BlockManager(num_blocks=10, block_size=4)
    a = mkseq(range(1, 13))  # 3 full blocks
    assert bm.match_prefix(a) == []
    bm.allocate(a, [], 12)
    a.num_computed = 12
    bm.cache_computed(a)
    assert bm.num_cached == 3 and a.num_cached_blocks == 3
    # the same 12 tokens match only 2 blocks: the 12th token must be computed for its logits
    assert bm.match_prefix(mkseq(range(1, 13))) == a.block_table[:2]
    assert bm.match_prefix(mkseq(range(1, 14))) == a.block_table
    assert bm.match_prefix(mkseq([*range(1, 9), 99, 10, 11, 12, 13])) == a.block_table[:2]
    # a block's key includes everything before it: the same third block after another start misses
    assert bm.match_prefix(mkseq([7, *range(2, 14)])) == []


def test_partly_computed_blocks_are_not_registered():
    bm = BlockManager(num_blocks=10, block_size=4)
    a = mkseq(range(1, 11))
    bm.allocate(a, [], 10)
    a.num_computed = 7  # a chunk ended mid-block: block 1 is not fully written
    bm.cache_computed(a)
    assert bm.num_cached == 1
    assert bm.match_prefix(mkseq(range(1, 20))) == a.block_table[:1]


def test_eviction_takes_never_used_blocks_first_then_the_least_recently_released():
    bm = BlockManager(num_blocks=6, block_size=2)
    a, b = mkseq([1, 2, 3, 4, 5]), mkseq([9, 8, 7, 6, 5])
    for s in (a, b):
        bm.allocate(s, [], 4)
        s.num_computed = 4
        bm.cache_computed(s)
    a_blocks, b_blocks = list(a.block_table), list(b.block_table)
    bm.free(a)
    bm.free(b)  # released after a: evicted after a's
    assert bm.num_free == 6 and bm.num_cached == 4
    taken = bm.take(2)
    assert set(taken).isdisjoint(a_blocks + b_blocks)  # the two never-used blocks
    assert bm.num_cached == 4
    # a's tail block goes before a's first (released tail first), then b's
    assert bm.take(1) == [a_blocks[1]] and bm.match_prefix(a) == a_blocks[:1]
    assert bm.take(1) == [a_blocks[0]] and bm.match_prefix(a) == []
    assert bm.match_prefix(b) == b_blocks
    assert bm.take(2) == [b_blocks[1], b_blocks[0]] and bm.num_cached == 0


def test_a_matched_block_leaves_the_eviction_queue_and_counts_as_taken():
    bm = BlockManager(num_blocks=3, block_size=2)
    a = mkseq([1, 2, 3, 4, 5])
    bm.allocate(a, [], 5)  # 3 blocks
    a.num_computed = 5
    bm.cache_computed(a)
    bm.free(a)
    b = mkseq([1, 2, 3, 4, 6, 7])
    hits = bm.match_prefix(b)
    assert len(hits) == 2
    # 2 revived + 1 new = all 3 blocks; one more token would need a 4th
    assert bm.can_allocate(b, hits, 6) and not bm.can_allocate(b, hits, 7)
    bm.allocate(b, hits, 6)
    assert b.num_computed == 4 and b.block_table[:2] == hits and bm.num_free == 0


def test_aborting_or_preempting_one_sharer_keeps_the_blocks_of_the_other():
    sched = Scheduler(SchedulerConfig(num_blocks=12, block_size=4, chunked_prefill_size=64))
    kv = FakeKV(12, 4)
    first = mkseq(range(1, 18), max_new=20, rid="first")
    sched.add(first)
    kv.step(sched)
    shared = first.block_table[:4]
    second = mkseq([*range(1, 17), 50, 51], max_new=20, rid="second")
    sched.add(second)
    kv.step(sched)
    assert second.block_table[:4] == shared and second.num_cached_tokens == 16
    assert all(sched.blocks.ref[b] == 2 for b in shared)
    sched.abort("first")
    assert all(sched.blocks.ref[b] == 1 for b in shared)
    for _ in range(3):  # second keeps reading the shared blocks, checked slot by slot
        kv.step(sched)
        invariants(sched)
    third = mkseq([*range(1, 17), 60], max_new=20, rid="third")
    sched.add(third)
    kv.step(sched)
    assert third.block_table[:4] == shared
    sched._preempt(third)
    assert all(sched.blocks.ref[b] == 1 for b in shared) and third.block_table == []
    while sched.has_unfinished():
        kv.step(sched)
        invariants(sched)
    assert second.output_token_ids == reference_output(second.prompt_token_ids, 20)
    assert third.output_token_ids == reference_output(third.prompt_token_ids, 20)


def test_a_block_computed_twice_at_once_stays_private_and_later_blocks_still_chain():
    sched = Scheduler(SchedulerConfig(num_blocks=20, block_size=4))
    kv = FakeKV(20, 4)
    a, b = mkseq(range(1, 11), max_new=8, rid="a"), mkseq(range(1, 11), max_new=8, rid="b")
    sched.add(a)
    sched.add(b)  # admitted in the same step: neither finds the other's blocks
    kv.step(sched)
    assert set(a.block_table).isdisjoint(b.block_table) and sched.blocks.num_cached == 2
    for _ in range(4):  # both decode past position 12: block 2 holds the same tokens in both
        kv.step(sched)
    assert a.token_ids == b.token_ids and a.num_computed >= 12
    assert sched.blocks.num_cached == 3
    c = mkseq(a.token_ids[:13], rid="c")
    assert sched.blocks.match_prefix(c) == a.block_table[:3]


@pytest.mark.parametrize("caching", [True, False])
def test_many_requests_with_shared_prefixes_under_a_tiny_cache(caching):
    """Shared system prompts, repeats, prompts of whole blocks, chunked prefill, a cache too
    small for all of them (eviction and preemption) and random aborts: every read is
    checked, every finished request matches its reference, and with caching prefixes are
    actually reused and cached blocks evicted."""
    rng = random.Random(1)
    bs, blocks = 4, 48
    sched = Scheduler(SchedulerConfig(num_blocks=blocks, block_size=bs, max_running_requests=12,
                                      chunked_prefill_size=24, max_model_len=160, enable_prefix_caching=caching))
    kv = FakeKV(blocks, bs)
    systems = [[rng.randrange(3, 100) for _ in range(n)] for n in (20, 33, 8)]
    prompts = []
    for i in range(90):
        if i % 9 == 0 and prompts:
            prompts.append(list(rng.choice(prompts)))  # a repeat of an earlier prompt
        else:
            sys_ = rng.choice(systems)
            prompts.append(sys_ + [rng.randrange(3, 100) for _ in range(rng.choice((0, 1, 4, 7, 12)))])
    seqs, aborted = [], set()
    pending = list(enumerate(prompts))
    preemptions = 0
    while pending or sched.has_unfinished():
        for _ in range(rng.randint(0, 3)):  # arrivals between steps
            if pending:
                i, p = pending.pop(0)
                s = mkseq(p, max_new=rng.randint(1, 16), rid=f"q{i}")
                seqs.append(s)
                sched.add(s)
        if not sched.has_unfinished():
            continue
        kv.step(sched)
        preemptions += sum(1 for s in sched.waiting if s.output_token_ids)
        invariants(sched)
        if rng.random() < 0.08 and sched.running:  # abort a running request
            victim = rng.choice(sched.running)
            aborted.add(victim.request_id)
            sched.abort(victim.request_id)
            invariants(sched)
    for s in seqs:
        if s.request_id in aborted:
            continue
        assert s.status == SeqStatus.FINISHED and s.finish_reason == "length"
        assert s.output_token_ids == reference_output(s.prompt_token_ids, s.params.max_new_tokens), s.request_id
    assert sched.blocks.num_free == blocks and preemptions > 0 and aborted
    if caching:
        assert sched.cached_tokens > 0.3 * sched.admitted_tokens
        assert sched.blocks.num_evicted > 0  # cached blocks were evicted under pressure
    else:
        assert sched.cached_tokens == 0 and sched.blocks.num_cached == 0
