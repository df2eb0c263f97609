"""Round-to-nearest writers of the checkpoint formats mixq reads.

For machines where llm-compressor / GPTQModel cannot run (they pin their own torch and
transformers): quantize a dense HF checkpoint tensor by tensor into compressed-tensors
FP8 (per-channel, dynamic per-token activations) or INT8 W8A8, legacy GPTQ (v1 zero
convention) or AWQ GEMM (RTN, no smoothing: norms stay the base's). The quantization is
plain RTN — these writers exist to make real-format checkpoints, not to beat GPTQ/AWQ.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from mixq.formats.checkpoint import Checkpoint
from mixq.formats.packing import AWQ_ORDER, pack_int32

FORMATS = ("fp8", "int8", "gptq", "awq")
_LINEAR_LEAVES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "w1", "w2", "w3")


def is_decoder_linear(name: str) -> bool:
    """Decoder Linear weights a quantizer converts (not embeddings, norms, routers, head)."""
    parts = name.split(".")
    return ".layers." in name and name.endswith(".weight") and len(parts) >= 2 and parts[-2] in _LINEAR_LEAVES


def rtn_int(w: torch.Tensor, bits: int, group: int, sym: bool):
    """RTN of w [N, K] per (row, group of K): unsigned ints [N, K] int32, scales [N, G]
    (fp16-rounded, as stored), integer zeros [N, G]."""
    n, k = w.shape
    if k % group:
        raise ValueError(f"in_features {k} is not a multiple of group size {group}")
    g = w.float().reshape(n, k // group, group)
    qmax = (1 << bits) - 1
    if sym:
        scale = g.abs().amax(-1) / ((qmax + 1) / 2 - 0.5)
        zero = torch.full_like(scale, float(1 << (bits - 1)))
    else:
        lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
        scale = (hi - lo) / qmax
        zero = torch.round(-lo / scale.clamp(min=1e-10))
    scale = scale.clamp(min=1e-8).half().float()
    q = torch.clamp(torch.round(g / scale[..., None]) + zero[..., None], 0, qmax)
    return q.reshape(n, k).to(torch.int32), scale.half(), zero.to(torch.int32)


def gptq_tensors(mod: str, w: torch.Tensor, bits=4, group=64, sym=True, perm: torch.Tensor | None = None):
    """Legacy GPTQ (v1) tensors of w [N, K]. With `perm` (act-order), column perm[j] is
    quantized in group j // group and g_idx records it."""
    n, k = w.shape
    wp = w if perm is None else w[:, perm]
    q, s, z = rtn_int(wp, bits, group, sym)
    g_idx = torch.arange(k, dtype=torch.int32) // group
    if perm is not None:
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(k)
        q, g_idx = q[:, inv], g_idx[inv]
    return {
        f"{mod}.qweight": pack_int32(q.t().contiguous(), bits, dim=0),
        f"{mod}.qzeros": pack_int32((z - 1).t().contiguous(), bits, dim=1),  # v1: stored zero - 1
        f"{mod}.scales": s.t().contiguous(),
        f"{mod}.g_idx": g_idx,
    }


def awq_tensors(mod: str, w: torch.Tensor, group=64):
    q, s, z = rtn_int(w, 4, group, sym=False)
    return {
        f"{mod}.qweight": pack_int32(q.t().contiguous(), 4, dim=1, order=AWQ_ORDER),
        f"{mod}.qzeros": pack_int32(z.t().contiguous(), 4, dim=1, order=AWQ_ORDER),
        f"{mod}.scales": s.t().contiguous(),
    }


def fp8_tensors(mod: str, w: torch.Tensor):
    """Per-output-channel FP8 E4M3 (scale = amax / 448), scale stored in bf16 as
    llm-compressor does; the fp8 values are computed against the stored scale."""
    scale = (w.float().abs().amax(1, keepdim=True) / 448.0).clamp(min=1e-12).to(torch.bfloat16)
    q = (w.float() / scale.float()).clamp(-448, 448).to(torch.float8_e4m3fn)
    return {f"{mod}.weight": q, f"{mod}.weight_scale": scale}


def int8_tensors(mod: str, w: torch.Tensor):
    scale = (w.float().abs().amax(1, keepdim=True) / 127.0).clamp(min=1e-12).to(torch.bfloat16)
    q = torch.round(w.float() / scale.float()).clamp(-128, 127).to(torch.int8)
    return {f"{mod}.weight": q, f"{mod}.weight_scale": scale}


def _ct_config(fmt: str, wtype: str, act_type: str) -> dict:
    return {
        "quant_method": "compressed-tensors", "format": fmt, "quantization_status": "compressed",
        "config_groups": {"group_0": {
            "targets": ["Linear"], "format": fmt,
            "weights": {"num_bits": 8, "type": wtype, "strategy": "channel", "symmetric": True, "dynamic": False,
                        "group_size": None},
            "input_activations": {"num_bits": 8, "type": act_type, "strategy": "token", "symmetric": True,
                                  "dynamic": True}}},
        "ignore": ["lm_head"],
    }


def quantization_config(fmt: str, group_size: int = 64, bits: int = 4, sym: bool = True) -> dict:
    if fmt == "fp8":
        return _ct_config("float-quantized", "float", "float")
    if fmt == "int8":
        return _ct_config("int-quantized", "int", "int")
    if fmt == "gptq":
        return {"quant_method": "gptq", "bits": bits, "group_size": group_size, "sym": sym, "desc_act": False,
                "checkpoint_format": "gptq"}
    if fmt == "awq":
        return {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True, "version": "gemm"}
    raise ValueError(f"unknown format {fmt!r}; writers: {', '.join(FORMATS)}")


def quantize_tensor(fmt: str, name: str, w: torch.Tensor, group_size: int = 64, bits: int = 4, sym: bool = True):
    mod = name.removesuffix(".weight")
    if fmt == "fp8":
        return fp8_tensors(mod, w)
    if fmt == "int8":
        return int8_tensors(mod, w)
    if fmt == "gptq":
        return gptq_tensors(mod, w, bits=bits, group=group_size, sym=sym)
    if fmt == "awq":
        return awq_tensors(mod, w, group=group_size)
    raise ValueError(f"unknown format {fmt!r}; writers: {', '.join(FORMATS)}")


def quantize_checkpoint(src: str | Path, dst: str | Path, fmt: str, group_size: int = 64, bits: int = 4,
                        sym: bool = True, shard_bytes: int = 2 * 2**30) -> Path:
    """Write `dst`: `src` (dense HF) with every decoder Linear quantized to `fmt`.
    Streams one tensor at a time; shards output files at `shard_bytes`."""
    src, dst = Path(src), Path(dst)
    ckpt = Checkpoint(src)
    if ckpt.quantization_config is not None:
        raise ValueError(f"{src}: already quantized ({ckpt.quantization_config.get('quant_method')})")
    qc = quantization_config(fmt, group_size, bits, sym)
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():  # tokenizer, generation config, chat template ...
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
            shutil.copy2(f, dst / f.name)
    cfg = dict(ckpt.config)
    cfg["quantization_config"] = qc
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(ckpt.tensors):
        t = ckpt.read(name)
        out = quantize_tensor(fmt, name, t, group_size, bits, sym) if is_decoder_linear(name) else {name: t}
        n = sum(v.numel() * v.element_size() for v in out.values())
        if size + n > shard_bytes and shards[-1]:
            shards.append({})
            size = 0
        shards[-1].update({k: v.contiguous() for k, v in out.items()})
        size += n
    if len(shards) == 1:
        save_file(shards[0], str(dst / "model.safetensors"))
    else:
        weight_map = {}
        for i, part in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(part, str(dst / fname))
            weight_map.update(dict.fromkeys(part, fname))
        (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst
