"""LinearMethods for the CPU: PyTorch's CPU integer kernels, weights repacked once at load
and kept compressed, registered ahead of the torch reference (which dequantizes the whole
weight in every forward).

INT4 (GPTQ / AWQ / compressed-tensors, any group that is a multiple of 32 or per channel,
act-order, zero points; GGUF q4_0 / q4_1 blocks): `torch.ops.aten._weight_int4pack_mm_for_cpu`, which computes
    w[n, k] = (q[n, k] - 8) * scale[k // G, n] + zero[k // G, n]
with G in {32, 64, 128, 256}, a float zero, and scale/zero in the activation dtype
([K/G, N, 2]). A checkpoint's integer zero point z maps onto it exactly in real numbers:
(q - z) * s = (q - 8) * s + (8 - z) * s; symmetric schemes have z = 8, so zero = 0. GGUF blocks of 32 map the same way: q4_0's
w = d (q - 8) is scale d, zero 0; q4_1's w = d q + m is scale d, zero m + 8 d. Groups
are made contiguous once at load: the columns are ordered by group (act-order's g_idx) and
each group padded to a multiple of 32 with columns whose activation is zero; a forward then
gathers the activation columns in that order (only when the order or padding is not the
identity). The kernel group is the largest of 256/128/64/32 dividing every padded group, so
a per-channel scale (group -1) is repeated K/G times. N is padded to a multiple of 16 (the
packing's unit) with zero rows that the output drops.

INT8 (compressed-tensors int-quantized per channel / tensor, GPTQ 8-bit per channel):
`torch.ops.aten._weight_int8pack_mm` (y = x @ (w * s)^T, s per output channel) on signed
codes; a zero point z (per channel) is a rank-1 correction: (q - z) s = q s - z s, so
y -= rowsum(x) * (z * s).

FP8 E4M3 (per tensor, channel, group or block scales): mixq.kernels.cpu_fp8, a C kernel that
upcasts in registers (torch's CPU fp8 conversions and `_scaled_mm` are scalar loops).

W8A8 and FP8 checkpoints with activation quantization quantize their inputs as the scheme
says (mixq.kernels.cpu_quant.fake_quant: per token, static per tensor, or per 1 x bk group
for block-scaled FP8, the GPU's choice) at every M: the CPU computes the model the
checkpoint defines.
"""

from __future__ import annotations

import torch

from mixq.errors import CheckpointError, UnsupportedFormatError
from mixq.formats.gguf_quants import decode
from mixq.formats.spec import QuantizedWeight, WeightSpec
from mixq.kernels import cpu_fp8, cpu_gguf
from mixq.kernels.cpu_quant import quantize_input, token_codes
from mixq.kernels.methods import canonical_int
from mixq.kernels.w8_methods import _static_scale as w8_static_scale

KERNEL_GROUPS = (256, 128, 64, 32)
# torch's CPU int4 packing lays rows out in blocks of 64 (a shorter last block): packed
# weights concatenate along N (merged projections) only where every part but the last
# is a whole number of blocks (torch 2.13: cat(pack(a), pack(b)) == pack(cat(a, b)) iff so)
INT4_PACK_BLOCK_N = 64
FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _on_cpu(device: torch.device) -> tuple[bool, str]:
    return (True, "") if device.type == "cpu" else (False, f"runs on the CPU (got {device.type})")


def _check_dtype(weight: QuantizedWeight, dtype: torch.dtype) -> None:
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"{weight.name}: activation dtype {dtype} is not one of {FLOAT_DTYPES}")


def _has_op(name: str) -> bool:
    return hasattr(torch.ops.aten, name)


def _column_order(g_idx: torch.Tensor | None, k: int, group: int, num_groups: int):
    """(src [Kp] int64 column per padded position, K meaning a zero column; kernel group;
    group of each kernel group). Columns sorted by group, each group padded to a multiple of 32."""
    col_group = (torch.arange(k) // group) if g_idx is None else g_idx.long().cpu()
    if num_groups == 1:
        col_group = torch.zeros(k, dtype=torch.long)  # one scale per row: the order is irrelevant
    order = torch.argsort(col_group, stable=True)
    counts = torch.bincount(col_group, minlength=num_groups).tolist()
    if len(counts) > num_groups:
        raise CheckpointError(f"g_idx refers to group {len(counts) - 1} but there are {num_groups} scale groups")
    padded = [-(-c // 32) * 32 for c in counts]
    kg = next(g for g in KERNEL_GROUPS if all(p % g == 0 for p in padded))
    src, owner, start = [], [], 0
    for j, (c, p) in enumerate(zip(counts, padded)):
        src.append(order[start : start + c])
        src.append(torch.full((p - c,), k, dtype=torch.long))
        owner += [j] * (p // kg)
        start += c
    return torch.cat(src), kg, torch.tensor(owner, dtype=torch.long)


GGUF_INT4 = ("q4_0", "q4_1")  # 32-value blocks of 4-bit values with a scale (and a min)


def _gguf_int4(weight: QuantizedWeight):
    """GGUF q4_0 / q4_1 blocks -> (q [N, K] 0..15, scale [N, K/32], zero [N, K/32]) with
    w = (q - 8) * scale + zero, in fp32 (exact: d and m are fp16)."""
    p = decode(weight.tensors["blocks"], weight.spec.qtype)
    d = p.d.float()
    zero = torch.zeros_like(d) if p.m is None else p.m.float() + 8 * d  # d q + m = d (q - 8) + (m + 8 d)
    return p.q, d, zero


class CPUInt4Method:
    """4-bit GPTQ / AWQ / compressed-tensors weights and GGUF q4_0 / q4_1 blocks through
    torch's CPU int4 kernel."""

    name = "cpu-int4pack"

    def can_implement(self, spec: WeightSpec, device: torch.device) -> tuple[bool, str]:
        if not _has_op("_weight_int4pack_mm_for_cpu"):
            return False, "this torch has no _weight_int4pack_mm_for_cpu"
        if spec.layout == "gguf":
            if spec.qtype not in GGUF_INT4:
                return False, f"gguf {spec.qtype} is not one of {'/'.join(GGUF_INT4)}"
            return _on_cpu(device)
        if spec.layout not in ("gptq", "awq", "ct-packed") or spec.bits != 4:
            return False, f"layout {spec.layout} ({spec.bits}-bit) is not a 4-bit packed int layout"
        if spec.activation != "none":
            return False, f"activation quantization {spec.activation} is not weight-only"
        if spec.group_size is not None and spec.group_size % 32:
            return False, f"group size {spec.group_size} is not a multiple of 32 (the kernel's groups are 32-256)"
        return _on_cpu(device)

    def prepare(self, weight: QuantizedWeight, dtype: torch.dtype) -> QuantizedWeight:
        _check_dtype(weight, dtype)
        n, k = weight.shape
        if weight.spec.layout == "gguf":
            q, s, zero = _gguf_int4(weight)
            g_idx = None
        else:
            q, s, z, g_idx = canonical_int(weight)  # [N, K] 0..15, [N, G], [N, G] | None, [K] | None
            s = s.float()
            zero = torch.zeros_like(s) if z is None else (8 - z.float()) * s  # (q - z) s = (q - 8) s + (8 - z) s
        num_groups = s.shape[1]
        src, kg, owner = _column_order(g_idx, k, weight.spec.group_size or k, num_groups)
        np_ = -(-n // 16) * 16
        qp = torch.full((np_, src.numel()), 8, dtype=torch.int32)
        qp[:n] = torch.nn.functional.pad(q.to(torch.int32), (0, 1), value=8)[:, src]
        sz = torch.zeros(owner.numel(), np_, 2, dtype=torch.float32)
        sz[:, :n, 0] = s[:, owner].t()
        sz[:, :n, 1] = zero[:, owner].t()
        tensors = {"packed": torch.ops.aten._convert_weight_to_int4pack_for_cpu(qp, 1),
                   "scale_zero": sz.to(dtype).contiguous()}
        if not torch.equal(src, torch.arange(k)):
            tensors["src"] = src
        return QuantizedWeight(weight.name, weight.spec, weight.shape, tensors)

    def apply(self, weight: QuantizedWeight, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return int4_linear(x, weight.tensors, weight.shape[0], bias)


def int4_linear(x: torch.Tensor, t: dict[str, torch.Tensor], n: int, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., K] @ W^T (+ bias) -> [..., N] in x's dtype, W in CPUInt4Method's layout:
    packed uint8 [Np, Kp/2] (torch's int4 packing), scale_zero [Kp/G, Np, 2] in the activation
    dtype (G follows from the shapes), src int64 [Kp] (gather order; absent when the identity)."""
    shape = x.shape
    packed, sz = t["packed"], t["scale_zero"]
    x2 = x.reshape(-1, shape[-1])
    if x2.dtype != sz.dtype:
        x2 = x2.to(sz.dtype)
    if "src" in t:  # act-order / padded groups: columns in the packed order, K -> zero
        x2 = torch.nn.functional.pad(x2, (0, 1)).index_select(1, t["src"])
    group = packed.shape[1] * 2 // sz.shape[0]
    if x2.shape[0] >= TILE_MIN_ROWS and _int4_layout_known():
        y = _int4_tiles(x2, packed, group, sz)
    else:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), packed, group, sz)
    if y.shape[1] != n:
        y = y[:, :n]
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    if bias is not None:
        y = y + bias
    return y.reshape(*shape[:-1], n)


def _unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The codes [rows, Kp] (uint8 0..15) of rows of torch's CPU int4 packing, which starts
    at a 64-row block boundary. A whole block of 64 rows is [Kp, 32] bytes, row j in the low
    nibble and row j + 32 in the high one; a last, shorter block of r rows is [Kp, r/2] bytes,
    rows 2j and 2j + 1 (torch 2.13's layout; `_int4_layout_known` checks it once)."""
    rows, kp = packed.shape[0], packed.shape[1] * 2
    full = rows // INT4_PACK_BLOCK_N * INT4_PACK_BLOCK_N
    out = torch.empty(rows, kp, dtype=torch.uint8)
    if full:
        b = packed[:full].reshape(-1, kp, INT4_PACK_BLOCK_N // 2).transpose(1, 2)  # [blocks, 32, Kp]
        out[:full] = torch.cat([b & 15, b >> 4], 1).reshape(full, kp)
    if rows > full:
        r = rows - full
        b = packed[full:].reshape(kp, r // 2).t()
        out[full:] = torch.stack([b & 15, b >> 4], 1).reshape(r, kp)
    return out


_INT4_LAYOUT: bool | None = None


def _int4_layout_known() -> bool:
    """Whether this torch packs int4 as `_unpack_int4` reads it (whole and short blocks):
    checked once on random codes; otherwise every call runs torch's kernel."""
    global _INT4_LAYOUT
    if _INT4_LAYOUT is None:
        q = torch.randint(0, 16, (INT4_PACK_BLOCK_N * 2 + 16, 96), dtype=torch.int32,
                          generator=torch.Generator().manual_seed(0))
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        _INT4_LAYOUT = packed.dtype == torch.uint8 and torch.equal(_unpack_int4(packed).to(torch.int32), q)
    return _INT4_LAYOUT


def _int4_tiles(x: torch.Tensor, packed: torch.Tensor, group: int, sz: torch.Tensor) -> torch.Tensor:
    """x [M, Kp] @ W^T for many rows (prefill): ~4 MiB tiles of whole 64-row blocks of the
    weight dequantized ((q - 8) * scale + zero, as the kernel defines it) for torch's GEMM,
    never a dense copy of the whole weight. torch 2.13's int4 kernel runs float32 at ~0.5
    GFLOP/s, so a 256-token prefill of a 135M model took minutes."""
    np_, kp = packed.shape[0], packed.shape[1] * 2
    dtype = sz.dtype
    out = torch.empty(x.shape[0], np_, dtype=dtype)
    rows = max(1, TILE_BYTES // (kp * torch.finfo(dtype).bits // 8) // INT4_PACK_BLOCK_N) * INT4_PACK_BLOCK_N
    for n0 in range(0, np_, rows):
        n1 = min(np_, n0 + rows)
        q = _unpack_int4(packed[n0:n1]).to(dtype).sub_(8).view(n1 - n0, kp // group, group)
        s = sz[:, n0:n1].transpose(0, 1)  # [rows, Kp/G, 2]
        w = q.mul_(s[..., :1]).add_(s[..., 1:]).view(n1 - n0, kp)
        out[:, n0:n1] = x @ w.t()
    return out


class CPUInt8Method:
    """8-bit weights with one scale per output channel (or tensor) through torch's CPU
    int8 weight-only kernel; W8A8 checkpoints quantize activations per token first."""

    name = "cpu-int8pack"

    def can_implement(self, spec: WeightSpec, device: torch.device) -> tuple[bool, str]:
        if not _has_op("_weight_int8pack_mm"):
            return False, "this torch has no _weight_int8pack_mm"
        if spec.layout == "int8":
            if spec.scale_layout not in ("tensor", "channel"):
                return False, f"int8 scale layout {spec.scale_layout} is not per channel or tensor"
            if spec.activation not in ("none", "dynamic-token", "static-tensor"):
                return False, f"int8 activation scheme {spec.activation} is not per token or per tensor"
        elif spec.layout in ("gptq", "ct-packed") and spec.bits == 8:
            if spec.group_size is not None:
                return False, f"8-bit weights with group scales (g{spec.group_size}): the kernel's scale is per channel"
            if spec.activation != "none":
                return False, f"activation quantization {spec.activation} is not weight-only"
        else:
            return False, f"layout {spec.layout} ({spec.bits}-bit) is not an 8-bit int layout"
        return _on_cpu(device)

    def prepare(self, weight: QuantizedWeight, dtype: torch.dtype) -> QuantizedWeight:
        _check_dtype(weight, dtype)
        n, _ = weight.shape
        t = weight.tensors
        static = None
        if weight.spec.layout == "int8":
            w = t["weight"]
            s = t["weight_scale"].float().reshape(-1)
            zp = t.get("weight_zero_point")
            z = None if zp is None or not bool(zp.ne(0).any()) else zp.float().reshape(-1)
            static = _static_scale(weight)
        else:  # unsigned codes around 128, per-channel zero
            q, s2, z2, _ = canonical_int(weight)
            w = (q.to(torch.int32) - 128).to(torch.int8)
            s = s2.float().reshape(-1)
            z = None if z2 is None else z2.float().reshape(-1) - 128
        if s.numel() not in (1, n) or (z is not None and z.numel() not in (1, n)):
            raise CheckpointError(f"{weight.name}: {s.numel()} scales / zero points for {n} output channels")
        s = s.expand(n)
        # torch 2.13's bf16 int8 kernel reads past K when K % 16 != 0 (wrong sums or a crash):
        # pad K with zero weights here, and the activations in forward
        w = torch.nn.functional.pad(w, (0, -w.shape[1] % 16))
        tensors = {"weight": w.contiguous(), "scale": s.to(dtype).contiguous()}
        if z is not None:
            tensors["zero_scale"] = (z.expand(n) * s).contiguous()  # fp32: subtracted as rowsum(x) * z * s
        if static is not None:
            tensors["input_scale"] = static
        return QuantizedWeight(weight.name, weight.spec, weight.shape, tensors)

    def apply(self, weight: QuantizedWeight, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        t, (n, k) = weight.tensors, weight.shape
        shape = x.shape
        dt = t["scale"].dtype
        xin, xs = x.reshape(-1, k), None
        if weight.spec.activation != "none":
            # INT8 codes (exact in bf16 and fp32) through the kernel, each token's scale after it
            xin, xs = token_codes(xin, to_int8=True, static_scale=t.get("input_scale"), codes_dtype=dt)
        xin = xin.to(dt)
        if t["weight"].shape[1] != k:
            xin = torch.nn.functional.pad(xin, (0, t["weight"].shape[1] - k))
        y = _int8_matmul(xin.contiguous(), t["weight"], t["scale"])
        if "zero_scale" in t or xs is not None:
            y = y.float()
            if "zero_scale" in t:
                y = y - xin.float().sum(1, keepdim=True) * t["zero_scale"]
            if xs is not None:
                y = y * xs[:, None]
        y = y.to(x.dtype)
        if bias is not None:
            y = y + bias
        return y.reshape(*shape[:-1], n)


TILE_MIN_ROWS = 64  # from here the int8 kernel loses to dequantized tiles + torch's GEMM (4x at 128 rows)
TILE_BYTES = 4 << 20


def _int8_matmul(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ (w int8 [N, K] * s [N])^T in s's dtype: torch's int8 weight-only kernel for
    few rows; for many (prefill) ~4 MiB tiles of the weight dequantized for torch's GEMM
    (oneDNN, AMX in bf16), never a dense copy of the whole weight."""
    m, k = x.shape
    if m < TILE_MIN_ROWS:
        return torch.ops.aten._weight_int8pack_mm(x, w, s)
    n = w.shape[0]
    out = torch.empty(m, n, dtype=s.dtype)
    rows = max(1, TILE_BYTES // (k * s.element_size()))
    for n0 in range(0, n, rows):
        tile = w[n0 : n0 + rows].to(s.dtype) * s[n0 : n0 + rows, None]
        out[:, n0 : n0 + rows] = x @ tile.t()
    return out


def _static_scale(weight: QuantizedWeight) -> torch.Tensor | None:
    """The checkpoint's per-tensor input scale (fp32 [1]) of a static-activation scheme
    (w8_methods' rule), refusing an asymmetric one (its zero point)."""
    s = w8_static_scale(weight)
    izp = weight.tensors.get("input_zero_point")
    if s is not None and izp is not None and bool(izp.ne(0).any()):
        raise UnsupportedFormatError(f"{weight.name}: asymmetric static activation quantization "
                                     "(input_zero_point) is not supported; use symmetric W8A8")
    return s


def _fp8_block(spec: WeightSpec, k: int) -> tuple[int, int]:
    """(rows of N, cols of K) sharing one weight scale."""
    if spec.scale_layout == "block":
        return tuple(spec.block_size)
    if spec.scale_layout == "group":
        return 1, spec.group_size
    return 1, k  # tensor (expanded to channels) and channel


class CPUFP8Method:
    """FP8 E4M3 weights, kept FP8, through the CPU FP8 kernel (mixq.kernels.cpu_fp8)."""

    name = "cpu-fp8"

    def can_implement(self, spec: WeightSpec, device: torch.device) -> tuple[bool, str]:
        if spec.layout != "fp8" or spec.dtype != torch.float8_e4m3fn:
            return False, f"layout {spec.layout} ({spec.dtype}) is not fp8 e4m3"
        if spec.scale_layout not in ("tensor", "channel", "group", "block"):
            return False, f"fp8 scale layout {spec.scale_layout} is not supported"
        if spec.activation not in ("none", "dynamic-token", "static-tensor", "dynamic-group"):
            return False, f"fp8 activation scheme {spec.activation} is not supported"
        ok, why = _on_cpu(device)
        if not ok:
            return ok, why
        return cpu_fp8.available()

    def prepare(self, weight: QuantizedWeight, dtype: torch.dtype) -> QuantizedWeight:
        n, k = weight.shape
        spec = weight.spec
        bn, bk = _fp8_block(spec, k)
        grid = (-(-n // bn), -(-k // bk))
        s = weight.tensors["weight_scale"].float()
        if spec.scale_layout == "tensor":
            s = s.reshape(1, 1).expand(n, 1)
        if s.numel() != grid[0] * grid[1]:
            raise CheckpointError(f"{weight.name}: weight_scale shape {list(s.shape)} does not fit [{n}, {k}] "
                                  f"with {bn}x{bk} scale blocks (expected {list(grid)})")
        tensors = {"weight": weight.tensors["weight"].contiguous(), "weight_scale": s.reshape(grid).contiguous()}
        static = _static_scale(weight)
        if static is not None:
            tensors["input_scale"] = static
        return QuantizedWeight(weight.name, spec, weight.shape, tensors)

    def apply(self, weight: QuantizedWeight, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        t, (n, k), spec = weight.tensors, weight.shape, weight.spec
        shape = x.shape
        x2 = x.reshape(-1, k)
        bn, bk = _fp8_block(spec, k)
        static = t.get("input_scale")
        per_token = spec.activation == "dynamic-token" or (spec.activation == "static-tensor" and static is not None)
        if (per_token and spec.scale_layout in ("tensor", "channel") and x.dtype == torch.bfloat16
                and x2.shape[0] < cpu_fp8.TILE_MIN_ROWS and cpu_fp8.has_bf16_dot()):
            # the FP8 codes are exact in bf16: the kernel multiplies them in bf16 pairs and
            # applies each token's scale to its sums, as an FP8 GEMM does
            codes, xs = token_codes(x2, to_int8=False, static_scale=static, codes_dtype=torch.bfloat16)
            y = cpu_fp8.fp8_linear(codes, t["weight"], t["weight_scale"], (bn, bk), xs, x.dtype)
        else:
            if spec.activation != "none":
                x2 = quantize_input(x2, spec, static)  # fp32: exact codes * scales
                if x.dtype != torch.float32 and x2.shape[0] >= cpu_fp8.TILE_MIN_ROWS:
                    x2 = x2.to(x.dtype)  # prefill tiles run torch's GEMM in the model dtype
            y = cpu_fp8.fp8_linear(x2, t["weight"], t["weight_scale"], (bn, bk), out_dtype=x.dtype)
        if bias is not None:
            y = y + bias
        return y.reshape(*shape[:-1], n)


class CPUQ80Method:
    """GGUF q8_0 blocks (fp16 scale per 32 int8 values) through mixq.kernels.cpu_gguf,
    read as stored: prepare keeps the blocks, so a tied embedding and its LM head share them."""

    name = "cpu-q8_0"

    def can_implement(self, spec: WeightSpec, device: torch.device) -> tuple[bool, str]:
        if spec.layout != "gguf" or spec.qtype != "q8_0":
            return False, f"layout {spec.describe()} is not gguf q8_0"
        ok, why = _on_cpu(device)
        if not ok:
            return ok, why
        return cpu_gguf.available()

    def prepare(self, weight: QuantizedWeight, dtype: torch.dtype) -> QuantizedWeight:
        b = weight.tensors["blocks"]
        n, k = weight.shape
        if tuple(b.shape) != (n, k // 32, 34) or k % 32:
            raise CheckpointError(f"{weight.name}: q8_0 blocks {list(b.shape)} do not fit [{n}, {k}]")
        return weight if b.is_contiguous() else QuantizedWeight(weight.name, weight.spec, weight.shape,
                                                                {"blocks": b.contiguous()})

    def apply(self, weight: QuantizedWeight, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        shape = x.shape
        y = cpu_gguf.q8_0_linear(x.reshape(-1, shape[-1]), weight.tensors["blocks"], x.dtype)
        if bias is not None:
            y = y + bias
        return y.reshape(*shape[:-1], weight.shape[0])
