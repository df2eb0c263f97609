"""Marlin-class W4A16 GEMM (compiled CUDA, `cuda/w4a16_mma.cu`): y = x @ dequant(W)^T.

Layout (made once by `pack_w4a16` after loading; still 4 bits a weight, the same bytes as
the Triton layout, scales and zeros permuted but not enlarged):
  qw      int32 [K/16, 2N]   [K/16][N/64][32 lanes][4 words]: each lane's 16 bytes are
                             its mma.sync B fragments for a 16 x 64 slice (see the .cu)
  scales  [G, N]             activation dtype, each 64-column block ordered [g][jt]
                             (column 8 jt + g), so a lane's 8 scales are one 16-byte load
  zeros   uint8 [G, N] | None  same order; None: symmetric around 8
  perm    int32 [K] | None   act-order: kernel column j reads activation column perm[j]

Launch (`choose_launch`, a plain function): up to 16 rows on weights up to 10 MB the
split-K GEMV that streams the weight straight into registers (`gemv_split`); else the
tensor-core kernel with 16-64-row tiles (larger M loops over 64-row chunks) on a stream-K
persistent grid, until `wna16_dequant.dequant_chunk` (or `DEQUANT_MIN_M`) says the weight is
better dequantized to a bf16/fp16 buffer a column chunk at a time and multiplied by cuBLAS
(the mma.sync kernel cannot reach Hopper's wgmma rate). The library builds as PARTS
translation units in parallel (`build`).
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from mixq.kernels import cuda_jit
from mixq.kernels.tiles import split_counters
from mixq.kernels.wna16_dequant import dequant_chunk

LIB = "w4a16_mma"
PARTS = 4  # the .cu builds as 4 translation units in parallel, one (dtype, zero point) combo each
# launch shapes of the .cu's by_shape: id -> (warps along N, warps along K, k16 slices per
# warp and stage, pipeline stages); a tile is 64 * WN columns by 16 * WK * KS of K
SHAPES = {0: (2, 4, 1, 4), 1: (4, 2, 2, 4), 2: (1, 4, 1, 4), 3: (2, 2, 2, 4), 4: (4, 1, 4, 4), 5: (2, 4, 2, 3)}
DEQUANT_MIN_M = 512  # from here: dequantize + cuBLAS (bench/w4a16-notes.md)
# the few-row GEMV (the .cu's w4a16_gemv_kernel): variant id -> (warps per CTA, slices of
# weight loads each warp keeps in flight); up to GEMV_MAX_M rows
GEMV_VARIANTS = {0: (4, 8), 1: (4, 4), 2: (8, 4)}
GEMV_MAX_M = 16
GEMV_X_BYTES = 48 * 1024  # a CTA's activations [M, its K range] in shared memory, at most
# the GEMV takes weights up to this many packed bytes (H100: it wins on 4-8 MB weights,
# stream-K shape 1/5 from 12 MB: bench/w4a16-notes.md)
GEMV_MAX_BYTES = 10 * 2**20
DEQUANT_CHUNK_BYTES = 32 * 2**20  # dequantized column chunk: fits in L2 with the activations


def tile_dims(shape: int) -> tuple[int, int, int]:
    """(columns BN, K per stage BK, threads) of a launch shape."""
    wn, wk, ks, _ = SHAPES[shape]
    return 64 * wn, 16 * wk * ks, 32 * wn * wk


@dataclass
class W4A16MMAWeight:
    """A weight in the mma layout (see the module docstring)."""

    qw: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    perm: torch.Tensor | None
    group_size: int
    n: int
    k: int

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qw, self.scales, self.zeros, self.perm) if t is not None)


def layout_problem(n: int, k: int, group: int) -> str | None:
    """Why (N, K, group) does not fit the kernel, or None: N a multiple of 64 (a warp's
    columns), K of 64 (a stage), the group a multiple of 16 that divides K and either
    divides a 64-deep stage or is a multiple of it (each k16 slice in one group)."""
    if n % 64:
        return f"N={n} is not a multiple of 64"
    if k % 64:
        return f"K={k} is not a multiple of 64"
    if group % 16 or k % group or (group % 64 and 64 % group):
        return f"group size {group} (K={k}) must be a multiple of 16 dividing K and 64 or a multiple of 64"
    return None


def _permute_cols(t: torch.Tensor) -> torch.Tensor:
    """[R, N] -> each 64-column block reordered [g][jt] (column 8 jt + g at g * 8 + jt)."""
    r, n = t.shape
    return t.reshape(r, n // 64, 8, 8).transpose(2, 3).reshape(r, n)


def _unpermute_cols(t: torch.Tensor) -> torch.Tensor:
    r, n = t.shape
    return t.reshape(r, n // 64, 8, 8).transpose(2, 3).reshape(r, n)  # the swap is its own inverse


# nibble shift of (j, b, h): n8 tile j of the word, k + 8 b, k + h  ->  bit 4 (2 j + b) + 16 h
_SHIFTS = torch.tensor([[[4 * (2 * j + b) + 16 * h for h in range(2)] for b in range(2)] for j in range(2)])


def pack_w4a16(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int,
               dtype: torch.dtype, perm: torch.Tensor | None = None) -> W4A16MMAWeight:
    """Canonical -> mma layout. q [N, K] ints in [0, 16) in kernel column order (act-order:
    already permuted, column j is activation column perm[j]); scales [N, K/group] float
    (cast to `dtype`, the activation dtype); zeros None or ints [N, K/group] in [0, 16)."""
    n, k = q.shape
    why = layout_problem(n, k, group_size)
    if why:
        raise ValueError(f"pack_w4a16: {why}")
    g = k // group_size
    if tuple(scales.shape) != (n, g) or (zeros is not None and tuple(zeros.shape) != (n, g)):
        raise ValueError(f"pack_w4a16: scales/zeros must be [{n}, {g}], got {tuple(scales.shape)}"
                         f"{'' if zeros is None else ' / ' + str(tuple(zeros.shape))}")
    if int(q.min()) < 0 or int(q.max()) > 15 or (zeros is not None and (int(zeros.min()) < 0 or int(zeros.max()) > 15)):
        raise ValueError("pack_w4a16: values and zeros must be 4-bit unsigned")
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"pack_w4a16: activation dtype {dtype} is not bf16/fp16")
    # n = 64 nb + 16 w + 8 j + g ; k = 16 kb + 8 b + 2 t + h
    v = q.to(torch.int64).reshape(n // 64, 4, 2, 8, k // 16, 2, 4, 2)  # nb w j g kb b t h
    v = v.permute(4, 0, 3, 6, 1, 2, 5, 7)  # kb nb g t w | j b h
    words = (v << _SHIFTS.to(v.device)).sum(dim=(-3, -2, -1))  # [kb, nb, g, t, w]
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    qw = words.reshape(k // 16, 2 * n).contiguous()
    return W4A16MMAWeight(
        qw=qw,
        scales=_permute_cols(scales.t().to(dtype)).contiguous(),
        zeros=None if zeros is None else _permute_cols(zeros.t().to(torch.uint8)).contiguous(),
        perm=None if perm is None else perm.to(torch.int32).contiguous(),
        group_size=group_size, n=n, k=k)


def unpack_w4a16(w: W4A16MMAWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """mma layout -> canonical (q [N, K] int32, scales [N, G], zeros [N, G] int32 | None)."""
    n, k = w.n, w.k
    words = w.qw.to(torch.int64).reshape(k // 16, n // 64, 8, 4, 4) & 0xFFFFFFFF  # kb nb g t w
    v = (words[..., None, None, None] >> _SHIFTS.to(words.device)) & 0xF  # kb nb g t w j b h
    q = v.permute(1, 4, 5, 2, 0, 6, 3, 7).reshape(n, k).to(torch.int32)  # nb w j g kb b t h
    s = _unpermute_cols(w.scales).t()
    z = None if w.zeros is None else _unpermute_cols(w.zeros).t().to(torch.int32)
    return q, s, z


def w4a16_reference(x: torch.Tensor, w: W4A16MMAWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Float64 reference of `w4a16_gemm`, through `unpack_w4a16`."""
    q, s, z = unpack_w4a16(w)
    zero = torch.full_like(s, 8, dtype=torch.float64) if z is None else z.double()
    groups = torch.arange(w.k, device=q.device) // w.group_size
    wd = (q.double() - zero[:, groups]) * s.double()[:, groups]
    xd = x.double() if w.perm is None else x.double()[:, w.perm.long()]
    y = xd @ wd.t()
    return y if bias is None else y + bias.double()


@dataclass(frozen=True)
class MMALaunch:
    """One GEMM's launch. kind "gemv" (M <= 16): the register-streaming split-K kernel,
    N/64 x kcs CTAs of GEMV_VARIANTS[variant]. kind "mma": the tensor-core kernel with `mb`
    16-row blocks per tile, `mchunks` row chunks, launch `shape`, a stream-K grid of `grid`
    CTAs over mchunks * ntiles tiles of kiters stages. kind "dequant": `chunk` columns at a
    time dequantized then multiplied by cuBLAS."""

    kind: str
    mb: int = 1
    shape: int = 0
    grid: int = 1
    mchunks: int = 1
    ntiles: int = 1
    kiters: int = 1
    chunk: int = 0
    variant: int = 0  # gemv: GEMV_VARIANTS id, K split into kcs CTA ranges of spc k16 slices
    kcs: int = 1
    spc: int = 0


def default_shape(m: int, n: int) -> int:
    """The stream-K launch shape (H100 sweeps of issue 18, bench/w4a16-notes.md): at one row
    256 columns per 256-thread CTA, 2 K-warps (shape 1); up to 16 rows 128 columns, 8 warps,
    128-deep stages (shape 5); above, shape 3 (4 row blocks) on the widest weights, else 5."""
    if n % 128:
        return 2
    if m == 1 and n % 256 == 0:
        return 1
    if m > 16 and n >= 16384:
        return 3
    return 5


def gemv_split(m: int, n: int, k: int, sms: int, warps: int, ctas_per_sm: int = 4,
               kcs: int | None = None) -> tuple[int, int] | None:
    """(kcs, spc) of the few-row GEMV, or None if no split fits: K's k16 slices cut into kcs
    equal CTA ranges of spc slices (a multiple of 4 for the activation swizzle and of the
    warps, whose runs are equal), the activations [m, spc * 16] within GEMV_X_BYTES; the
    split whose CTA count is nearest `ctas_per_sm` per SM (fewer splits on a tie), or `kcs`."""
    slices, nblocks = k // 16, n // 64
    fits = [c for c in range(1, slices + 1) if slices % c == 0 and (slices // c) % 4 == 0
            and (slices // c) % warps == 0 and m * (slices // c) * 32 <= GEMV_X_BYTES]
    if kcs is not None:
        return (kcs, slices // kcs) if kcs in fits else None
    if not fits:
        return None
    kc = min(fits, key=lambda c: (abs(nblocks * c - sms * ctas_per_sm), c))
    return kc, slices // kc


def stream_k_grid(total_iters: int, sms: int, blocks_per_sm: int, min_iters: int) -> int:
    """CTAs of the persistent grid: every resident slot of the GPU, but no CTA with fewer
    than `min_iters` stages (a tile's partial costs a write and a read of its fp32 tile;
    with few stages per CTA those outweigh the weight bytes)."""
    return max(1, min(total_iters, sms * max(1, blocks_per_sm), total_iters // max(1, min_iters)))


def choose_launch(m: int, n: int, k: int, group: int, sms: int, blocks_per_sm: Callable[[int, int], int],
                  shape: int | None = None, min_iters: int | None = None, dequant_min_m: int = DEQUANT_MIN_M,
                  itemsize: int = 2, gemv: bool | None = None, gemv_variant: int = 1,
                  kcs: int | None = None, mb: int | None = None) -> MMALaunch:
    """The launch heuristic (plain function; `blocks_per_sm(mb, shape)` is the occupancy):
    up to GEMV_MAX_M rows the GEMV on weights of at most GEMV_MAX_BYTES (`gemv` True/False
    forces it on/off; a stream-K `shape` turns it off), else the stream-K kernel (16-row
    blocks per tile: `mb`, default as many as M needs up to 4), up to the dequantize rule,
    then dequantize + cuBLAS."""
    chunk = dequant_chunk(m, n, k, itemsize)
    if m >= dequant_min_m or chunk:
        return MMALaunch("dequant", chunk=chunk or max(64, min(n, DEQUANT_CHUNK_BYTES // (k * itemsize)) // 64 * 64))
    if gemv is None:
        gemv = shape is None and n * k // 2 <= GEMV_MAX_BYTES
    if m <= GEMV_MAX_M and gemv:
        split = gemv_split(m, n, k, sms, GEMV_VARIANTS[gemv_variant][0], kcs=kcs)
        if split is not None:
            return MMALaunch("gemv", variant=gemv_variant, kcs=split[0], spc=split[1])
    if mb is None:
        mb = min(4, -(-m // 16))
    elif not 1 <= mb <= 4:
        raise ValueError(f"w4a16 launch: {mb} row blocks per tile (1-4)")
    mchunks = -(-m // (16 * mb))
    if shape is None:
        shape = default_shape(m, n)
    bn, bk, _ = tile_dims(shape)
    if n % bn or k % bk or (group % bk and bk % group):
        raise ValueError(f"w4a16 launch shape {shape} ({bn} x {bk}) does not tile N={n}, K={k}, group {group}")
    ntiles, kiters = n // bn, k // bk
    total = mchunks * ntiles * kiters
    if min_iters is None:
        min_iters = 2 if mb == 1 else 8
    grid = stream_k_grid(total, sms, blocks_per_sm(mb, shape), min_iters)
    return MMALaunch("mma", mb, shape, grid, mchunks, ntiles, kiters)


# bench sweeps set this (a function of (m, n, k, group) -> MMALaunch); None = the heuristic
CONFIG_OVERRIDE: Callable[[int, int, int, int], MMALaunch] | None = None


def capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def build(cap: tuple[int, int]) -> Path:
    """Build (or find cached) the kernel library for a compute capability."""
    return cuda_jit.build(LIB, cap, PARTS)


def _lib(device: torch.device) -> ctypes.CDLL:
    lib = cuda_jit.load(LIB, capability(device), PARTS)
    if not getattr(lib, "_mixq_typed", False):
        i, p = ctypes.c_int, ctypes.c_void_p
        lib.mixq_w4a16_occupancy.argtypes = [i, i, i, i]
        lib.mixq_w4a16_gemm.argtypes = [i, i, i, p, p, p, p, p, p, p, p, i, i, i, i, i, i, i, i, i, i, p]
        lib.mixq_w4a16_dequant.argtypes = [i, p, p, p, p, i, i, i, i, i, i, p]
        lib.mixq_w4a16_gemv.argtypes = [i, i, p, p, p, p, p, p, p, p, i, i, i, i, i, i, i, p]
        ll = ctypes.c_longlong
        lib.mixq_w4a16_moe_gemv.argtypes = [i, i, p, p, p, p, p, p, p, p, p, p, i, i, i, i, i, i, i, i, ll, ll, ll, p]
        lib._mixq_typed = True
    return lib


@functools.cache
def _sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.cache
def _occupancy(index: int, bf16: bool, mb: int, shape: int, zp: bool) -> int:
    with torch.cuda.device(index):
        r = _lib(torch.device("cuda", index)).mixq_w4a16_occupancy(int(bf16), mb, shape, int(zp))
    if r < 0:
        raise RuntimeError(f"w4a16 occupancy query failed (CUDA error {-r}) for mb={mb} shape={shape}")
    return r


def _check(rc: int, what: str) -> None:
    if rc != 0:
        raise RuntimeError(f"w4a16 {what} launch failed: code {rc} (negative: a CUDA error number)")


def w4a16_gemm(x: torch.Tensor, w: W4A16MMAWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] bf16/fp16 on CUDA (the dtype of w.scales) -> [M, N] in x's dtype."""
    if x.dim() != 2 or x.shape[1] != w.k:
        raise ValueError(f"w4a16_gemm: x must be [M, {w.k}], got {list(x.shape)}")
    if x.dtype != w.scales.dtype:
        raise ValueError(f"w4a16_gemm: x dtype {x.dtype} differs from the weight's prepared dtype {w.scales.dtype}")
    if x.device.type != "cuda" or w.qw.device != x.device:
        raise ValueError(f"w4a16_gemm: x on {x.device} and the weight on {w.qw.device}: both must be on one CUDA device")
    if bias is not None and (bias.shape != (w.n,) or bias.dtype != x.dtype):
        bias = bias.reshape(w.n).to(x.dtype)
    x = x.contiguous()
    if x.data_ptr() % 16:  # 16-byte async copies
        x = x.clone()
    return torch.ops.mixq.w4a16_mma(x, w.qw, w.scales, w.zeros, w.perm, bias, w.n, w.group_size)


@torch.library.custom_op("mixq::w4a16_mma", mutates_args=())
def _w4a16_op(x: torch.Tensor, qw: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
              perm: torch.Tensor | None, bias: torch.Tensor | None, n: int, group_size: int) -> torch.Tensor:
    m, k = x.shape
    dev = x.device
    if perm is not None:
        x = x.index_select(1, perm)
    bf16 = x.dtype == torch.bfloat16
    zp = zeros is not None
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    launch = (CONFIG_OVERRIDE or (lambda m_, n_, k_, g_: choose_launch(
        m_, n_, k_, g_, _sms(index), lambda mb, s: _occupancy(index, bf16, mb, s, zp))))(m, n, k, group_size)
    out = torch.empty((m, n), device=dev, dtype=x.dtype)
    if m == 0:
        return out
    with torch.cuda.device(index):
        lib = _lib(dev)
        stream = ctypes.c_void_p(torch.cuda.current_stream(dev).cuda_stream)
        zptr = zeros.data_ptr() if zp else None
        if launch.kind == "dequant":
            chunk = launch.chunk
            buf = torch.empty((k, chunk), device=dev, dtype=x.dtype)
            for c0 in range(0, n, chunk):
                cn = min(chunk, n - c0)
                _check(lib.mixq_w4a16_dequant(int(bf16), qw.data_ptr(), scales.data_ptr(), zptr, buf.data_ptr(), n, k,
                                              group_size, c0 // 64, cn // 64, chunk, stream), "dequant")
                # cuBLAS writes the column block in place (ldc = N)
                torch.mm(x, buf[:, :cn], out=out if cn == n else out[:, c0:c0 + cn])
            if bias is not None:
                out += bias
            return out
        if launch.kind == "gemv":
            nblocks = n // 64
            ws = torch.empty((nblocks * launch.kcs * m * 64 if launch.kcs > 1 else 1,), device=dev, dtype=torch.float32)
            counters = split_counters(dev, nblocks)
            _check(lib.mixq_w4a16_gemv(int(bf16), launch.variant, x.data_ptr(), qw.data_ptr(), scales.data_ptr(), zptr,
                                       bias.data_ptr() if bias is not None else None, out.data_ptr(), ws.data_ptr(),
                                       counters.data_ptr(), m, n, k, group_size, launch.kcs, launch.spc, 0, stream),
                   "gemv")
            return out
        bn = tile_dims(launch.shape)[0]
        tiles = launch.mchunks * launch.ntiles
        ws_rows = min(m, 16 * launch.mb)
        ws = torch.empty(((tiles + launch.grid) * ws_rows * bn,), device=dev, dtype=torch.float32)
        counters = split_counters(dev, tiles)
        _check(lib.mixq_w4a16_gemm(int(bf16), launch.mb, launch.shape, x.data_ptr(), qw.data_ptr(), scales.data_ptr(),
                                   zptr, bias.data_ptr() if bias is not None else None, out.data_ptr(), ws.data_ptr(),
                                   counters.data_ptr(), m, n, k, group_size, launch.mchunks, launch.ntiles,
                                   launch.kiters, launch.grid, ws_rows, int(launch.mchunks == 1), stream), "gemm")
    return out


@_w4a16_op.register_fake
def _(x, qw, scales, zeros, perm, bias, n, group_size):
    return x.new_empty((x.shape[0], n))
