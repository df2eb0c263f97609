"""--kv-cache-dtype fp8_e4m3|fp8_e5m2 in the engine, on the tiny Llama fixture (float32).

The reference is HF transformers on the same weights with a KV cache that quantizes each
new key and value to fp8 (x / scale, saturated, then back times scale) before attention
uses it: what an fp8 paged cache computes, built independently of mixq's cache. The
checkpoint copy carries per-layer k_scale / v_scale tensors, so scales from the
checkpoint are exercised too."""

from __future__ import annotations

import shutil

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import DynamicCache

from mixq.engine.engine import LLM
from mixq.engine.engine_config import EngineConfig, kv_cache_blocks
from mixq.engine.sampling_params import SamplingParams
from mixq.errors import CheckpointError
from tests.devices import DEVICE
from tests.engine.test_cuda_graph import CAPTURE, needs_triton
from tests.engine.test_engine import FIX, prompts

KV = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
# per layer (k_scale, v_scale), exact in float32: keys and values of this model reach ~0.8,
# so these put them at ~70-400 in fp8 units, inside both formats' range
SCALES = [(2**-8, 2**-9), (0.75 * 2**-6, 0.625 * 2**-7)]


def with_scales(dst, names=("k_scale", "v_scale"), shape=()) -> str:
    """A copy of the fixture checkpoint with SCALES stored as self_attn.<names>."""
    shutil.copytree(FIX / "bf16", dst)
    t = load_file(dst / "model.safetensors")
    for i, (k, v) in enumerate(SCALES):
        for name, val in zip(names, (k, v)):
            t[f"model.layers.{i}.self_attn.{name}"] = torch.full(shape, val, dtype=torch.float32)
    save_file(t, dst / "model.safetensors", metadata={"format": "pt"})
    return str(dst)


class FakeFP8Cache(DynamicCache):
    """HF's cache, storing fp8(x / scale) * scale for every new key and value."""

    def __init__(self, dtype: torch.dtype, scales):
        super().__init__()
        self.fp8, self.scales = dtype, scales

    def _q(self, x: torch.Tensor, s: float) -> torch.Tensor:
        m = torch.finfo(self.fp8).max
        return (x / s).clamp(-m, m).to(self.fp8).to(x.dtype) * s

    def update(self, k, v, layer_idx, *args, **kwargs):
        ks, vs = self.scales[layer_idx]
        return super().update(self._q(k, ks), self._q(v, vs), layer_idx, *args, **kwargs)


@pytest.fixture(scope="module")
def hf():
    return transformers.AutoModelForCausalLM.from_pretrained(FIX / "bf16", dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def scaled(tmp_path_factory):
    return with_scales(tmp_path_factory.mktemp("kvscales") / "ckpt")


@torch.no_grad()
def hf_logprobs(hf, ids: list[int], n_prompt: int, kv: torch.dtype, scales) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-softmax at every position after the prompt, the top-2 gap there), teacher-forced."""
    logits = hf(torch.tensor([ids]), past_key_values=FakeFP8Cache(kv, scales), use_cache=True).logits[0]
    lp = logits[n_prompt - 1 : -1].log_softmax(-1)
    top = logits[n_prompt - 1 : -1].topk(2).values
    return lp, top[:, 0] - top[:, 1]


def check_against_hf(hf, outs, kv, scales):
    for o in outs:
        c = o.outputs[0]
        lp, gap = hf_logprobs(hf, o.prompt_token_ids + c.token_ids, len(o.prompt_token_ids), kv, scales)
        for j, t in enumerate(c.token_ids):
            if gap[j] >= 1e-4:  # near-ties may break either way in float32
                assert t == int(lp[j].argmax()), f"token {j}"
            assert abs(c.logprobs[j] - float(lp[j, t])) < 1e-4, f"token {j}: {c.logprobs[j]} vs {float(lp[j, t])}"


@pytest.mark.parametrize("kv", list(KV))
def test_fp8_cache_matches_hf_over_a_quantized_cache(hf, scaled, kv):
    """Prefill in chunks, then decode, over an fp8 cache with the checkpoint's scales: each
    generated token and its logprob are HF's over the same quantized keys and values."""
    llm = LLM(model_path=scaled, kv_cache_dtype=kv, device=DEVICE, dtype="float32", max_total_tokens=1024,
              page_size=8, chunked_prefill_size=16)
    eng = llm.engine
    assert eng.kv_dtype == KV[kv] and eng.runner.attn_layers[0].k_cache.dtype == KV[kv]
    assert [(m.k_scale, m.v_scale) for m in eng.runner.attn_layers] == SCALES
    sp = SamplingParams(max_new_tokens=10, temperature=0, ignore_eos=True, logprobs=0)
    outs = llm.generate(prompts(3, seed=9), sp)
    check_against_hf(hf, outs, KV[kv], SCALES)
    # not vacuous: against full-precision keys and values the logprobs move by more
    o = outs[0]
    lp, _ = hf_logprobs(hf, o.prompt_token_ids + o.outputs[0].token_ids, len(o.prompt_token_ids), torch.float32,
                        [(1.0, 1.0)] * 2)
    moved = max(abs(a - float(lp[j, t])) for j, (a, t) in enumerate(zip(o.outputs[0].logprobs,
                                                                         o.outputs[0].token_ids)))
    assert moved > 1e-3


def test_scale_names_default_and_refusals(tmp_path, hf):
    """kv_scale (one for both) and ModelOpt's k_proj.k_scale / v_proj.v_scale are read; a
    checkpoint without scales gets 1.0; a per-channel scale is refused naming the tensor."""
    one = with_scales(tmp_path / "kv", names=("kv_scale", "kv_scale"))
    llm = LLM(model_path=one, kv_cache_dtype="fp8_e4m3", device=DEVICE, dtype="float32", max_total_tokens=256)
    assert [(m.k_scale, m.v_scale) for m in llm.engine.runner.attn_layers] == [(v, v) for _, v in SCALES]
    mo = with_scales(tmp_path / "modelopt", names=("k_proj.k_scale", "v_proj.v_scale"))
    llm = LLM(model_path=mo, kv_cache_dtype="fp8_e5m2", device=DEVICE, dtype="float32", max_total_tokens=256)
    assert [(m.k_scale, m.v_scale) for m in llm.engine.runner.attn_layers] == SCALES
    plain = LLM(model_path=str(FIX / "bf16"), kv_cache_dtype="fp8_e4m3", device=DEVICE, dtype="float32",
                max_total_tokens=256)
    assert {(m.k_scale, m.v_scale) for m in plain.engine.runner.attn_layers} == {(1.0, 1.0)}
    outs = plain.generate(prompts(2, seed=4), SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True,
                                                             logprobs=0))
    check_against_hf(hf, outs, torch.float8_e4m3fn, [(1.0, 1.0)] * 2)
    bad = with_scales(tmp_path / "bad", shape=(2,))
    with pytest.raises(CheckpointError, match=r"model.layers.0.self_attn.k_scale.*only per-tensor"):
        LLM(model_path=bad, kv_cache_dtype="fp8_e4m3", device=DEVICE, max_total_tokens=256)
    with pytest.raises(ValueError, match="--kv-cache-dtype 'fp8'"):
        LLM(model_path=str(FIX / "bf16"), kv_cache_dtype="fp8", device=DEVICE, max_total_tokens=256)


def test_scales_are_ignored_by_a_full_precision_cache(hf, scaled):
    """A checkpoint's scales apply to an fp8 cache only: float32 KV gives HF's plain logits."""
    llm = LLM(model_path=scaled, device=DEVICE, dtype="float32", max_total_tokens=512, page_size=8)
    outs = llm.generate(prompts(2, seed=5), SamplingParams(max_new_tokens=5, temperature=0, ignore_eos=True,
                                                           logprobs=0))
    check_against_hf(hf, outs, torch.float32, [(1.0, 1.0)] * 2)  # a float32 "fp8" round trip is exact


def test_fp8_halves_the_kv_bytes_and_doubles_the_blocks(monkeypatch):
    kw = dict(model_path=str(FIX / "bf16"), device=DEVICE, dtype="float32", max_running_requests=4)
    if DEVICE != "cpu":  # the GPU budget is checked below, on a fixed memory size; a real one
        kw["max_total_tokens"] = 1024  # would depend on what earlier tests' engines still hold
    full, half, fp8 = (LLM(kv_cache_dtype=k, **kw).engine for k in ("float32", "bfloat16", "fp8_e5m2"))
    # 2 layers x (K, V) x 2 KV heads x 32 dims x page 16 tokens x bytes per value
    per = 2 * 2 * 2 * 32 * 16
    assert [e.runner.kv_bytes_per_block(e.model, 16, e.kv_dtype) for e in (full, half, fp8)] == [4 * per, 2 * per, per]
    # the CPU sizes its cache for every running request at full context: the same blocks
    assert full.scheduler.blocks.num_blocks == fp8.scheduler.blocks.num_blocks
    # a GPU sizes it to the memory left under --mem-fraction-static: 8 GiB total, 2 GiB in use,
    # 0.85 of it for the process -> 8 * 0.85 - 2 = 4.8 GiB of KV; fp8 holds 4x float32's blocks
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (6 * 2**30, 8 * 2**30))
    cfg = EngineConfig(model_path=str(FIX / "bf16"), mem_fraction_static=0.85)
    budget = 8 * 2**30 * 0.85 - 2 * 2**30
    got = [kv_cache_blocks(full.model, cfg, torch.device("cuda"), d, 512)
           for d in (torch.float32, torch.bfloat16, torch.float8_e5m2)]
    assert got == [int(budget // (4 * per)), int(budget // (2 * per)), int(budget // per)]
    # one 512-token sequence no longer fits: refused, naming the flag
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1 * 2**30, 8 * 2**30))
    with pytest.raises(RuntimeError, match="--mem-fraction-static 0.85"):
        kv_cache_blocks(full.model, cfg, torch.device("cuda"), torch.float32, 512)


@needs_triton
def test_triton_kernels_and_graph_decode_over_fp8_give_the_torch_paths_tokens(scaled):
    """The extend and decode kernels (and the graph-decode buffers) over an fp8 cache against
    the torch path over the same cache: same tokens, logprobs to fp32 rounding."""
    kw = dict(model_path=scaled, kv_cache_dtype="fp8_e4m3", device=DEVICE, dtype="float32", max_total_tokens=512,
              page_size=8, chunked_prefill_size=16)
    ref = LLM(attention_backend="torch_native", **kw)
    tri = LLM(attention_backend="triton", **kw)
    tri.engine.runner.capture_decode_graphs([1, 2, 4], -(-tri.engine.max_model_len // 8), capture=CAPTURE)
    sp = SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True, logprobs=0)
    ps = prompts(3, seed=6)
    for a, b in zip(ref.generate(ps, sp), tri.generate(ps, sp)):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert max(abs(x - y) for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs)) < 1e-4
