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
def hf():
    return transformers.AutoModelForCausalLM.from_pretrained(FIX / "bf16", dtype=torch.float32).eval()


@torch.no_grad()
def assert_greedy_per_hf(hf, prompt_ids: list[int], out_ids: list[int]) -> None:
    """Each generated token is HF's argmax given the tokens before it (one teacher-forced
    forward). Positions whose top two logits are within 1e-4 are near-ties that float32
    rounding may break either way; they are not judged."""
    logits = hf(torch.tensor([prompt_ids + out_ids])).logits[0, len(prompt_ids) - 1 : -1]
    top = logits.topk(2)
    for j, t in enumerate(out_ids):
        if top.values[j, 0] - top.values[j, 1] >= 1e-4:
            assert t == int(top.indices[j, 0]), f"token {j}: got {t}, HF's argmax is {int(top.indices[j, 0])}"


@pytest.fixture(scope="module")
def llm():
    return LLM(model_path=str(FIX / "bf16"), max_running_requests=64, max_total_tokens=4096, page_size=8,
               chunked_prefill_size=64, device=DEVICE, dtype="float32")


def prompts(n, seed=0):
    rng = random.Random(seed)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "then", "ran", "to", "house", "blue", "sky"]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(1, 40))) for _ in range(n)]


def test_greedy_matches_hf_generate(llm, hf):
    tok = llm.engine.tokenizer
    for p in prompts(4, seed=1):
        ids = tok.encode(p)
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, min_new_tokens=12,
                          pad_token_id=0)[0, len(ids):].tolist()
        out = llm.generate(p, SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True))[0]
        assert out.outputs[0].token_ids == ref


def test_batched_equals_unbatched_for_64_concurrent_requests(llm, hf):
    ps = prompts(64, seed=2)
    params = [SamplingParams(max_new_tokens=random.Random(i).randint(1, 24), temperature=0, ignore_eos=True)
              for i in range(64)]
    batched = llm.generate(ps, params)
    for o in batched:  # every one of the 64 is correct, not only the ones rerun alone below
        assert_greedy_per_hf(hf, o.prompt_token_ids, o.outputs[0].token_ids)
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


def test_prompt_too_long_is_refused_and_nothing_is_queued(llm):
    with pytest.raises(ValueError, match="a prompt of 588 tokens leaves no room to generate within max_model_len 512"):
        llm.generate([list(range(4, 200)) * 3], SamplingParams(max_new_tokens=1))
    assert not llm.engine.has_unfinished() and not llm.engine.requests


@pytest.mark.parametrize("spoil", ["seed", "ids", "n"])
def test_a_refused_request_queues_nothing_and_leaves_others_running(llm, spoil):
    """add_request is all or nothing: a refusal (found however late) leaves no sequence
    queued, and the request already running goes on to its end."""
    eng = llm.engine
    eng.add_request("ok", "the cat sat", SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True))
    eng.step()
    sp = SamplingParams(max_new_tokens=4, temperature=1.0, seed=3, n=3)
    prompt = "the cat"
    if spoil == "seed":  # changed after construction: found by add_request's own check
        sp.seed = 2**64
    elif spoil == "ids":
        prompt = [5, 6, 10**6]
    else:
        sp.n = 0
    with pytest.raises(ValueError):
        eng.add_request("bad", prompt, sp)
    assert "bad" not in eng.requests and all(s.request_id == "ok" for s in eng.scheduler.running)
    assert not eng.scheduler.waiting
    with pytest.raises(ValueError, match="already in use"):  # the running request's id is refused ...
        eng.add_request("ok", "x", SamplingParams())
    done = None
    while eng.has_unfinished():
        for o in eng.step():
            done = o if o.finished else done
    assert done.request_id == "ok" and len(done.outputs[0].token_ids) == 6  # ... and it runs to its end
    assert eng.scheduler.blocks.num_free == eng.scheduler.blocks.num_blocks


def test_mixed_precision_engine_runs_the_example_mix():
    mix = LLM(mixed_precision_config=str(MIX), max_total_tokens=512, device=DEVICE)
    layouts = {w.spec.layout for w in mix.engine.weights.values()}
    assert layouts == {"dense", "fp8", "int8", "gptq", "awq", "ct-packed"}
    out = mix.generate(prompts(3), SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True))
    assert all(len(o.outputs[0].token_ids) == 6 for o in out)


def test_triton_decode_attention_gives_the_same_tokens_and_logits(llm, monkeypatch):
    """--attention-backend triton (one paged-attention launch per decode step; the
    interpreter on the CPU) against torch_native SDPA per sequence, on a batch of mixed
    lengths: identical greedy tokens, logits equal to fp32 rounding."""
    import os

    from mixq.layers import attention

    launches = []
    kernel = attention.paged_decode_attention
    monkeypatch.setattr(attention, "paged_decode_attention", lambda *a: launches.append(1) or kernel(*a))

    if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the triton backend runs on the CPU only under TRITON_INTERPRET=1")
    fast = LLM(model_path=str(FIX / "bf16"), max_running_requests=8, max_total_tokens=1024, page_size=8,
               device=DEVICE, dtype="float32", attention_backend="triton", disable_cuda_graph=True)  # eager launches
    assert fast.engine.runner.attention_backend == "triton"
    ps = prompts(3, seed=9)
    params = SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True, logprobs=1)
    ref = llm.generate(ps, params)
    launches.clear()  # on CUDA the reference engine's "auto" backend is triton as well
    got = fast.generate(ps, params)
    # every decode step (5 after the prefill step) ran the kernel in every layer
    layers = sum(isinstance(m, attention.PagedAttention) for m in fast.engine.model.modules())
    assert len(launches) == 5 * layers
    for a, b in zip(ref, got):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        # fp32 everywhere; the online softmax sums in another order: ~1e-6 relative
        assert max(abs(x - y) for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs)) < 1e-4


def test_stop_token_ids_end_the_sequence_and_stay_out_of_the_text(llm):
    p = "the cat sat on"
    tok = llm.engine.tokenizer
    base = llm.generate(p, SamplingParams(max_new_tokens=16, temperature=0, ignore_eos=True))[0].outputs[0].token_ids
    k = next(i for i in range(2, len(base)) if base[i] not in base[:i])  # first occurrence of its token
    out = llm.generate(p, SamplingParams(max_new_tokens=16, temperature=0, ignore_eos=True,
                                         stop_token_ids=[base[k]]))[0].outputs[0]
    assert out.token_ids == base[: k + 1] and out.finish_reason == "stop"
    assert out.text == tok.decode(base[:k], skip_special_tokens=True)


def test_n_samples_are_the_separately_seeded_requests_and_greedy_n_repeats(llm):
    p = "the cat sat on"
    sp = dict(max_new_tokens=8, temperature=0.8, top_k=20)
    many = llm.generate(p, SamplingParams(**sp, seed=5, n=3))[0].outputs
    assert [o.index for o in many] == [0, 1, 2]
    for i, o in enumerate(many):  # sample i draws from seed + i
        assert o.token_ids == llm.generate(p, SamplingParams(**sp, seed=5 + i))[0].outputs[0].token_ids
    g = llm.generate(p, SamplingParams(max_new_tokens=8, temperature=0, n=3, ignore_eos=True))[0].outputs
    one = llm.generate(p, SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True))[0].outputs[0]
    assert [o.token_ids for o in g] == [one.token_ids] * 3


@torch.no_grad()
def test_seeded_sampling_is_the_exponential_race_on_hfs_distribution_in_any_batch(llm, hf):
    """A seeded request draws E ~ Exp(1) per step from its own generator (seed + index) and
    takes argmax(p / E), p = softmax(logits / T): recomputed here on HF's logits, with the
    request batched among unseeded and greedy ones (their draws must not disturb it)."""
    tok = llm.engine.tokenizer
    p, temp, seed, n_new = "the blue sky and the house", 1.3, 42, 12
    others = [("a cat ran", SamplingParams(max_new_tokens=20, temperature=1.0, ignore_eos=True)),
              ("then to the mat", SamplingParams(max_new_tokens=5, temperature=0, ignore_eos=True))]
    sp = SamplingParams(max_new_tokens=n_new, temperature=temp, seed=seed, ignore_eos=True)
    outs = llm.generate([others[0][0], p, others[1][0]], [others[0][1], sp, others[1][1]])
    got = outs[1].outputs[0].token_ids
    ids = tok.encode(p)
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    want = []
    for _ in range(n_new):
        probs = torch.softmax(hf(torch.tensor([ids + want])).logits[0, -1].double() / temp, -1)
        race = torch.empty(probs.shape[0], device=DEVICE).exponential_(generator=g).cpu().double()
        want.append(int((probs / race).argmax()))
    assert got == want


def test_kv_cache_dtype_is_honoured(llm):
    """--kv-cache-dtype: the paged cache holds K/V in that dtype, sized by it; attention
    reads them back into the compute dtype (here: bf16 cache under a float32 model)."""
    from mixq.layers.attention import PagedAttention

    half = LLM(model_path=str(FIX / "bf16"), max_total_tokens=256, page_size=8, device=DEVICE, dtype="float32",
               kv_cache_dtype="bfloat16")
    caches = [(m.k_cache, m.v_cache) for m in half.engine.model.modules() if isinstance(m, PagedAttention)]
    assert caches and all(k.dtype == v.dtype == torch.bfloat16 for k, v in caches)
    assert half.engine.runner.num_blocks == 256 // 8
    ids = llm.engine.tokenizer.encode("the cat sat on the mat and then ran to the house")
    full = llm.engine.runner.score(ids, [0, 1])
    rounded = half.engine.runner.score(ids, [0, 1])
    # K/V rounded to bf16 (2**-9 relative) move the logits a little, never a lot
    assert not torch.equal(full, rounded)
    torch.testing.assert_close(rounded, full, rtol=0, atol=0.02 * float(full.abs().max()))
