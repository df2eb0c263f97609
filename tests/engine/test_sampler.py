"""Sampler against float64/numpy reimplementations and exact distributions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mixq.engine.sampler import Sampler, SampleRow, apply_penalties
from mixq.engine.sampling_params import SamplingParams


def row(prompt=(), output=(), gen=None, **kw):
    return SampleRow(SamplingParams(**kw), list(prompt), list(output), gen)


def test_greedy_is_argmax():
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(0))
    out = Sampler()(logits, [row(temperature=0) for _ in range(5)])
    assert out.token_ids == logits.argmax(-1).tolist()


def test_penalties_match_hand_computation():
    v = 8
    logits = torch.tensor([[1.0, -2.0, 0.5, 3.0, -0.5, 0.0, 2.0, -1.0]])
    r = row(prompt=[0, 1], output=[3, 3, 6], repetition_penalty=1.5, frequency_penalty=0.4, presence_penalty=0.3)
    got = apply_penalties(logits, [r], ())[0].double()
    ref = logits[0].double().clone()
    for t in {0, 1, 3, 6}:  # repetition: seen in prompt or output
        ref[t] = ref[t] / 1.5 if ref[t] > 0 else ref[t] * 1.5
    counts = np.bincount([3, 3, 6], minlength=v)
    ref -= torch.from_numpy(0.4 * counts + 0.3 * (counts > 0))
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)


def test_min_new_tokens_bans_eos_and_stop_tokens():
    logits = torch.zeros(1, 6)
    logits[0, 2] = 10
    logits[0, 4] = 9
    out = Sampler(eos_token_ids=(2,))(logits, [row(output=[1], temperature=0, min_new_tokens=2, stop_token_ids=[4])])
    assert out.token_ids == [0]


def exact_dist(logits, temperature, top_k, top_p, min_p):
    p = torch.softmax(logits.double() / temperature, -1).numpy()
    order = np.argsort(-p, kind="stable")
    keep = np.zeros_like(p, dtype=bool)
    mass = 0.0
    for rank, t in enumerate(order):
        if top_k > 0 and rank >= top_k:
            break
        if rank > 0 and mass >= top_p:
            break
        if p[t] < min_p * p[order[0]] and rank > 0:
            break
        keep[t] = True
        mass += p[t]
    q = np.where(keep, p, 0)
    return q / q.sum()


@pytest.mark.parametrize("kw", [dict(temperature=0.7, top_p=0.8), dict(temperature=1.3, top_k=5),
                                dict(temperature=1.0, min_p=0.2), dict(temperature=0.9),
                                dict(temperature=0.8, top_k=6, top_p=0.9, min_p=0.05)])
def test_sampling_distribution_matches_the_exact_filtered_distribution(kw):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 12, generator=g) * 1.5
    n = 20_000
    torch.manual_seed(2)
    out = Sampler()(logits.expand(n, -1).contiguous(), [row(**kw) for _ in range(n)])
    emp = np.bincount(out.token_ids, minlength=12) / n
    ref = exact_dist(logits[0], kw["temperature"], kw.get("top_k", -1), kw.get("top_p", 1.0), kw.get("min_p", 0.0))
    assert (emp[ref == 0] == 0).all()  # filtered tokens never appear
    # total variation of an n-sample empirical distribution over <= 12 outcomes is about
    # sqrt(k / n) / 2 ~ 0.012 in expectation; 0.03 leaves a wide margin for chance
    assert 0.5 * np.abs(emp - ref).sum() < 0.03


def test_seeds_reproduce_and_differ():
    logits = torch.randn(1, 100, generator=torch.Generator().manual_seed(3))

    def draws(seed):
        gen = torch.Generator().manual_seed(seed)
        return [Sampler()(logits, [row(gen=gen, temperature=1.0)]).token_ids[0] for _ in range(20)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


def test_logprobs_are_the_models_distribution():
    logits = torch.randn(2, 30, generator=torch.Generator().manual_seed(4))
    out = Sampler()(logits, [row(temperature=0, logprobs=3), row(temperature=0)])
    ref = torch.log_softmax(logits.double(), -1)
    assert out.logprobs[0] == pytest.approx(ref[0].max().item(), abs=1e-5)
    top = ref[0].topk(3)
    assert [t for t, _ in out.top_logprobs[0]] == top.indices.tolist()
    assert [lp for _, lp in out.top_logprobs[0]] == pytest.approx(top.values.tolist(), abs=1e-5)
    assert out.top_logprobs[1] == []


def test_a_tiny_temperature_is_greedy_not_token_0():
    """1e-300 divides logits to inf (softmax NaN, argmax 0): it must sample as greedy."""
    logits = torch.randn(6, 40, generator=torch.Generator().manual_seed(5))
    logits[:, 0] = -5.0  # token 0 is never the argmax
    out = Sampler()(logits, [row(temperature=1e-300) for _ in range(6)])
    assert out.token_ids == logits.argmax(-1).tolist()


def test_a_top_k_past_the_vocabulary_samples_the_whole_distribution():
    logits = torch.randn(1, 12, generator=torch.Generator().manual_seed(6))
    n = 20_000
    torch.manual_seed(7)
    out = Sampler()(logits.expand(n, -1).contiguous(), [row(temperature=1.0, top_k=2**31 - 1) for _ in range(n)])
    emp = np.bincount(out.token_ids, minlength=12) / n
    ref = torch.softmax(logits[0].double(), -1).numpy()
    assert 0.5 * np.abs(emp - ref).sum() < 0.03  # as in the test above: sqrt(12 / n) / 2 ~ 0.012


def test_logprobs_with_penalties_are_the_raw_models_distribution():
    """vLLM's default: logprobs are those of the model's own distribution, before
    penalties, temperature and truncation. Reference: float64 log-softmax of the raw
    logits; the penalized distribution (what is sampled from) differs from it here."""
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(2, 30, generator=g) * 2
    prompt, output = [1, 4, 9], [4, 4, 17, 22]
    kw = dict(repetition_penalty=1.9, frequency_penalty=1.5, presence_penalty=1.0, logprobs=4)
    rows = [row(prompt, output, temperature=0, **kw), row(prompt, output, temperature=0.8, top_k=5, **kw)]
    out = Sampler()(logits, rows)
    raw = torch.log_softmax(logits.double(), -1)
    penalized = torch.log_softmax(apply_penalties(logits, rows, ()).double(), -1)
    for i, t in enumerate(out.token_ids):
        assert out.logprobs[i] == pytest.approx(raw[i, t].item(), abs=1e-5)
        top = raw[i].topk(4)
        assert [a for a, _ in out.top_logprobs[i]] == top.indices.tolist()
        assert [b for _, b in out.top_logprobs[i]] == pytest.approx(top.values.tolist(), abs=1e-5)
    # the test can tell: the penalized log-probabilities of these rows are far from the raw ones
    assert (penalized - raw).abs()[:, [4, 17, 22, 1, 9]].max() > 0.5
