"""Round-to-nearest (RTN) writers of the checkpoint formats mixq reads.

llm-compressor, AutoGPTQ/GPTQModel and AutoAWQ pin their own torch and transformers and
mostly need a GPU, so mixq makes its own checkpoints of a dense HF model in their exact
on-disk layouts and with the quantization_config they write:

  write_fp8      compressed-tensors float-quantized (FP8_DYNAMIC channel / tensor / FP8_BLOCK)
  write_int8     compressed-tensors W8A8 int-quantized, or W8A16 (pack-quantized, 8 bits)
  write_gptq     AutoGPTQ legacy v1 layout (qweight/qzeros/scales/g_idx, stored zero - 1)
  write_awq      AutoAWQ GEMM layout (asymmetric, interleaved packing)
  write_ct_int4  compressed-tensors W4A16 pack-quantized

The values are plain RTN: no Hessian (GPTQ) and no activation smoothing (AWQ), so norms
stay the base's and a mix of these checkpoints needs no smoothing compensation. Every
scale is rounded *up* to its storage dtype, so no weight is clipped by more than half a
step by that rounding: the error of every element is at most half a quantization step.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from mixq.formats.checkpoint import Checkpoint
from mixq.formats.packing import AWQ_ORDER, pack_int32

FORMATS = ("fp8", "int8", "gptq", "awq", "ct-int4")
FP8_MAX = 448.0  # largest finite float8_e4m3fn
# The compressed-tensors release whose config and tensor layout these writers follow.
CT_VERSION = "0.19.0"
SHARD_BYTES = 2 * 2**30
_LINEAR_LEAVES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "w1", "w2", "w3")


def is_decoder_linear(name: str) -> bool:
    """Decoder Linear weights a quantizer converts: attention, MLP and MoE expert
    projections; not embeddings, norms, MoE routers (``mlp.gate``) or lm_head."""
    parts = name.split(".")
    return ".layers." in name and name.endswith(".weight") and len(parts) >= 2 and parts[-2] in _LINEAR_LEAVES


def _is_unquantized_linear(name: str, shape: tuple[int, ...]) -> bool:
    """A 2-D weight kept dense that belongs to a Linear (lm_head, routers): the modules
    a quantizer lists as ignored. Embeddings and norms are not Linears."""
    return (name.endswith(".weight") and len(shape) == 2 and not is_decoder_linear(name)
            and "embed" not in name and "norm" not in name)


# ---------------------------------------------------------------- scales and grids


def stored_scale(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`scale` (float32) in its storage dtype, rounded up rather than to nearest.

    Rounding down would push the largest weight of a group past the integer range, where
    it is clipped by more than half a step; rounding up costs at most one ulp of range.
    Zero scales (all-zero groups) become the dtype's smallest normal so nothing divides
    by zero."""
    s = scale.float().clamp(min=torch.finfo(dtype).tiny)
    out = s.to(dtype)
    up = torch.nextafter(out, torch.full_like(out, float("inf")))
    return torch.where(out.float() < s, up, out)


def _groups(k: int, group: int) -> int:
    if group == -1:
        return k
    if group <= 0 or k % group:
        raise ValueError(f"in_features {k} is not a multiple of group size {group}")
    return group


def rtn_int(w: torch.Tensor, bits: int, group: int, sym: bool, scale_dtype: torch.dtype = torch.float16,
            min_zero: int = 0):
    """RTN of w [N, K] per (row, group of `group` columns; -1: the whole row).

    Returns unsigned ints q [N, K] int32 in [0, 2**bits), scales [N, G] in `scale_dtype`
    and integer zeros [N, G] int32, with w ~ (q - zero) * scale. Symmetric: scale =
    amax / ((2**bits - 1) / 2) and zero = 2**(bits-1), the grid AutoGPTQ and
    compressed-tensors share. Asymmetric: the range [min(w, 0), max(w, 0)] over 2**bits - 1
    steps, zero = round(-min / scale); 0 is always exact. The stored (rounded) scale is the
    one the ints are computed against, so dequantization reproduces the grid exactly.
    min_zero 1 (GPTQ v1, which cannot store a zero of 0) keeps a step below zero: groups
    with (almost) no negative weights take scale max(range / (2**bits-1), max / (2**bits-2))."""
    n, k = w.shape
    g = w.float().reshape(n, k // _groups(k, group), _groups(k, group))
    qmax = (1 << bits) - 1
    if sym:
        scale = stored_scale(g.abs().amax(-1) / (qmax / 2), scale_dtype)
        zero = torch.full(scale.shape, 1 << (bits - 1), dtype=torch.int32)
    else:
        lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
        scale = (hi - lo) / qmax
        if min_zero:
            scale = torch.maximum(scale, hi / (qmax - min_zero))
        scale = stored_scale(scale, scale_dtype)
        zero = torch.round(-lo / scale.float()).clamp(min_zero, qmax).to(torch.int32)
    q = torch.round(g / scale.float()[..., None]) + zero[..., None]
    return q.clamp(0, qmax).reshape(n, k).to(torch.int32), scale, zero


def _ct_scale_dtype(w: torch.Tensor, scale_dtype: torch.dtype | None) -> torch.dtype:
    # llm-compressor keeps scales in the module's dtype (bf16 for a bf16 model).
    return scale_dtype or (w.dtype if w.dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.bfloat16)


# ---------------------------------------------------------------- per-tensor encoders
# Each takes a module name ("model.layers.0.mlp.up_proj") and its dense weight [N, K] and
# returns the stored tensors of that module, by full name.


def fp8_tensors(mod: str, w: torch.Tensor, scheme: str = "channel", block: tuple[int, int] = (128, 128),
                scale_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """FP8 E4M3 weight with a per-tensor [1], per-channel [N, 1] or block
    [ceil(N/bn), ceil(K/bk)] scale = amax / 448 (compressed-tensors float-quantized)."""
    n, k = w.shape
    wf = w.float()
    if scheme == "tensor":
        amax = wf.abs().amax().reshape(1)
        expand = lambda s: s.reshape(1, 1)  # noqa: E731
    elif scheme == "channel":
        amax = wf.abs().amax(1, keepdim=True)
        expand = lambda s: s  # noqa: E731
    elif scheme == "block":
        bn, bk = block
        nb, kb = -(-n // bn), -(-k // bk)
        # partial edge blocks: pad with zeros, which never raise an amax
        padded = torch.nn.functional.pad(wf.abs(), (0, kb * bk - k, 0, nb * bn - n))
        amax = padded.reshape(nb, bn, kb, bk).amax((1, 3))
        expand = lambda s: s.repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]  # noqa: E731
    else:
        raise ValueError(f"fp8 scheme {scheme!r}: expected 'channel', 'tensor' or 'block'")
    scale = stored_scale(amax / FP8_MAX, _ct_scale_dtype(w, scale_dtype))
    q = (wf / expand(scale.float())).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return {f"{mod}.weight": q, f"{mod}.weight_scale": scale}


def int8_tensors(mod: str, w: torch.Tensor, scale_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Symmetric per-channel INT8 (compressed-tensors int-quantized): weight int8 [N, K],
    weight_scale [N, 1] = amax / 127.5, ints in [-128, 127]."""
    q, scale, zero = rtn_int(w, 8, -1, sym=True, scale_dtype=_ct_scale_dtype(w, scale_dtype))
    return {f"{mod}.weight": (q - zero).to(torch.int8), f"{mod}.weight_scale": scale}


def ct_packed_tensors(mod: str, w: torch.Tensor, bits: int = 4, group: int = 64, sym: bool = True,
                      scale_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """compressed-tensors pack-quantized: weight_packed int32 [N, K*bits/32] (value +
    2**(bits-1), packed along K), weight_scale [N, G], weight_shape [2] int64 and, when
    asymmetric, weight_zero_point int32 [N*bits/32, G] packed along N. group -1: per channel."""
    q, scale, zero = rtn_int(w, bits, group, sym, scale_dtype=_ct_scale_dtype(w, scale_dtype))
    # q is already offset by 2**(bits-1) when symmetric, and by the zero when not: the
    # signed value + offset is exactly what compressed-tensors packs.
    out = {f"{mod}.weight_packed": pack_int32(q, bits, dim=1), f"{mod}.weight_scale": scale,
           f"{mod}.weight_shape": torch.tensor(list(w.shape), dtype=torch.int64)}
    if not sym:
        out[f"{mod}.weight_zero_point"] = pack_int32(zero, bits, dim=0)
    return out


def gptq_tensors(mod: str, w: torch.Tensor, bits: int = 4, group: int = 64, sym: bool = True,
                 perm: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Legacy GPTQ (v1) tensors of w [N, K]: qweight [K*bits/32, N], qzeros [G, N*bits/32]
    holding zero - 1, scales fp16 [G, N], g_idx [K]. With `perm` (act-order), column
    perm[j] is quantized in group j // group and g_idx records it."""
    n, k = w.shape
    wp = w if perm is None else w[:, perm]
    # v1 stores zero - 1 (AutoGPTQ's historical off-by-one, undone by every v1 kernel), so
    # a zero of 0 is not storable: asymmetric grids keep zero >= 1
    q, s, z = rtn_int(wp, bits, group, sym, scale_dtype=torch.float16, min_zero=0 if sym else 1)
    g_idx = torch.arange(k, dtype=torch.int32) // _groups(k, group)
    if perm is not None:
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(k)
        q, g_idx = q[:, inv], g_idx[inv]
    return {
        f"{mod}.qweight": pack_int32(q.t().contiguous(), bits, dim=0),
        f"{mod}.qzeros": pack_int32((z - 1).t().contiguous(), bits, dim=1),
        f"{mod}.scales": s.t().contiguous(),
        f"{mod}.g_idx": g_idx,
    }


def awq_tensors(mod: str, w: torch.Tensor, group: int = 64) -> dict[str, torch.Tensor]:
    """AutoAWQ GEMM tensors of w [N, K]: asymmetric 4-bit, qweight [K, N/8] and qzeros
    [G, N/8] packed along N in AWQ_ORDER, scales fp16 [G, N]."""
    q, s, z = rtn_int(w, 4, group, sym=False, scale_dtype=torch.float16)
    return {
        f"{mod}.qweight": pack_int32(q.t().contiguous(), 4, dim=1, order=AWQ_ORDER),
        f"{mod}.qzeros": pack_int32(z.t().contiguous(), 4, dim=1, order=AWQ_ORDER),
        f"{mod}.scales": s.t().contiguous(),
    }


# ---------------------------------------------------------------- quantization configs


def _ct_args(num_bits: int, type_: str, strategy: str, *, dynamic: bool = False, group_size: int | None = None,
             block: list[int] | None = None, symmetric: bool = True) -> dict:
    # every field compressed-tensors' QuantizationArgs dumps, in its order (it names the
    # zero-point dtype only when there is a zero point)
    return {"num_bits": num_bits, "type": type_, "symmetric": symmetric, "group_size": group_size,
            "strategy": strategy, "block_structure": block, "dynamic": dynamic, "actorder": None,
            "scale_dtype": None, "zp_dtype": None if symmetric else "torch.int8",
            "observer": None if dynamic else "minmax",
            "observer_kwargs": {}}


def ct_quantization_config(fmt: str, weights: dict, input_activations: dict | None,
                           ignore: list[str] | None = None) -> dict:
    """A compressed-tensors quantization_config as llm-compressor writes it into
    config.json: one config group targeting every Linear, `ignore` the dense Linears."""
    return {
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                      "input_activations": input_activations, "output_activations": None,
                                      "format": fmt}},
        "format": fmt, "global_compression_ratio": None, "ignore": list(ignore or ["lm_head"]),
        "kv_cache_scheme": None, "quant_method": "compressed-tensors", "quantization_status": "compressed",
        "sparsity_config": {}, "transform_config": {}, "version": CT_VERSION,
    }


def fp8_config(scheme: str = "channel", ignore: list[str] | None = None) -> dict:
    """FP8 weights with dynamic activations: channel = llm-compressor's FP8_DYNAMIC,
    block = FP8_BLOCK (128x128 weights, per-token-group-of-128 activations). tensor:
    per-tensor weights with dynamic per-token activations (the FP8 preset's static input
    scale needs calibration data, which an RTN writer does not have)."""
    if scheme == "block":
        w = _ct_args(8, "float", "block", block=[128, 128])
        a = _ct_args(8, "float", "group", dynamic=True, group_size=128)
    elif scheme in ("channel", "tensor"):
        w = _ct_args(8, "float", scheme)
        a = _ct_args(8, "float", "token", dynamic=True)
    else:
        raise ValueError(f"fp8 scheme {scheme!r}: expected 'channel', 'tensor' or 'block'")
    return ct_quantization_config("float-quantized", w, a, ignore)


def int8_config(activations: bool = True, ignore: list[str] | None = None) -> dict:
    """INT8 per-channel symmetric weights: W8A8 (dynamic per-token int8 activations,
    int-quantized) or, without activations, W8A16 (pack-quantized, as compressed-tensors
    infers for weight-only int schemes)."""
    w = _ct_args(8, "int", "channel")
    if activations:
        return ct_quantization_config("int-quantized", w, _ct_args(8, "int", "token", dynamic=True), ignore)
    return ct_quantization_config("pack-quantized", w, None, ignore)


def ct_int4_config(group_size: int = 64, sym: bool = True, ignore: list[str] | None = None) -> dict:
    """W4A16 pack-quantized (llm-compressor's W4A16 / W4A16_ASYM presets, group_size set)."""
    w = _ct_args(4, "int", "group", group_size=group_size, symmetric=sym)
    return ct_quantization_config("pack-quantized", w, None, ignore)


def gptq_config(bits: int = 4, group_size: int = 64, sym: bool = True, desc_act: bool = False) -> dict:
    """AutoGPTQ's BaseQuantizeConfig.to_dict() for a legacy (v1) checkpoint."""
    return {"bits": bits, "group_size": group_size, "damp_percent": 0.01, "desc_act": desc_act,
            "static_groups": False, "sym": sym, "true_sequential": True, "model_name_or_path": None,
            "model_file_base_name": "model", "quant_method": "gptq", "checkpoint_format": "gptq"}


def awq_config(group_size: int = 64, modules_to_not_convert: list[str] | None = None) -> dict:
    """AutoAWQ's AwqConfig.to_transformers_dict() for the GEMM kernel layout."""
    return {"quant_method": "awq", "zero_point": True, "group_size": group_size, "bits": 4, "version": "gemm",
            "modules_to_not_convert": modules_to_not_convert}


def quantization_config(fmt: str, group_size: int = 64, bits: int = 4, sym: bool = True) -> dict:
    """Default quantization_config of a format name in FORMATS (fp8: FP8_DYNAMIC)."""
    if fmt == "fp8":
        return fp8_config()
    if fmt == "int8":
        return int8_config()
    if fmt == "gptq":
        return gptq_config(bits, group_size, sym)
    if fmt == "awq":
        return awq_config(group_size)
    if fmt == "ct-int4":
        return ct_int4_config(group_size, sym)
    raise ValueError(f"unknown format {fmt!r}; writers: {', '.join(FORMATS)}")


# ---------------------------------------------------------------- checkpoint writers


def _write_checkpoint(src: str | Path, dst: str | Path, encode: Callable[[str, torch.Tensor], dict],
                      qc: Callable[[list[str]], dict], sidecar: str | None = None,
                      shard_bytes: int = SHARD_BYTES, progress: bool = False) -> Path:
    """Stream `src` into `dst` one tensor at a time: decoder Linears through `encode`,
    everything else as stored. qc(ignored Linear names) gives the quantization_config.
    Output shards at `shard_bytes` (with model.safetensors.index.json when > 1 file)."""
    src, dst = Path(src), Path(dst)
    ckpt = Checkpoint(src)
    if ckpt.quantization_config is not None:
        raise ValueError(f"{src}: already quantized ({ckpt.quantization_config.get('quant_method')}); "
                         "the writers need a dense checkpoint")
    if dst.is_dir() and any(dst.glob("*.safetensors")):
        raise ValueError(f"{dst}: already holds a checkpoint; write into a new directory")
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():  # tokenizer, generation config, chat template, ...
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
            shutil.copy2(f, dst / f.name)

    names = sorted(ckpt.tensors)
    ignored = sorted({n.removesuffix(".weight") for n in names if _is_unquantized_linear(n, ckpt.tensors[n].shape)}
                     | {"lm_head"})
    if progress:
        from tqdm import tqdm

        names = tqdm(names, desc=f"mixq: writing {dst.name}", unit="tensor", leave=False)
    files: list[str] = []
    weight_map: dict[str, str] = {}
    part: dict[str, torch.Tensor] = {}
    size = 0

    def flush() -> None:
        nonlocal part, size
        files.append(f"part-{len(files)}.safetensors")
        save_file(part, str(dst / files[-1]), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, files[-1]))
        part, size = {}, 0

    for name in names:
        t = ckpt.read(name)
        out = encode(name.removesuffix(".weight"), t) if is_decoder_linear(name) and t.dim() == 2 else {name: t}
        n = sum(v.numel() * v.element_size() for v in out.values())
        if part and size + n > shard_bytes:
            flush()  # only this shard's tensors are ever held in memory
        part.update({k: v.contiguous() for k, v in out.items()})
        size += n
    if part or not files:
        flush()
    # HF names: model.safetensors for one file, model-0000i-of-0000n.safetensors otherwise
    final = (["model.safetensors"] if len(files) == 1
             else [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))])
    for tmp, fname in zip(files, final):
        (dst / tmp).rename(dst / fname)
    if len(files) > 1:
        rename = dict(zip(files, final))
        index = {"metadata": {"total_size": sum((dst / f).stat().st_size for f in final)},
                 "weight_map": {k: rename[v] for k, v in sorted(weight_map.items())}}
        (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))

    config = dict(ckpt.config)
    config["quantization_config"] = qc(ignored)
    (dst / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    if sidecar:  # older loaders read the quantizer's own file rather than config.json
        (dst / sidecar).write_text(json.dumps(config["quantization_config"], indent=2))
    return dst


def write_fp8(src: str | Path, dst: str | Path, scheme: str = "channel", **kw) -> Path:
    """compressed-tensors FP8 checkpoint of `src`: scheme "channel" (FP8_DYNAMIC),
    "tensor", or "block" (FP8_BLOCK, 128x128 weight_scale). kw: shard_bytes, progress."""
    fp8_config(scheme)  # refuse a bad scheme before writing anything
    return _write_checkpoint(src, dst, lambda m, w: fp8_tensors(m, w, scheme),
                             lambda ign: fp8_config(scheme, ign), **kw)


def write_int8(src: str | Path, dst: str | Path, activations: bool = True, **kw) -> Path:
    """compressed-tensors INT8 per-channel symmetric checkpoint of `src`: W8A8
    (int-quantized, dynamic per-token activations) or, activations=False, W8A16."""
    enc = int8_tensors if activations else (lambda m, w: ct_packed_tensors(m, w, bits=8, group=-1))
    return _write_checkpoint(src, dst, enc, lambda ign: int8_config(activations, ign), **kw)


def write_ct_int4(src: str | Path, dst: str | Path, group_size: int = 64, sym: bool = True, **kw) -> Path:
    """compressed-tensors W4A16 pack-quantized checkpoint of `src`."""
    return _write_checkpoint(src, dst, lambda m, w: ct_packed_tensors(m, w, 4, group_size, sym),
                             lambda ign: ct_int4_config(group_size, sym, ign), **kw)


def write_gptq(src: str | Path, dst: str | Path, bits: int = 4, group_size: int = 64, sym: bool = True,
               **kw) -> Path:
    """Legacy AutoGPTQ (v1, checkpoint_format gptq) checkpoint of `src`, RTN, no act-order.
    Writes quantize_config.json too, as AutoGPTQ does."""
    if bits not in (4, 8):
        raise ValueError(f"gptq bits must be 4 or 8, got {bits}")
    return _write_checkpoint(src, dst, lambda m, w: gptq_tensors(m, w, bits, group_size, sym),
                             lambda ign: gptq_config(bits, group_size, sym), sidecar="quantize_config.json", **kw)


def write_awq(src: str | Path, dst: str | Path, group_size: int = 64, **kw) -> Path:
    """AutoAWQ GEMM checkpoint of `src` (4-bit, zero point), RTN without smoothing."""
    def qc(ignored: list[str]) -> dict:
        # AutoAWQ lists module leaf names it skipped (MoE routers: "gate"); none: null
        leaves = sorted({n.rsplit(".", 1)[-1] for n in ignored if n != "lm_head"})
        return awq_config(group_size, leaves or None)

    return _write_checkpoint(src, dst, lambda m, w: awq_tensors(m, w, group_size), qc, **kw)


_WRITERS = {"fp8": write_fp8, "int8": write_int8, "gptq": write_gptq, "awq": write_awq, "ct-int4": write_ct_int4}


def quantize_checkpoint(src: str | Path, dst: str | Path, fmt: str, **opts) -> Path:
    """Write `dst`: the dense HF checkpoint `src` with every decoder Linear in `fmt`
    (one of FORMATS); `opts` go to that format's writer (write_fp8, write_int8, ...)."""
    try:
        writer = _WRITERS[fmt]
    except KeyError:
        raise ValueError(f"unknown format {fmt!r}; writers: {', '.join(FORMATS)}") from None
    return writer(src, dst, **opts)
