"""Streaming with stop strings (a stream must hold back text that may turn out to be the
start of a stop string) and logprobs under penalties (the model's own distribution, as
vLLM reports by default), on the tiny Llama fixture against HF in float64."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from mixq.engine.engine import LLM
from mixq.engine.sampling_params import SamplingParams
from tests.devices import DEVICE

MODEL = Path(__file__).parents[1] / "fixtures" / "tiny-llama" / "bf16"
PROMPT = "the cat sat on the mat and"


@pytest.fixture(scope="module")
def llm():
    return LLM(model_path=str(MODEL), max_total_tokens=1024, page_size=8, device=DEVICE, dtype="float32")


def token_spans(tok, ids: list[int]) -> list[tuple[int, int]]:
    """[start, end) of each token's text in decode(ids), from decodes of growing prefixes."""
    spans, prev = [], 0
    for k in range(1, len(ids) + 1):
        end = len(tok.decode(ids[:k], skip_special_tokens=True))
        spans.append((prev, end))
        prev = end
    return spans


def straddling_stop(tok, ids: list[int], text: str) -> tuple[str, int]:
    """A stop string that starts inside one token's text (not at its start) and ends two
    tokens later, at its first occurrence in `text`: (stop, where it starts). A stream that
    emits each token's text as it comes would send the stop string's first characters
    before the stop is seen."""
    spans = token_spans(tok, ids)
    assert "".join(text[a:b] for a, b in spans) == text
    for k in range(1, len(spans) - 3):
        a, b = spans[k]
        if b - a < 2:
            continue
        start, end = a + 1, spans[k + 2][0] + 1
        stop = text[start:end]
        if text.find(stop) == start and stop.strip():
            return stop, start
    raise AssertionError(f"no stop string straddles tokens in {text!r}")


def test_a_stream_holds_back_a_partial_stop_string(llm):
    tok = llm.engine.tokenizer
    base = llm.generate(PROMPT, SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True))[0].outputs[0]
    stop, at = straddling_stop(tok, base.token_ids, base.text)
    sp = SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True, stop=[stop])
    whole = llm.generate(PROMPT, sp)[0].outputs[0]
    assert whole.text == base.text[:at] and whole.finish_reason == "stop"
    deltas = list(llm.stream(PROMPT, sp))
    assert "".join(deltas) == base.text[:at], (stop, deltas)


@torch.no_grad()
def test_logprobs_with_penalties_are_the_models_own_distribution(llm):
    """Greedy with repetition, frequency and presence penalties and logprobs: each chosen
    token is the argmax of the penalized logits, and its logprob (and the top 3) are those
    of the raw model distribution: HF float64 log-softmax on the same tokens. The penalized
    distribution, computed here by hand, is far from the raw one: the test can tell them
    apart."""
    tok = llm.engine.tokenizer
    ids = tok.encode(PROMPT)
    rep, freq, pres, n_new = 1.8, 1.2, 0.8, 10
    sp = SamplingParams(max_new_tokens=n_new, temperature=0, ignore_eos=True, repetition_penalty=rep,
                        frequency_penalty=freq, presence_penalty=pres, logprobs=3)
    out = llm.generate([ids], sp)[0].outputs[0]
    assert len(out.token_ids) == n_new
    hf = transformers.AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float64).eval()
    logits = hf(torch.tensor([ids + out.token_ids])).logits[0, len(ids) - 1 : -1]  # [n_new, V]
    raw = torch.log_softmax(logits, -1)
    gap = 0.0
    for j, t in enumerate(out.token_ids):
        # fp32 engine vs float64 HF on bf16-exact weights: ~1e-6
        assert out.logprobs[j] == pytest.approx(raw[j, t].item(), abs=1e-4)
        assert [b for _, b in out.top_logprobs[j]] == pytest.approx(raw[j].topk(3).values.tolist(), abs=1e-4)
        pen = logits[j].clone()
        seen = set(ids + out.token_ids[:j])
        for s in seen:  # repetition: prompt and output so far
            pen[s] = pen[s] / rep if pen[s] > 0 else pen[s] * rep
        for s in set(out.token_ids[:j]):  # frequency and presence: output so far
            pen[s] -= freq * out.token_ids[:j].count(s) + pres
        top2 = pen.topk(2)
        if top2.values[0] - top2.values[1] > 1e-4:  # a near tie may round either way
            assert t == int(top2.indices[0]), f"step {j}: not the penalized argmax"
        gap = max(gap, abs(torch.log_softmax(pen, -1)[t].item() - raw[j, t].item()))
    assert gap > 0.05, "penalties changed nothing here: the test could not tell the two distributions apart"
