"""The engine's per-step host work, restructured for speed (issue 18 point 5), against
references computed another way: the batched detokenizer against one decode per sequence,
the decode graphs' incremental block tables against tables written anew, the outputs'
snapshots against what each step had produced, and `LLM.generate` (which asks only for
finished requests) against HF transformers' greedy tokens and a stream of every step."""

from __future__ import annotations

import pickle
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers

from mixq.engine.cuda_graph import DecodeGraphs
from mixq.engine.detokenizer import DetokState, IncrementalDetokenizer
from mixq.engine.engine import LLM
from mixq.engine.model_runner import SeqChunk
from mixq.engine.sampling_params import SamplingParams
from tests.devices import DEVICE

FIX = Path(__file__).parents[1] / "fixtures" / "tiny-llama" / "bf16"


@pytest.mark.parametrize("which", ["fixture", "smollm2"])
def test_batched_detokenization_equals_one_sequence_at_a_time(which, default_model_root):
    """step_many over ragged sequences (byte-level BPE ids that split characters included)
    settles exactly the text and offsets that `step` does sequence by sequence."""
    tok = transformers.AutoTokenizer.from_pretrained(FIX if which == "fixture" else default_model_root / "bf16")
    det = IncrementalDetokenizer(tok)
    rng = random.Random(1)
    text = "Le café coûte 3€ — naïve 日本語 🙂 done. "
    seqs = [tok.encode(text * 2, add_special_tokens=False)[rng.randrange(5):] for _ in range(3)]
    seqs += [[rng.randrange(tok.vocab_size) for _ in range(40)] for _ in range(3)]
    for skip in (True, False):
        one, many = [DetokState() for _ in seqs], [DetokState() for _ in seqs]
        texts_one, texts_many = [""] * len(seqs), [""] * len(seqs)
        for n in range(1, 41):
            live = [k for k, s in enumerate(seqs) if len(s) >= n and (k + n) % 5]  # not every sequence every step
            for k in live:
                texts_one[k] += det.step(one[k], seqs[k][:n], skip)
            new = det.step_many([(many[k], seqs[k][:n]) for k in live], skip)
            for k, piece in zip(live, new):
                texts_many[k] += piece
            assert [(s.prefix_offset, s.read_offset) for s in one] == [(s.prefix_offset, s.read_offset) for s in many]
        assert texts_many == texts_one
        assert any(t for t in texts_one)


def test_decode_graph_inputs_follow_growing_moving_and_replaced_tables():
    """DecodeGraphs keeps each row's block table on the host and writes only blocks added
    since the row last held that table. Random steps (tables that grow, sequences that leave
    so rows shift, tables replaced as after a preemption) must leave the device buffers
    exactly what a fresh write of every input would."""
    runner = SimpleNamespace(device=torch.device("cpu"), block_size=4, scratch_slot=999, model=None)
    g = DecodeGraphs(runner, [1, 2, 4, 8], max_blocks=12, capture=False)
    g._forward = lambda bs: torch.zeros(bs, 3)
    g._fill_padding(0, 8)
    rng = random.Random(0)
    live: list[dict] = [dict(table=[rng.randrange(50) for _ in range(2)], pos=rng.randrange(8)) for _ in range(6)]
    for step in range(60):
        for s in live:
            s["pos"] += 1
            if s["pos"] >= len(s["table"]) * 4:
                s["table"].append(rng.randrange(50))  # grows in place, as BlockManager.reserve does
        if rng.random() < 0.2 and len(live) > 1:
            live.pop(rng.randrange(len(live)))  # finished: the rows after it move up
        if rng.random() < 0.2:
            s = rng.choice(live)
            s["table"] = [rng.randrange(50) for _ in range(len(s["table"]))]  # a new list (preempted, readmitted)
        if rng.random() < 0.2 and len(live) < 8:
            live.insert(rng.randrange(len(live) + 1), dict(table=[rng.randrange(50)], pos=0))
        chunks = [SeqChunk([rng.randrange(100)], s["pos"], s["table"]) for s in live]
        bs = g.bucket(len(chunks))
        g.run(chunks, bs)
        n = len(chunks)
        want = torch.tensor([[c.token_ids[0] for c in chunks], [c.start_pos for c in chunks],
                             [c.block_table[c.start_pos // 4] * 4 + c.start_pos % 4 for c in chunks],
                             [c.start_pos + 1 for c in chunks]])
        assert torch.equal(g.meta[:, :n], want), step
        for k, c in enumerate(chunks):
            assert g.tables[k, : len(c.block_table)].tolist() == c.block_table, (step, k)
        assert torch.equal(g.meta[:, n:bs], g.pad.expand(4, bs - n))  # padding rows stay inert


@pytest.fixture(scope="module")
def llm():
    return LLM(model_path=str(FIX), max_total_tokens=2048, page_size=8, device=DEVICE, dtype="float32")


def _stream(llm, prompts, params) -> dict[str, list]:
    eng = llm.engine
    for i, (p, sp) in enumerate(zip(prompts, params)):
        eng.add_request(f"s{i}", p, sp)
    seen: dict[str, list] = {}
    while eng.has_unfinished():
        for o in eng.step():
            seen.setdefault(o.request_id, []).append(o)
    return seen


def test_step_outputs_are_snapshots_and_generate_returns_the_same(llm):
    """Every output a step returned still shows what its request had then (its lists are
    sliced from the engine's growing ones when read, after later steps ran); the deltas add
    up to the final output; pickling sends the snapshot; and `LLM.generate`, which asks the
    engine for finished requests only, returns what the stream ended with. Greedy tokens
    are HF transformers' on the same weights."""
    rng = random.Random(3)
    prompts = [[rng.randrange(3, 250) for _ in range(rng.randint(3, 20))] for _ in range(4)]
    params = [SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True, logprobs=2, n=k)
              for n, k in ((7, 1), (12, 2), (3, 1), (9, 1))]
    seen = _stream(llm, prompts, params)
    final = llm.generate(prompts, params)
    hf = transformers.AutoModelForCausalLM.from_pretrained(FIX, dtype=torch.float32).eval()
    for i, (p, sp) in enumerate(zip(prompts, params)):
        outs = seen[f"s{i}"]
        assert [o.finished for o in outs] == [False] * (len(outs) - 1) + [True]
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), max_new_tokens=sp.max_new_tokens, do_sample=False,
                              min_new_tokens=sp.max_new_tokens)[0, len(p):].tolist()
        for c in range(sp.n):
            ids, text, lps = [], "", []
            for o in outs:  # read only now, after every step ran
                co = o.outputs[c]
                ids += co.delta_token_ids
                text += co.delta_text
                assert co.token_ids == ids and len(co.logprobs) == len(co.top_logprobs) == len(ids)
                lps = co.logprobs
            last = outs[-1].outputs[c]
            assert ids == ref and last.text == text and last.finish_reason == "length"
            got = final[i].outputs[c]
            assert (got.token_ids, got.text, got.logprobs, got.top_logprobs, got.finish_reason) == \
                (ids, text, lps, last.top_logprobs, "length")
            assert pickle.loads(pickle.dumps(outs[0].outputs[c])) == outs[0].outputs[c]
        assert len(outs[0].outputs[0].token_ids) < len(outs[-1].outputs[0].token_ids)


def test_stop_strings_and_their_held_back_tails_through_generate_and_stream(llm):
    """A stop string (found by the batched detokenizer) cuts the text where it begins and
    ends the sequence with 'stop', in generate and in a stream; the stream's deltas never
    show a tail that could begin it, and add up to generate's text."""
    prompt = [5, 9, 14, 3, 7, 7, 21]
    free = llm.generate([prompt], SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True))[0].outputs[0]
    words = free.text.split()
    assert len(words) >= 6
    stop = " ".join(words[3:5])  # spans two tokens: held back while only its start is out
    sp = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True, stop=[stop])
    got = llm.generate([prompt], sp)[0].outputs[0]
    assert got.finish_reason == "stop" and got.text == free.text[: free.text.index(stop)]
    outs = _stream(llm, [prompt], [sp])["s0"]
    assert "".join(o.outputs[0].delta_text for o in outs) == got.text
    for o in outs[:-1]:
        shown = "".join(x.outputs[0].delta_text for x in outs[: outs.index(o) + 1])
        assert not any(shown.endswith(stop[:k]) for k in range(1, len(stop))) or shown == got.text
