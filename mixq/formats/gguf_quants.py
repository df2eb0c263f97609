"""llama.cpp's GGML block types, decoded in torch: the reference dequantization and the
canonical parts (integer values, scales, offsets) the kernels repack from.

A quantized GGUF row of K values is K / B blocks of T bytes (B values each); rows are
independent, so a weight [N, K] is stored as uint8 [N, K / B, T]. Block layouts (bytes,
little-endian; "nibble order" = value j of a 32-value run in the low nibble of byte j,
value j + 16 in its high nibble; K-quants use 256-value super-blocks):

  q4_0  B=32  T=18   d f16 | qs[16] nibbles                    w = d * (q - 8)
  q4_1  B=32  T=20   d f16 | m f16 | qs[16]                     w = d * q + m
  q5_0  B=32  T=22   d f16 | qh u32 (bit j = high bit of j) | qs[16]   w = d * (q - 16)
  q5_1  B=32  T=24   d f16 | m f16 | qh u32 | qs[16]            w = d * q + m
  q8_0  B=32  T=34   d f16 | qs[32] int8                        w = d * q
  q4_k  B=256 T=144  d f16 | dmin f16 | scales[12] (8 six-bit scales and mins) |
                     qs[128]: 32-byte chunk c holds sub-block 2c (low nibbles) and 2c+1
                     (high nibbles)                              w = d*sc[s] * q - dmin*mn[s]
  q5_k  B=256 T=176  as q4_k, then qh[32] before qs: bit s of qh[i] is the high bit of
                     value i of sub-block s
  q6_k  B=256 T=210  ql[128] | qh[64] | scales[16] int8 | d f16; value i of 32-run g:
                     half h = g // 4, r = g % 4: low = ql[64h + 32(r % 2) + i] >> 4(r // 2),
                     high = qh[32h + i] >> 2r (2 bits)           w = d*sc[16-run] * (q - 32)

The arithmetic follows the gguf package's numpy reference (`gguf.quants`) operation by
operation in float32, so `dequantize` is bit-exact with it (tests/test_gguf_quants.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GGMLType:
    """One block type: values per block, bytes per block, nominal bits, symmetric (no min)."""

    name: str
    block: int
    nbytes: int
    bits: int
    symmetric: bool

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / self.block


# The quantized types mixq reads (what Q4_K_M, Q5_K_M, Q6_K and the legacy files hold).
QUANT_TYPES = {t.name: t for t in (
    GGMLType("q4_0", 32, 18, 4, True),
    GGMLType("q4_1", 32, 20, 4, False),
    GGMLType("q5_0", 32, 22, 5, True),
    GGMLType("q5_1", 32, 24, 5, False),
    GGMLType("q8_0", 32, 34, 8, True),
    GGMLType("q4_k", 256, 144, 4, False),
    GGMLType("q5_k", 256, 176, 5, False),
    GGMLType("q6_k", 256, 210, 6, True),
)}
# Floating types (stored as plain tensors; BF16 arrives as raw 2-byte words).
FLOAT_TYPES = ("f32", "f16", "bf16")


def _f16(b: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 2] little-endian -> float32 [..., 1] (fp16 widened exactly)."""
    return b.contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 16·r] -> [..., 32·r] values: per 16-byte run, low nibbles then high."""
    shape = qs.shape[:-1]
    q = qs.reshape(*shape, -1, 16)
    return torch.cat([q & 0x0F, q >> 4], dim=-1).reshape(*shape, -1)


def _high_bits32(qh: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 4] (a little-endian u32) -> [..., 32] bits, bit j at position j."""
    word = qh.contiguous().view(torch.int32)  # [..., 1]
    return ((word >> torch.arange(32, dtype=torch.int32, device=qh.device)) & 1).to(torch.uint8)


def k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q4_k/q5_k: 12 bytes -> (sc [..., 8], mn [..., 8]) six-bit ints. Bytes 0-3 hold the
    low 6 bits of sc 0-3 (top 2 bits: high bits of sc 4-7), bytes 4-7 the same for the
    mins, bytes 8-11 the low nibbles of sc 4-7 and (high nibble) of mn 4-7."""
    d, m, md = scales[..., 0:4], scales[..., 4:8], scales[..., 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


@dataclass
class Parts:
    """A block type decoded into what a kernel multiplies (no arithmetic done yet).

    q   uint8 [N, K]       unsigned values, in [0, 2**bits)
    d   fp16 [N, K / SB]   (super-)block scale; SB = B
    m   fp16 [N, K / SB]   q4_1/q5_1: the block's min (added); q4_k/q5_k: dmin; else None
    sc  int [N, K / SG]    K-quants: sub-block scale (q6_k: signed); else None
    mn  int [N, K / SG]    q4_k/q5_k: sub-block min; else None
    zero                   integer subtracted from q before scaling (8, 16, 0, 32)
    sub                    SG, the sub-block length (K-quants), else B
    """

    q: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor | None
    sc: torch.Tensor | None
    mn: torch.Tensor | None
    zero: int
    sub: int


def decode(blocks: torch.Tensor, qtype: str) -> Parts:
    """uint8 [N, K/B, T] blocks of a quantized type -> Parts (exact, no float math)."""
    t = QUANT_TYPES[qtype]
    if blocks.dim() != 3 or blocks.shape[-1] != t.nbytes or blocks.dtype != torch.uint8:
        raise ValueError(f"{qtype}: expected uint8 blocks [N, K/{t.block}, {t.nbytes}], got "
                         f"{blocks.dtype} {list(blocks.shape)}")
    n, nb = blocks.shape[0], blocks.shape[1]
    f16 = lambda b: b.contiguous().view(torch.float16)[..., 0]  # noqa: E731  [N, nb]
    m = sc = mn = None
    if qtype == "q8_0":
        q = (blocks[..., 2:].contiguous().view(torch.int8).to(torch.int16) + 128).to(torch.uint8)
        return Parts(q.reshape(n, -1), f16(blocks[..., 0:2]), None, None, None, 128, 32)
    if qtype in ("q4_0", "q4_1", "q5_0", "q5_1"):
        d = f16(blocks[..., 0:2])
        off = 2
        if qtype in ("q4_1", "q5_1"):
            m, off = f16(blocks[..., 2:4]), 4
        q = _nibbles(blocks[..., off + (4 if qtype.startswith("q5") else 0):])
        if qtype.startswith("q5"):
            q = q | (_high_bits32(blocks[..., off:off + 4]) << 4)
        zero = {"q4_0": 8, "q5_0": 16}.get(qtype, 0)
        return Parts(q.reshape(n, -1), d, m, None, None, zero, 32)
    if qtype in ("q4_k", "q5_k"):
        d, m = f16(blocks[..., 0:2]), f16(blocks[..., 2:4])
        sc, mn = k_scale_min(blocks[..., 4:16])  # [N, nb, 8]
        q = _nibbles_k(blocks[..., -128:])  # [N, nb, 256]
        if qtype == "q5_k":
            qh = blocks[..., 16:48]  # [N, nb, 32]: bit s of byte i -> value 32 s + i
            bits = (qh.unsqueeze(-2) >> torch.arange(8, dtype=torch.uint8, device=qh.device)[:, None]) & 1
            q = q | (bits.reshape(n, nb, 256) << 4)
        return Parts(q.reshape(n, -1), d, m, sc.reshape(n, -1), mn.reshape(n, -1), 0, 32)
    if qtype == "q6_k":
        ql, qh = blocks[..., 0:128], blocks[..., 128:192]
        sc = blocks[..., 192:208].contiguous().view(torch.int8)  # [N, nb, 16]
        d = f16(blocks[..., 208:210])
        # low nibbles: [N, nb, 2 halves, 2 shifts, 64] -> value index (half, shift, byte)
        low = torch.stack([ql.reshape(n, nb, 2, 64) & 0x0F, ql.reshape(n, nb, 2, 64) >> 4], dim=3)
        low = low.reshape(n, nb, 2, 4, 32)  # (half, r = 2*shift + byte // 32, i)
        shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=qh.device)
        high = (qh.reshape(n, nb, 2, 1, 32) >> shifts[:, None]) & 3  # (half, r, i)
        q = (low | (high << 4)).reshape(n, -1)
        return Parts(q, d, None, sc.reshape(n, -1), None, 32, 16)
    raise ValueError(f"unknown GGML type {qtype!r}")


def _nibbles_k(qs: torch.Tensor) -> torch.Tensor:
    """K-quant qs [..., 128] -> [..., 256]: chunk c of 32 bytes gives sub-block 2c (low
    nibbles) and 2c + 1 (high nibbles)."""
    q = qs.reshape(*qs.shape[:-1], 4, 32)
    return torch.stack([q & 0x0F, q >> 4], dim=-2).reshape(*qs.shape[:-1], 256)


def dequantize_blocks(blocks: torch.Tensor, qtype: str) -> torch.Tensor:
    """uint8 [N, K/B, T] -> float32 [N, K], bit-exact with gguf.quants.dequantize."""
    t = QUANT_TYPES[qtype]
    if qtype == "q8_0":  # the hot CPU path of Q8_0 embeddings/heads: two passes, no uint8 detour
        n = blocks.shape[0]
        x = blocks[..., 2:].contiguous().view(torch.int8).float()
        return (x * _f16(blocks[..., 0:2])).reshape(n, -1)  # numpy: x * d
    p = decode(blocks, qtype)
    n, k = p.q.shape
    d = p.d.float()
    if p.sc is None:  # one scale per 32-value block
        q = p.q.reshape(n, -1, t.block).float()
        if p.zero:
            q = (p.q.reshape(n, -1, t.block).to(torch.int16) - p.zero).float()
        if p.m is not None:
            w = d[..., None] * q + p.m.float()[..., None]  # (d * qs) + m
        else:
            w = d[..., None] * q
        return w.reshape(n, k)
    # K-quants: per 32 (or 16) sub-block, scale = d * sc and offset = dmin * mn, in fp32
    per = t.block // p.sub
    dl = (d[..., None] * p.sc.reshape(n, -1, per).float()).reshape(n, -1, 1)
    q = p.q.reshape(n, -1, p.sub)
    if p.zero:
        return (dl * (q.to(torch.int16) - p.zero).float()).reshape(n, k)
    dm = (p.m.float()[..., None] * p.mn.reshape(n, -1, per).float()).reshape(n, -1, 1)
    return (dl * q.float() - dm).reshape(n, k)


def dequantize(data: torch.Tensor, qtype: str) -> torch.Tensor:
    """A stored GGUF tensor (blocks uint8 [..., K/B, T], or a float tensor) -> float32
    [..., K]. Leading dims (experts, rows) are kept."""
    if qtype in FLOAT_TYPES:
        return data.float()
    t = QUANT_TYPES[qtype]
    lead = data.shape[:-2]
    rows = data.reshape(-1, data.shape[-2], t.nbytes)
    return dequantize_blocks(rows, qtype).reshape(*lead, -1)
