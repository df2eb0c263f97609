"""Structured outputs (mixq.engine.grammar) through the engine: outputs parse and validate
against their JSON schema (the jsonschema package) or fully match their regex (Python's re),
on a tiny random model with a byte-level vocabulary and on the embedded SmolLM2; the token
mask's bits against the matcher's own accept/reject of every token; a constrained row
beside a free one leaves the free one's tokens as they were; refused constraints name
their field and leave the engine serving."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch

from mixq.engine.engine import LLM
from mixq.engine.grammar import GrammarBackend, TokenMasks, apply_token_mask
from mixq.engine.sampling_params import SamplingParamError, SamplingParams
from tests.devices import DEVICE

TINY = Path(__file__).parents[1] / "fixtures" / "tiny-llama" / "bf16"

# every string and number bounded: a random model stops only where the grammar makes it
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "minLength": 1, "maxLength": 6},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "kind": {"enum": ["cat", "dog", "fish"]},
    "ok": {"type": "boolean"},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 2}},
    "required": ["name", "age", "kind", "ok", "tags"]}
REGEXES = [r"(yes|no), [0-9]{2}-[a-z]{1,4}", r"[A-Z][a-z]{2,5}( [A-Z][a-z]{2,5})?"]


@pytest.fixture(scope="module")
def llm(byte_model):
    return LLM(model_path=str(byte_model), device=DEVICE)


def _eos(llm) -> set[int]:
    return set(llm.engine.eos_token_ids)


def test_json_schema_and_regex_outputs_validate_on_a_random_model(llm):
    n_json = 4  # greedy, and three seeded samples of one request (n = 3: one matcher each)
    params = [SamplingParams(max_new_tokens=120, temperature=0, json_schema=PERSON),
              SamplingParams(max_new_tokens=120, temperature=1.0, seed=5, n=3, json_schema=json.dumps(PERSON)),
              *[SamplingParams(max_new_tokens=40, temperature=1.0, seed=i, regex=r) for i, r in enumerate(REGEXES)],
              SamplingParams(max_new_tokens=60, temperature=1.0, seed=9, ignore_eos=True,
                             json_schema={"type": "object"})]  # OpenAI's json_object
    outs = llm.generate(["Person:", "A person as JSON:", "Answer:", "Name:", "x"], params)
    texts = [c for o in outs for c in o.outputs]
    assert len(texts) == n_json + len(REGEXES) + 1
    for c in texts[:n_json]:
        assert c.finish_reason == "stop" and c.token_ids[-1] in _eos(llm), c
        jsonschema.validate(json.loads(c.text), PERSON)
    assert len({c.text for c in texts[1:n_json]}) > 1  # n = 3 samples are not one matcher's output
    for c, r in zip(texts[n_json:], REGEXES):
        assert c.finish_reason == "stop" and re.fullmatch(r, c.text), (c.text, r)
    # ignore_eos does not outlive the grammar: a complete object ends the sequence
    last = texts[-1]
    assert last.finish_reason == "stop" and isinstance(json.loads(last.text), dict)


def test_a_free_request_beside_a_structured_one_keeps_its_tokens(llm):
    free = [SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True),
            SamplingParams(max_new_tokens=12, temperature=0.8, seed=3, ignore_eos=True)]
    prompts = ["The weather today", "Once upon a time", "Name:"]
    # the same batch shapes both times: the third row free, then constrained
    alone = llm.generate(prompts, [*free, SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)])
    beside = llm.generate(prompts, [*free, SamplingParams(max_new_tokens=12, temperature=0, regex=REGEXES[1])])
    for a, b in zip(alone[:2], beside[:2]):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
    assert re.fullmatch(REGEXES[1], beside[2].outputs[0].text)
    assert alone[2].outputs[0].token_ids != beside[2].outputs[0].token_ids  # the mask did act


def _allowed(matcher, vocab: int) -> set[int]:
    """The tokens a matcher accepts next, one by one (accept, then roll back)."""
    out = set()
    for t in range(vocab):
        if matcher.accept_token(t):
            out.add(t)
            matcher.rollback(1)
    return out


def test_token_mask_bits_are_the_matchers_accepted_tokens(llm):
    eng = llm.engine
    vocab = len(eng.tokenizer) + 40  # a model vocabulary that pads the tokenizer's: padding never allowed
    backend = GrammarBackend(eng.tokenizer, vocab, eng.eos_token_ids)
    g = backend.compile(SamplingParams(regex=r"(ab|cd)[0-9]"))
    start, mid, done = backend.matcher(g), backend.matcher(g), backend.matcher(g)
    for t in eng.tokenizer.encode("ab", add_special_tokens=False):
        assert mid.accept_token(t)
    for t in [*eng.tokenizer.encode("cd7", add_special_tokens=False)]:
        assert done.accept_token(t)
    want = {1: _allowed(start, vocab), 3: _allowed(mid, vocab), 4: _allowed(done, vocab)}
    assert want[4] == _eos(llm) and len(want[1]) > 2 and want[3] and not want[3] & _eos(llm)
    logits = torch.randn(5, vocab, generator=torch.Generator().manual_seed(0))
    mask = TokenMasks(vocab, eng.eos_token_ids, torch.device("cpu")).fill([None, start, None, mid, done])
    assert mask.rows == [1, 3, 4] and mask.dead == []
    # the bit layout decoded with numpy: token 32 w + j is bit j of word w
    bits = np.unpackbits(mask.bitmask.numpy().view(np.uint8), bitorder="little").reshape(mask.bitmask.shape[0], -1)
    for r, s in want.items():
        assert set(np.flatnonzero(bits[r, :vocab]).tolist()) == s
    masked = logits.clone()
    apply_token_mask(masked, mask)
    for r in range(5):
        keep = torch.ones(vocab, dtype=torch.bool) if r not in want else torch.zeros(vocab, dtype=torch.bool)
        if r in want:
            keep[list(want[r])] = True
        assert torch.equal(masked[r][keep], logits[r][keep]) and bool((masked[r][~keep] == float("-inf")).all())


@pytest.mark.parametrize("field, value, message", [
    ("json_schema", {"type": "object", "properties": {"a": {"type": "strng"}}}, "json_schema is not a JSON schema"),
    ("json_schema", "{not json", "json_schema must be a JSON schema; it is not valid JSON"),
    ("json_schema", "[1, 2]", "json_schema must be a JSON schema (an object or a boolean)"),
    ("regex", "(ab", "regex is not a regular expression"),
    ("regex", "", "regex must be null or a regular expression of 1 to"),
])
def test_a_refused_constraint_names_its_field_and_the_engine_keeps_serving(llm, field, value, message):
    eng = llm.engine
    with pytest.raises(SamplingParamError) as e:
        eng.add_request("bad", "hello", SamplingParams(max_new_tokens=4, **{field: value}))
    assert e.value.param == field and message in str(e.value), str(e.value)
    assert "bad" not in eng.requests and not eng.has_unfinished()
    out = llm.generate("hello", SamplingParams(max_new_tokens=30, temperature=0, regex=REGEXES[0]))[0]
    assert re.fullmatch(REGEXES[0], out.outputs[0].text)


def test_a_vocabulary_that_cannot_begin_the_output_is_refused_up_front():
    # the tiny fixture's word-level vocabulary has no "{": nothing could start a JSON object
    llm = LLM(model_path=str(TINY), device=DEVICE)
    with pytest.raises(SamplingParamError, match="no token of this model's vocabulary can begin"):
        llm.engine.add_request("r", "a b", SamplingParams(json_schema={"type": "object"}))
    assert not llm.engine.has_unfinished()


def test_json_schema_on_the_embedded_model(default_model_root):
    llm = LLM(model_path=str(default_model_root / "bf16"), device=DEVICE)
    tok = llm.engine.tokenizer
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                               "country": {"type": "string", "maxLength": 30},
                                               "population_millions": {"type": "number"}},
              "required": ["city", "country", "population_millions"]}
    msgs = [{"role": "user", "content": "Describe Paris as JSON with keys city, country, population_millions."}]
    ids = tok.encode(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True),
                     add_special_tokens=False)
    out = llm.generate([ids], SamplingParams(max_new_tokens=48, temperature=0, json_schema=schema))[0].outputs[0]
    assert out.finish_reason == "stop", out.text
    value = json.loads(out.text)
    jsonschema.validate(value, schema)
    assert "paris" in value["city"].lower()  # an instruct model, not noise: the mask keeps its choices
