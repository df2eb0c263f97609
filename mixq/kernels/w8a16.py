"""8-bit weight-only GEMM in Triton (FP8 E4M3 or INT8 weights, BF16/FP16 activations):
y = x @ dequant(W)^T, the weight upcast in registers, the activation never quantized.

It serves INT8 W8A16 checkpoints at every M, and the small-M (decode) path of the FP8 and
INT8 W8A8 linears: there the GEMM is bound by reading the weight, an activation-quant
launch would only add time, and unquantized activations are more accurate.

Layout (the checkpoint's own, kept as stored; `prepare` only normalises the scales):
  w      float8_e4m3fn | int8 [N, K]   K contiguous: a tile row is one coalesced read
  scale  fp32 [N]                       per output channel (a per-tensor scale is expanded)
         or fp32 [ceil(N/SBN), ceil(K/SBK)] on a grid: 128x128 blocks, or (1, G) groups
  zero   int32 [N] or None              INT8 asymmetric: w = (q - zero[n]) * scale
Per-channel scales are applied once in the epilogue; grid scales once per K tile to the
fp32 partial product (BK divides SBK, so a tile meets one scale per column), or, in the
GEMV, to the activation vector when the tile's rows share one block row. The upcast
8-bit value is exact in bf16/fp16 (int8 and e4m3 both fit), so the only rounding is the
fp32 accumulation and the output.

M == 1 runs a GEMV (elementwise products kept per lane in fp32, one reduction at the end);
M > 1 runs tl.dot tiles, "swapped" at small M (W @ x^T: the upcast weight is the MMA's
register operand, the few tokens its narrow side). Small M splits K across programs
(deterministic: fp32 partials, summed afterwards) so that enough weight bytes are in
flight to saturate HBM; large M walks tiles in grouped order so weight tiles are reused
from L2.
"""

from __future__ import annotations

import torch

from mixq.kernels.wna16 import interpreting, triton

if triton is not None:
    import triton.language as tl

    from mixq.kernels.tiles import (
        SplitOutput,
        grouped_tile,
        split_k_range,
        store_tile,
    )


def w8a16_reference(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None = None,
                    bias: torch.Tensor | None = None, block: tuple[int, int] | None = None) -> torch.Tensor:
    """Float64 reference: x [M, K] @ ((w - zero) * scale)^T (+ bias); scale per channel [N]
    or on a `block` = (SBN, SBK) grid."""
    n, k = w.shape
    wd = w.double()
    if zero is not None:
        wd = wd - zero.double().reshape(n, 1)
    if block is None:
        s = scale.double().reshape(n, 1)
    else:
        s = scale.double().repeat_interleave(block[0], 0)[:n].repeat_interleave(block[1], 1)[:, :k]
    y = x.double() @ (wd * s).t()
    return y if bias is None else y + bias.double()


if triton is not None:

    @triton.jit
    def _w8_gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, out_ptr, ws_ptr, cnt_ptr, N, K, stride_wn, stride_sn,
                        SBN: tl.constexpr, SBK: tl.constexpr, GRID_SCALE: tl.constexpr, SCALE_X: tl.constexpr,
                        HAS_ZP: tl.constexpr, HAS_BIAS: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT_K,
                        stride_os):
        # M == 1: [BN, BK] products accumulated per lane in fp32, reduced once at the end.
        # SCALE_X: the tile's rows share one block row of scales (BN divides SBN), so the
        # block scales multiply the BK activations instead of the BN x BK weights.
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_n = pid_n * BN + tl.arange(0, BN)
        n_ok = offs_n < N
        rk = tl.arange(0, BK)
        t0, t1 = split_k_range(pid_k, tl.cdiv(K, BK), SPLIT_K)
        if HAS_ZP:
            z = tl.load(z_ptr + offs_n, mask=n_ok, other=0).to(tl.float32)
        acc2 = tl.zeros((BN, BK), dtype=tl.float32)
        for t in range(t0, t1):
            offs_k = t * BK + rk
            k_ok = offs_k < K
            xk = tl.load(x_ptr + offs_k, mask=k_ok, other=0.0).to(tl.float32)
            # weights are read exactly once: stream them past the cache
            w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :],
                        mask=n_ok[:, None] & k_ok[None, :], other=0.0, eviction_policy="evict_first")
            w = w.to(tl.float32)
            if HAS_ZP:
                w = w - z[:, None]
            if SCALE_X:
                xk = xk * tl.load(s_ptr + (pid_n * BN // SBN) * stride_sn + offs_k // SBK, mask=k_ok, other=0.0)
            elif GRID_SCALE:  # BK divides SBK: one scale per row of the tile
                w = w * tl.load(s_ptr + (offs_n // SBN) * stride_sn + (t * BK) // SBK, mask=n_ok, other=0.0)[:, None]
            acc2 += w * xk[None, :]
        acc = tl.sum(acc2, axis=1)  # [BN]
        if not GRID_SCALE:
            acc = acc * tl.load(s_ptr + offs_n, mask=n_ok, other=0.0)
        if HAS_BIAS:
            if pid_k == 0:
                acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        store_tile(acc, out_ptr, ws_ptr, cnt_ptr, pid_n, pid_k, SPLIT_K, offs_n, offs_n, stride_os, n_ok, True)

    # M changes every call: do not compile a variant per M % 16
    @triton.jit(do_not_specialize=["M"])
    def _w8a16_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, out_ptr, ws_ptr, cnt_ptr, M, N, K,
                      stride_xm, stride_wn, stride_sn, stride_os, stride_om,
                      SBN: tl.constexpr, SBK: tl.constexpr, GRID_SCALE: tl.constexpr, HAS_ZP: tl.constexpr,
                      HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                      SPLIT_K, GROUP_M: tl.constexpr, SWAP: tl.constexpr, UPCAST: tl.constexpr,
                      FIXUP: tl.constexpr = True):
        # SWAP computes the transposed tile, W [BN, BK] @ x^T [BK, BM]: the upcast weight is
        # the MMA's first operand, which Hopper's wgmma reads straight from registers (as the
        # second operand it would go back through shared memory), and a few tokens fill the
        # MMA's narrow N side instead of padding its 64-row M side.
        pid = tl.program_id(0)
        pid_k = tl.program_id(1)
        pid_m, pid_n = grouped_tile(pid, M, N, BM, BN, GROUP_M)
        offs_m = pid_m * BM + tl.arange(0, BM)
        offs_n = pid_n * BN + tl.arange(0, BN)
        m_ok = offs_m < M
        n_ok = offs_n < N
        rk = tl.arange(0, BK)
        t0, t1 = split_k_range(pid_k, tl.cdiv(K, BK), SPLIT_K)
        if HAS_ZP:
            z = tl.load(z_ptr + offs_n, mask=n_ok, other=0).to(tl.float32)
        if SWAP:
            acc = tl.zeros((BN, BM), dtype=tl.float32)
        else:
            acc = tl.zeros((BM, BN), dtype=tl.float32)
        for t in range(t0, t1):
            offs_k = t * BK + rk
            k_ok = offs_k < K
            if SWAP:
                w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :],
                            mask=n_ok[:, None] & k_ok[None, :], other=0.0, eviction_policy="evict_first")  # [BN, BK]
                a = tl.load(x_ptr + offs_m[None, :] * stride_xm + offs_k[:, None],
                            mask=k_ok[:, None] & m_ok[None, :], other=0.0)  # [BK, BM]
                if HAS_ZP:  # q - z spans [-255, 255]: still exact in bf16/fp16
                    w = w.to(tl.float32) - z[:, None]
                if UPCAST:  # fp32 activations, or the interpreter (its bf16 dot is wrong)
                    part = tl.dot(w.to(tl.float32), a.to(tl.float32), input_precision="ieee")
                else:
                    part = tl.dot(w.to(a.dtype), a)
            else:
                a = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                            mask=m_ok[:, None] & k_ok[None, :], other=0.0)  # [BM, BK]
                w = tl.load(w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None],
                            mask=k_ok[:, None] & n_ok[None, :], other=0.0, eviction_policy="evict_first")  # [BK, BN]
                if HAS_ZP:
                    w = w.to(tl.float32) - z[None, :]
                if UPCAST:
                    part = tl.dot(a.to(tl.float32), w.to(tl.float32), input_precision="ieee")
                else:
                    part = tl.dot(a, w.to(a.dtype))
            if GRID_SCALE:
                s = tl.load(s_ptr + (offs_n // SBN) * stride_sn + (t * BK) // SBK, mask=n_ok, other=0.0)
                if SWAP:
                    acc += part * s[:, None]
                else:
                    acc += part * s[None, :]
            else:
                acc += part
        # per-channel scale and bias along N; output [SPLIT, M, N], this split's slice
        if GRID_SCALE:
            s = tl.full((BN,), 1.0, tl.float32)
        else:
            s = tl.load(s_ptr + offs_n, mask=n_ok, other=0.0)
        bias = tl.zeros((BN,), dtype=tl.float32)
        if HAS_BIAS:
            if pid_k == 0:
                bias = tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        if SWAP:
            acc = acc * s[:, None] + bias[:, None]
            offs = offs_m[None, :] * stride_om + offs_n[:, None]
            store_tile(acc, out_ptr, ws_ptr, cnt_ptr, pid, pid_k, SPLIT_K, offs, offs, stride_os,
                       n_ok[:, None] & m_ok[None, :], FIXUP)
        else:
            acc = acc * s[None, :] + bias[None, :]
            offs = offs_m[:, None] * stride_om + offs_n[None, :]
            store_tile(acc, out_ptr, ws_ptr, cnt_ptr, pid, pid_k, SPLIT_K, offs, offs, stride_os,
                       m_ok[:, None] & n_ok[None, :], FIXUP)


def _sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def _config(m: int, n: int, k: int, sbn: int, sbk: int, device: torch.device) -> tuple:
    """The launch configuration of launch_config on this device (interpreter included)."""
    return launch_config(m, n, k, sbn, sbk, _sms(device), interpreting())


def launch_config(m: int, n: int, k: int, sbn: int, sbk: int, sms: int, interpret: bool = False) -> tuple:
    """(BM, BN, BK, SPLIT_K, num_warps, num_stages, SWAP) for a GPU with `sms` multiprocessors
    (`interpret`: few large blocks, for the Triton interpreter); BM == 1 selects the GEMV.

    M == 1: 8 KiB weight tiles (BN x BK), BN as wide as still gives two programs per SM,
    split-K only when even BN = 8 leaves SMs idle (a split adds a sum-and-cast pass over
    [SPLIT, M, N] fp32 partials). 1 < M <= 64: swapped tiles (the tokens on the MMA's
    narrow side), K split until ~4 programs per SM stream the weight. Larger M: plain
    tensor-core tiles up to 256 rows, swapped beyond (both stay compiled and tested)."""
    if interpret:  # few, large blocks run fastest under the interpreter
        bm, bn, bk, warps, stages, swap = (1, 32, 64, 4, 1, False) if m == 1 else (16, 32, 64, 4, 1, m <= 16)
    elif m == 1:
        bn = next((b for b in (32, 16) if -(-n // b) >= 2 * sms), 8)
        bm, bk, warps, stages, swap = 1, 8192 // bn, 4, 3, False
    elif m <= 16:
        bm, bn, bk, warps, stages, swap = 16, 64, 128, 4, 4, True
    elif m <= 64:
        bm, bn, bk, warps, stages, swap = 64, 128, 128, 4, 4, True
    elif m <= 256:
        bm, bn, bk, warps, stages, swap = 64, 128, 64, 4, 4, False
    else:
        bm, bn, bk, warps, stages, swap = 128, 128, 64, 8, 3, True
    if sbk and not (bm == 1 and sbn % bn == 0):
        bk = min(bk, sbk)  # a K tile must lie inside one scale block (unless scales go on x)
    k_tiles = -(-k // bk)
    programs = -(-m // bm) * -(-n // bn)
    split = 1
    if interpret:
        split = 1 if k_tiles < 2 else 2
    elif m == 1 and programs < sms:
        split = min(k_tiles, -(-2 * sms // programs))
    elif 1 < m <= 64:
        split = max(1, min(k_tiles, -(-4 * sms // programs)))
    split = -(-k_tiles // -(-k_tiles // split))  # no empty splits
    return bm, bn, bk, split, warps, stages, swap


# bench/kernels.py --sweep sets this to time candidate configs; None = the heuristic
CONFIG_OVERRIDE: tuple | None = None


@torch.library.custom_op("mixq::w8a16_gemm", mutates_args=())
def _w8a16_op(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
              bias: torch.Tensor | None, sbn: int, sbk: int) -> torch.Tensor:
    return _launch(x, w, scale, zero, bias, sbn, sbk)


def _launch(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
            bias: torch.Tensor | None, sbn: int, sbk: int, config: tuple | None = None) -> torch.Tensor:
    m, k = x.shape
    n = w.shape[0]
    bm, bn, bk, split, warps, stages, swap = config or CONFIG_OVERRIDE or _config(m, n, k, sbn, sbk, x.device)
    if bm == 1 and m != 1:
        bm = 16  # a GEMV config only fits M == 1
    scale_x = bm == 1 and sbk > 0 and sbn % bn == 0
    if sbk and sbk % bk and not scale_x:
        raise ValueError(f"w8a16_gemm: BK={bk} does not divide the scale block {sbk}")
    split = max(1, min(split, triton.cdiv(k, bk)))
    if m == 0:
        return torch.empty((0, n), device=x.device, dtype=x.dtype)
    # split-K: fp32 partials [SPLIT, M, N], summed in split order by each tile's last split
    # (small tiles) or by a torch sum afterwards
    so = SplitOutput(m, n, split, bm, bn, x.dtype, x.device)
    y, ws, cnt = so.out, so.ws, so.counters if so.counters is not None else scale
    zz = zero if zero is not None else scale  # placeholders for absent tensors (never read)
    bb = bias if bias is not None else scale
    flags = dict(SBN=max(sbn, 1), SBK=max(sbk, 1), GRID_SCALE=sbk > 0, HAS_ZP=zero is not None,
                 HAS_BIAS=bias is not None, BN=bn, BK=bk, SPLIT_K=split, num_warps=warps, num_stages=stages)
    s_stride = scale.stride(0) if sbk else 0
    if bm == 1:
        _w8_gemv_kernel[(triton.cdiv(n, bn), split)](x, w, scale, zz, bb, y, ws, cnt, n, k, w.stride(0), s_stride,
                                                      stride_os=so.split_stride, SCALE_X=scale_x,
                                                      **flags)
    else:
        _w8a16_kernel[(triton.cdiv(m, bm) * triton.cdiv(n, bn), split)](
            x, w, scale, zz, bb, y, ws, cnt, m, n, k, x.stride(0), w.stride(0), s_stride,
            so.split_stride, n, BM=bm, GROUP_M=8, SWAP=swap,
            UPCAST=interpreting() or x.dtype == torch.float32, FIXUP=so.fixup, **flags)
    return so.result()


@_w8a16_op.register_fake
def _(x, w, scale, zero, bias, sbn, sbk):
    return x.new_empty((x.shape[0], w.shape[0]))


def w8a16_gemm(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, block: tuple[int, int] | None = None, *,
               config: tuple | None = None) -> torch.Tensor:
    """x [M, K] bf16/fp16 (fp32 too) @ dequant(w)^T -> [M, N] in x's dtype.

    w      float8_e4m3fn or int8 [N, K], K contiguous
    scale  fp32 [N] (per channel) when block is None, else fp32 [ceil(N/SBN), ceil(K/SBK)]
           contiguous for block = (SBN, SBK), SBK a power of two >= 32
    zero   int32 [N] or None (int8 weights only); bias [N] any float dtype or None
    config (tests and sweeps) replaces the heuristic's (BM, BN, BK, SPLIT_K, warps, stages,
           SWAP) and launches directly, outside the custom op
    """
    n, k = w.shape
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"w8a16_gemm: x must be [M, {k}], got {list(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"w8a16_gemm: x dtype {x.dtype} not supported")
    if w.dtype not in (torch.float8_e4m3fn, torch.int8) or w.stride(1) != 1:
        raise ValueError(f"w8a16_gemm: w must be float8_e4m3fn or int8 with K contiguous, got {w.dtype}")
    if zero is not None and (w.dtype != torch.int8 or zero.shape != (n,) or zero.dtype != torch.int32):
        raise ValueError("w8a16_gemm: zero must be int32 [N] and only for int8 weights")
    if block is None:
        if scale.shape != (n,) or scale.dtype != torch.float32:
            raise ValueError(f"w8a16_gemm: per-channel scale must be fp32 [{n}], got {scale.dtype} {list(scale.shape)}")
        sbn = sbk = 0
    else:
        sbn, sbk = block
        want = (-(-n // sbn), -(-k // sbk))
        if sbk < 32 or sbk & (sbk - 1) or scale.shape != want or scale.dtype != torch.float32 \
                or not scale.is_contiguous():
            raise ValueError(f"w8a16_gemm: block {block} needs SBK a power of two >= 32 and fp32 scales {list(want)}, "
                             f"got {scale.dtype} {list(scale.shape)}")
    if config is not None:
        return _launch(x.contiguous(), w, scale, zero, bias, sbn, sbk, config)
    return torch.ops.mixq.w8a16_gemm(x.contiguous(), w, scale, zero, bias, sbn, sbk)
