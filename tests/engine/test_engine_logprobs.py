"""The engine's logprobs (not only its greedy tokens) against HF transformers on the same
weights, where small numerical errors hide from token comparisons: prompts prefilled in
chunks cut at odd points, sequences preempted and recomputed under a tiny KV cache, and
steps mixing prefill chunks with decodes. The model (tests/engine/position_model.py)
depends on positions enough that a rotary offset moves logprobs by ~1e-1 or more; a
random fixture model would move them by ~1e-3 and no token."""

from __future__ import annotations

import random

import pytest
import torch
import transformers

from mixq.engine.engine import LLM
from mixq.engine.sampling_params import SamplingParams
from tests.devices import DEVICE
from tests.engine.position_model import make_position_model

# float32 engine against HF in float64 (whose RMSNorm and rotary angles run in float32):
# both sides carry ~1e-6 relative rounding, which the model's sharp attention amplifies
# to ~1e-5 on logprobs; a wrong position moves them by >= 1e-1.
TOL = 2e-3
TOP = 5


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_position_model(tmp_path_factory.mktemp("position-model"))


@pytest.fixture(scope="module")
def hf(model_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()


def token_prompts(lengths, seed):
    rng = random.Random(seed)
    return [[rng.randrange(3, 256) for _ in range(n)] for n in lengths]


@torch.no_grad()
def assert_logprobs_match_hf(hf, outputs) -> None:
    """Teacher-forced on each prompt + generated tokens: every generated token's logprob,
    the top-k logprob values, the top-k ids where their values are not within TOL of a
    neighbour (a near-tie may order either way), and greedy = HF's argmax off near-ties."""
    for o in outputs:
        prompt, c = o.prompt_token_ids, o.outputs[0]
        assert len(c.logprobs) == len(c.token_ids) == len(c.top_logprobs) > 0
        ref = torch.log_softmax(hf(torch.tensor([prompt + c.token_ids])).logits[0].double(), -1)
        ref = ref[len(prompt) - 1: -1]  # [generated, vocab]: the distribution each token was drawn from
        for j, (t, lp, top) in enumerate(zip(c.token_ids, c.logprobs, c.top_logprobs)):
            want = ref[j].topk(TOP + 1)
            assert abs(lp - float(ref[j, t])) < TOL, (j, lp, float(ref[j, t]))
            got_vals = [v for _, v in top]
            assert len(top) == TOP and max(abs(a - float(b)) for a, b in zip(got_vals, want.values)) < TOL, j
            gaps = want.values[:-1] - want.values[1:]  # gap to the next lower value
            for i, (tid, _) in enumerate(top):
                if gaps[i] > TOL and (i == 0 or gaps[i - 1] > TOL):
                    assert tid == int(want.indices[i]), (j, i, top, want)
            if gaps[0] > TOL:
                assert t == int(want.indices[0]), (j, t, want)


def run(llm, prompts, n_new):
    """Generate greedily with top-k logprobs, recording each step's (start, new tokens) per
    sequence and, per preemption, the tokens the victim had generated."""
    steps, preempted = [], []

    def hook(batch):
        steps.append([(i.start, i.num_new_tokens) for i in batch.items])
        preempted.extend(len(s.output_token_ids) for s in batch.preempted)  # tokens it must recompute

    llm.engine.step_hooks.append(hook)
    try:
        params = SamplingParams(max_new_tokens=n_new, temperature=0, ignore_eos=True, logprobs=TOP)
        return llm.generate(prompts, params), steps, preempted
    finally:
        llm.engine.step_hooks.remove(hook)


def engine(model_dir, **kw):
    return LLM(model_path=str(model_dir), device=DEVICE, dtype="float32", disable_cuda_graph=True,
               **{"max_total_tokens": 1024, "page_size": 4, **kw})


@pytest.mark.parametrize("chunk", [5, 7])
def test_chunked_prefill_at_odd_chunk_sizes(model_dir, hf, chunk):
    """Prompts of 23, 38 and 9 tokens prefilled 5 or 7 tokens per step (chunks start at
    positions that are not block or chunk multiples of one another: page 4); logprobs of
    8 generated tokens each equal HF's on the whole sequence."""
    llm = engine(model_dir, chunked_prefill_size=chunk)
    out, steps, _ = run(llm, token_prompts([23, 38, 9], seed=chunk), 8)
    continued = {a for s in steps for a, n in s if a > 0 and n > 1}  # prefill chunks after the first
    assert len(continued) >= 4 and any(a % 4 for a in continued), steps
    assert_logprobs_match_hf(hf, out)


@pytest.mark.parametrize("radix", [False, True], ids=["no-radix", "radix"])
def test_preemption_and_recompute_under_a_tiny_kv_cache(model_dir, hf, radix):
    """A 64-token cache for four sequences that grow to 30-36 tokens: the newest running
    ones are preempted and later recomputed from prompt + tokens so far (in chunks of 16);
    their logprobs after the recompute still equal HF's. With the prefix cache on, evicting
    cached blocks first leaves room for more, so fewer are preempted (but one still is)."""
    llm = engine(model_dir, max_total_tokens=64, chunked_prefill_size=16, disable_radix_cache=not radix)
    out, steps, preempted = run(llm, token_prompts([20, 14, 17, 11], seed=3), 16)
    assert len(preempted) >= (1 if radix else 2) and max(preempted) > 0, (preempted, steps)  # had generated tokens
    assert_logprobs_match_hf(hf, out)


def test_steps_mixing_prefill_chunks_and_decodes(model_dir, hf):
    """Requests arriving while others decode (added between steps): steps carry decodes
    beside fresh and continued prefill chunks under a 12-token budget."""
    llm = engine(model_dir, chunked_prefill_size=12)
    eng = llm.engine
    steps = []
    eng.step_hooks.append(lambda b: steps.append([(i.start, i.num_new_tokens) for i in b.items]))
    params = SamplingParams(max_new_tokens=10, temperature=0, ignore_eos=True, logprobs=TOP)
    prompts = token_prompts([6, 27, 15, 33, 4], seed=5)
    finished, arrivals = {}, {0: [0, 1], 2: [2], 4: [3], 7: [4]}  # step -> requests added before it
    step = 0
    while step < 200 and (eng.has_unfinished() or any(k >= step for k in arrivals)):
        for i in arrivals.get(step, []):
            eng.add_request(str(i), prompts[i], params)
        for o in eng.step():
            if o.finished:
                finished[int(o.request_id)] = o
        step += 1
    mixed = [s for s in steps if any(n == 1 and a > 0 for a, n in s) and any(n > 1 for _, n in s)]
    assert len(finished) == 5 and len(mixed) >= 3, steps
    assert any(a > 0 and n > 1 for s in mixed for a, n in s)  # a continued prefill beside decodes
    assert_logprobs_match_hf(hf, [finished[i] for i in range(5)])
