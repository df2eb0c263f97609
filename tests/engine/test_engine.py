"""The engine end to end on the tiny Llama fixture (real tokenizer, real checkpoints)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
import transformers

from mixq.engine.engine import LLM
from mixq.engine.sampling_params import SamplingParams
from tests.devices import DEVICE

FIX = Path(__file__).parents[1] / "fixtures" / "tiny-llama"
MIX = Path(__file__).parents[2] / "examples" / "tiny-llama-mix.yaml"


@pytest.fixture(scope="module")
def llm():
    return LLM(model_path=str(FIX / "bf16"), max_running_requests=64, max_total_tokens=4096, page_size=8,
               chunked_prefill_size=64, device=DEVICE, dtype="float32")


def prompts(n, seed=0):
    rng = random.Random(seed)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "then", "ran", "to", "house", "blue", "sky"]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(1, 40))) for _ in range(n)]


def test_greedy_matches_hf_generate(llm):
    hf = transformers.AutoModelForCausalLM.from_pretrained(FIX / "bf16", dtype=torch.float32).eval()
    tok = llm.engine.tokenizer
    for p in prompts(4, seed=1):
        ids = tok.encode(p)
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, min_new_tokens=12,
                          pad_token_id=0)[0, len(ids):].tolist()
        out = llm.generate(p, SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True))[0]
        assert out.outputs[0].token_ids == ref


def test_batched_equals_unbatched_for_64_concurrent_requests(llm):
    ps = prompts(64, seed=2)
    params = [SamplingParams(max_new_tokens=random.Random(i).randint(1, 24), temperature=0, ignore_eos=True)
              for i in range(64)]
    batched = llm.generate(ps, params)
    for i in (0, 5, 17, 33, 63):
        alone = llm.generate(ps[i], params[i])[0]
        assert batched[i].outputs[0].token_ids == alone.outputs[0].token_ids
        assert batched[i].outputs[0].text == alone.outputs[0].text
    for o, sp in zip(batched, params):
        assert len(o.outputs[0].token_ids) == sp.max_new_tokens and o.outputs[0].finish_reason == "length"
    assert llm.engine.scheduler.blocks.num_free == llm.engine.scheduler.blocks.num_blocks


def test_preemption_under_a_tiny_cache_keeps_outputs_identical():
    small = LLM(model_path=str(FIX / "bf16"), max_total_tokens=96, page_size=8, chunked_prefill_size=16,
                device=DEVICE, dtype="float32")
    ps = prompts(6, seed=3)
    sp = SamplingParams(max_new_tokens=10, temperature=0, ignore_eos=True)
    got = [o.outputs[0].token_ids for o in small.generate(ps, sp)]
    ref = [small.generate(p, sp)[0].outputs[0].token_ids for p in ps]
    assert got == ref


def test_stop_strings_n_seeds_and_streaming(llm):
    p = "the cat sat on"
    base = llm.generate(p, SamplingParams(max_new_tokens=16, temperature=0, ignore_eos=True))[0].outputs[0]
    assert len(base.text) > 4
    stop = base.text[2:5]
    out = llm.generate(p, SamplingParams(max_new_tokens=16, temperature=0, ignore_eos=True, stop=[stop]))[0]
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].text == base.text[: base.text.index(stop)]
    streamed = "".join(llm.stream(p, SamplingParams(max_new_tokens=16, temperature=0, ignore_eos=True)))
    assert streamed == base.text
    s1 = llm.generate(p, SamplingParams(max_new_tokens=8, temperature=1.0, seed=11, n=3))[0]
    s2 = llm.generate(p, SamplingParams(max_new_tokens=8, temperature=1.0, seed=11, n=3))[0]
    assert [o.token_ids for o in s1.outputs] == [o.token_ids for o in s2.outputs]
    assert len({tuple(o.token_ids) for o in s1.outputs}) > 1  # the n samples differ


def test_abort_frees_blocks(llm):
    eng = llm.engine
    eng.add_request("a", "the cat sat", SamplingParams(max_new_tokens=50, ignore_eos=True))
    eng.step()
    assert eng.scheduler.blocks.num_free < eng.scheduler.blocks.num_blocks
    assert eng.abort("a") and not eng.abort("a")
    assert eng.scheduler.blocks.num_free == eng.scheduler.blocks.num_blocks and not eng.has_unfinished()


def test_prompt_too_long_is_refused(llm):
    with pytest.raises(ValueError, match="exceeds the limit of 512"):
        llm.generate([list(range(4, 200)) * 3], SamplingParams(max_new_tokens=1))


def test_mixed_precision_engine_runs_the_example_mix():
    mix = LLM(mixed_precision_config=str(MIX), max_total_tokens=512, device=DEVICE)
    layouts = {w.spec.layout for w in mix.engine.weights.values()}
    assert layouts == {"dense", "fp8", "int8", "gptq", "awq", "ct-packed"}
    out = mix.generate(prompts(3), SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True))
    assert all(len(o.outputs[0].token_ids) == 6 for o in out)


def test_triton_decode_attention_gives_the_same_tokens_and_logits(llm):
    """--attention-backend triton (one paged-attention launch per decode step; the
    interpreter on the CPU) against torch_native SDPA per sequence, on a batch of mixed
    lengths: identical greedy tokens, logits equal to fp32 rounding."""
    import os

    if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the triton backend runs on the CPU only under TRITON_INTERPRET=1")
    fast = LLM(model_path=str(FIX / "bf16"), max_running_requests=8, max_total_tokens=1024, page_size=8,
               device=DEVICE, dtype="float32", attention_backend="triton")
    assert fast.engine.runner.attention_backend == "triton"
    ps = prompts(3, seed=9)
    params = SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True, logprobs=1)
    ref = llm.generate(ps, params)
    got = fast.generate(ps, params)
    for a, b in zip(ref, got):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        # fp32 everywhere; the online softmax sums in another order: ~1e-6 relative
        assert max(abs(x - y) for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs)) < 1e-4
