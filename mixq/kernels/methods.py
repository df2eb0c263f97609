"""LinearMethods backed by the Triton kernels, registered ahead of the torch reference.

`prepare` turns each checkpoint layout into the kernel layout once after loading (still
compressed); `apply` is one kernel launch (plus the activation reshape)."""

from __future__ import annotations

import os

import torch

from mixq.formats.gguf_quants import decode
from mixq.formats.packing import AWQ_ORDER, unpack_int32
from mixq.formats.spec import QuantizedWeight, WeightSpec
from mixq.kernels import cuda_jit, ggml, w4a16_mma, wna16

# GGUF block types whose layout is wna16's: 32-value groups of 4 or 8 bits with an fp16
# scale and either a fixed zero (q4_0: 8, q8_0: 128 after the int8 -> uint8 shift) or a
# floating min (q4_1: the kernel's offset)
GGUF_WNA16 = ("q4_0", "q4_1", "q8_0")


def canonical_int(qw: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Any int layout -> (q [N, K] unsigned, scales [N, G], zeros [N, G] | None, g_idx [K] | None).
    zeros None means symmetric around 2**(bits-1)."""
    spec, (n, k) = qw.spec, qw.shape
    t = qw.tensors
    half = 1 << (spec.bits - 1)
    if spec.layout == "gptq":
        q = unpack_int32(t["qweight"], spec.bits, dim=0)[:k].t()
        z = (unpack_int32(t["qzeros"], spec.bits, dim=1)[:, :n] + spec.zero_offset).t()
        s, g_idx = t["scales"].t(), t.get("g_idx")
    elif spec.layout == "awq":
        q = unpack_int32(t["qweight"], 4, dim=1, order=AWQ_ORDER).t()
        z = unpack_int32(t["qzeros"], 4, dim=1, order=AWQ_ORDER).t()
        s, g_idx = t["scales"].t(), None
    elif spec.layout == "ct-packed":
        q = unpack_int32(t["weight_packed"], spec.bits, dim=1)[:, :k]  # stored as value + 2**(bits-1)
        zp = t.get("weight_zero_point")
        s = t["weight_scale"]
        z = None if zp is None else unpack_int32(zp, spec.bits, dim=0)[:n]
        g_idx = t.get("weight_g_idx")
    else:
        raise ValueError(f"{qw.name}: {spec.layout} is not an integer layout")
    if z is not None and bool((z == half).all()):
        z = None  # symmetric in fact: skip the zero-point loads
    return q, s, z, g_idx


def _kernel_device(device: torch.device) -> tuple[bool, str]:
    if device.type != "cuda" and os.environ.get("MIXQ_TRITON_INTERPRET_METHODS") != "1":
        return False, f"needs a CUDA device (got {device.type})"
    return True, ""


def _groups(spec: WeightSpec, k: int) -> int:
    return k if spec.group_size is None else spec.group_size


def _act_order(k: int, group: int, g_idx: torch.Tensor | None):
    """(perm, per-column groups or None) of an act-order weight: columns sorted by group
    once, so each group is contiguous; `gidx` is returned when the sorted columns still do
    not fill the groups evenly (a K shard of an act-order weight under tensor parallelism)."""
    if g_idx is None:
        return None, None
    perm = torch.argsort(g_idx.long(), stable=True)
    sorted_groups = g_idx.long()[perm]
    if torch.equal(sorted_groups, torch.arange(k, device=perm.device) // group):
        return perm, None
    return perm, sorted_groups


class MMAW4A16Method:
    """Opt-in (`MIXQ_W4A16_MMA=1`): GPTQ / AWQ / compressed-tensors INT4 weight-only on the
    compiled Marlin-class kernel
    (`mixq/kernels/w4a16_mma.py`): CUDA compute capability 8.0+, nvcc or a cached build,
    N and K multiples of 64, groups of 16-64 dividing 64 or multiples of 64 (or per
    channel). Everything else it refuses goes to `triton-wna16` (8-bit, act-order shards
    with per-column groups, odd shapes, fp32 activations)."""

    name = "cuda-w4a16"

    def can_implement(self, spec: WeightSpec, device: torch.device) -> tuple[bool, str]:
        if os.environ.get("MIXQ_W4A16_MMA") != "1":
            # measured on H100 (bench/RESULTS.md, issue 18): as fast as or faster than
            # triton-wna16 at 1-64 rows on the Llama-3-8B / Qwen3-30B-A3B shapes, except
            # Qwen3's o_proj at 64 rows; at 128-511 rows the rewritten kernel is untimed and
            # the old one lost 2.2x on the widest weights, so not the default yet
            return False, "opt-in (MIXQ_W4A16_MMA=1): untimed at 128-511 rows after its rewrite (issue 18)"
        if spec.layout not in ("gptq", "awq", "ct-packed"):
            return False, f"layout {spec.layout} is not a packed int layout"
        if spec.bits != 4:
            return False, f"{spec.bits}-bit weights: the mma kernel takes 4-bit"
        if spec.activation != "none":
            return False, "activation quantization is not weight-only"
        if device.type != "cuda":
            return False, f"needs a CUDA device (got {device.type})"
        cap = torch.cuda.get_device_capability(device)
        if cap < (8, 0):
            return False, f"needs compute capability 8.0+ (mma.sync bf16), got {cap}"
        return cuda_jit.available(w4a16_mma.LIB, cap, w4a16_mma.PARTS)

    def can_implement_weight(self, weight: QuantizedWeight, dtype: torch.dtype) -> tuple[bool, str]:
        """The checks that need the weight itself: shape, group, act-order layout, dtype."""
        n, k = weight.shape
        if dtype not in (torch.bfloat16, torch.float16):
            return False, f"activation dtype {dtype} is not bf16/fp16"
        why = w4a16_mma.layout_problem(n, k, _groups(weight.spec, k))
        if why:
            return False, why
        g_idx = canonical_g_idx(weight)
        if g_idx is not None and _act_order(k, _groups(weight.spec, k), g_idx)[1] is not None:
            return False, "act-order columns fill groups unevenly (a K shard): needs a scale per column"
        return True, ""

    def prepare(self, weight: QuantizedWeight, dtype: torch.dtype) -> QuantizedWeight:
        n, k = weight.shape
        group = _groups(weight.spec, k)
        q, s, z, g_idx = canonical_int(weight)
        perm, gidx = _act_order(k, group, g_idx)
        if gidx is not None:
            raise ValueError(f"{weight.name}: act-order columns fill groups unevenly; cuda-w4a16 cannot take it")
        if perm is not None:
            q = q[:, perm]
        p = w4a16_mma.pack_w4a16(q, s, z, group, dtype, perm)
        tensors = {"qw": p.qw, "scales": p.scales}
        for role in ("zeros", "perm"):
            if getattr(p, role) is not None:
                tensors[role] = getattr(p, role)
        return QuantizedWeight(weight.name, weight.spec, weight.shape, tensors)

    def apply(self, weight, x, bias):
        t, (n, k) = weight.tensors, weight.shape
        w = w4a16_mma.W4A16MMAWeight(t["qw"], t["scales"], t.get("zeros"), t.get("perm"), _groups(weight.spec, k), n, k)
        shape = x.shape
        y = w4a16_mma.w4a16_gemm(x.reshape(-1, shape[-1]), w, bias)
        return y.reshape(*shape[:-1], n)


def canonical_g_idx(qw: QuantizedWeight) -> torch.Tensor | None:
    """The act-order group index of an int weight, or None."""
    t = qw.tensors
    return t.get("g_idx") if qw.spec.layout == "gptq" else t.get("weight_g_idx") if qw.spec.layout == "ct-packed" else None


class WNA16Method:
    """GPTQ / AWQ / compressed-tensors int4 and int8 weight-only on CUDA (or under the
    Triton interpreter when MIXQ_TRITON_INTERPRET_METHODS=1, for CPU tests)."""

    name = "triton-wna16"

    def can_implement(self, spec: WeightSpec, device: torch.device) -> tuple[bool, str]:
        if wna16.triton is None:
            return False, "triton is not installed"
        if spec.layout == "gguf":
            if spec.qtype not in GGUF_WNA16:
                return False, f"gguf {spec.qtype} is not a wna16 layout ({', '.join(GGUF_WNA16)})"
            return _kernel_device(device)
        if spec.layout not in ("gptq", "awq", "ct-packed"):
            return False, f"layout {spec.layout} is not a packed int layout"
        if spec.bits not in (4, 8):
            return False, f"{spec.bits}-bit weights are not supported (4, 8)"
        if spec.activation != "none":
            return False, "activation quantization is not weight-only"
        if device.type != "cuda" and os.environ.get("MIXQ_TRITON_INTERPRET_METHODS") != "1":
            return False, f"needs a CUDA device (got {device.type})"
        return True, ""

    def prepare(self, weight: QuantizedWeight, dtype: torch.dtype) -> QuantizedWeight:
        if weight.spec.layout == "gguf":
            return self._prepare_gguf(weight)
        n, k = weight.shape
        group = _groups(weight.spec, k)
        q, s, z, g_idx = canonical_int(weight)
        # act-order: columns ordered by group once, the kernel gathers activation columns
        # through perm; a K shard whose columns fill the scale table's groups unevenly also
        # gets gidx, a scale row per column (+4 bytes per column, still compressed)
        perm, gidx = _act_order(k, group, g_idx)
        if perm is not None:
            q = q[:, perm]
        if gidx is None and (k % group or group % 16):
            raise ValueError(f"{weight.name}: K={k} and group {group}: the kernel needs K % group == 0 and "
                             "group % 16 == 0")
        if gidx is not None and k % 16:
            raise ValueError(f"{weight.name}: K={k}: per-column groups need K % 16 == 0")
        p = wna16.pack_wna16(q.to(torch.uint8), s, z, weight.spec.bits, group, perm, gidx)
        tensors = {"qweight": p.qweight, "scales": p.scales}
        for role in ("zeros", "perm", "gidx"):
            if getattr(p, role) is not None:
                tensors[role] = getattr(p, role)
        return QuantizedWeight(weight.name, weight.spec, weight.shape, tensors)

    def _prepare_gguf(self, weight: QuantizedWeight) -> QuantizedWeight:
        """GGUF blocks -> wna16: values as stored (q8_0 shifted to unsigned), the fp16 block
        scale d, and for q4_1 its fp16 min as the floating offset."""
        p = decode(weight.tensors["blocks"], weight.spec.qtype)
        bits = 8 if weight.spec.qtype == "q8_0" else 4
        w = wna16.pack_wna16(p.q, p.d, None, bits, 32, offsets=p.m)
        tensors = {"qweight": w.qweight, "scales": w.scales}
        if w.offsets is not None:
            tensors["offsets"] = w.offsets
        return QuantizedWeight(weight.name, weight.spec, weight.shape, tensors)

    def apply(self, weight, x, bias):
        t, (n, k) = weight.tensors, weight.shape
        bits = 8 if weight.spec.qtype == "q8_0" else weight.spec.bits
        w = wna16.WNA16Weight(t["qweight"], t["scales"], t.get("zeros"), t.get("perm"), bits,
                              _groups(weight.spec, k), n, k, t.get("gidx"), t.get("offsets"))
        shape = x.shape
        y = wna16.wna16_gemm(x.reshape(-1, shape[-1]), w, bias)
        return y.reshape(*shape[:-1], w.n)


class GGMLMethod:
    """llama.cpp's q5_0, q5_1 and K-quant blocks on CUDA (or the interpreter, as above):
    repacked once into mixq.kernels.ggml's layout (same bits), one Triton launch per call."""

    name = "triton-ggml"

    def can_implement(self, spec: WeightSpec, device: torch.device) -> tuple[bool, str]:
        if ggml.triton is None:
            return False, "triton is not installed"
        if spec.layout != "gguf" or spec.qtype not in ggml.GGML_KERNEL_TYPES:
            return False, f"not a gguf {'/'.join(ggml.GGML_KERNEL_TYPES)} weight"
        return _kernel_device(device)

    def prepare(self, weight: QuantizedWeight, dtype: torch.dtype) -> QuantizedWeight:
        t = ggml.pack_ggml(decode(weight.tensors["blocks"], weight.spec.qtype), weight.spec.qtype)
        return QuantizedWeight(weight.name, weight.spec, weight.shape, t)

    def apply(self, weight, x, bias):
        shape = x.shape
        y = ggml.ggml_gemm(x.reshape(-1, shape[-1]), weight.tensors, weight.spec.qtype, weight.shape[0], bias)
        return y.reshape(*shape[:-1], weight.shape[0])
