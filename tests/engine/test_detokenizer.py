"""Incremental detokenization: the Rust fast path decodes exactly what the HF wrapper does,
and the text settled step by step equals one decode of all the tokens."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from mixq.engine.detokenizer import DetokState, IncrementalDetokenizer, fast_decoder

FIX = Path(__file__).parents[1] / "fixtures" / "tiny-llama" / "bf16"


@pytest.fixture(scope="module", params=["fixture", "smollm2"])
def tokenizer(request, default_model_root):
    if request.param == "fixture":
        return AutoTokenizer.from_pretrained(FIX)
    # the embedded default: a byte-level BPE, so ids can split multi-byte characters
    return AutoTokenizer.from_pretrained(default_model_root / "bf16")


def test_fast_path_decodes_what_the_wrapper_does(tokenizer):
    fast = fast_decoder(tokenizer)
    assert fast is not None  # both are fast tokenizers without space clean-up
    rng = random.Random(0)
    specials = list(tokenizer.all_special_ids)
    for _ in range(200):
        ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randint(0, 12))]
        ids += rng.sample(specials, min(len(specials), rng.randint(0, 2)))
        rng.shuffle(ids)
        for skip in (True, False):
            assert fast(ids, skip_special_tokens=skip) == tokenizer.decode(ids, skip_special_tokens=skip)


def test_no_fast_path_when_the_wrapper_cleans_up_spaces(tokenizer, monkeypatch):
    monkeypatch.setattr(tokenizer, "clean_up_tokenization_spaces", True)
    assert fast_decoder(tokenizer) is None
    det = IncrementalDetokenizer(tokenizer)
    ids = tokenizer.encode("a b , c")
    assert det.decode(ids, skip_special_tokens=True) == tokenizer.decode(ids, skip_special_tokens=True)


def test_incremental_text_equals_one_decode(tokenizer):
    text = "Le café coûte 3€ — naïve 日本語 emoji 🙂 done."
    ids = tokenizer.encode(text, add_special_tokens=False)
    det, st, out = IncrementalDetokenizer(tokenizer), DetokState(), ""
    for n in range(1, len(ids) + 1):
        piece = det.step(st, ids[:n])
        assert "\ufffd" not in piece  # incomplete characters are held back
        out += piece
    assert out == tokenizer.decode(ids, skip_special_tokens=True)
