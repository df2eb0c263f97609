"""FP8 E4M3 weights on the CPU, kept FP8 in memory: a small C kernel that upcasts in registers.

Measured on a Xeon (Sapphire Rapids, torch 2.13, one thread; bench/cpu.py has the run): torch's
fp8 -> bf16/fp32 `.to()` is a scalar loop of ~14 ns per element, so the torch-only options
(upcast the weight every forward, `torch._scaled_mm` on the CPU) take 12-17 ms for a
1536 x 576 layer that dense BF16 multiplies in 0.1 ms. This kernel decodes e4m3 with
integer ops on 16 lanes at a time (no table, no gather):

    e4m3 byte b: magnitude m = b & 0x7f; m >= 8 (normal): fp32 bits (m << 20) + (120 << 23);
    m < 8 (subnormal): m * 2**-9; sign bit b & 0x80 -> bit 31. Exact for every finite e4m3.

- `fp8_gemm` (few rows, decode): y[m, n] = sum over K blocks of (sum_k x[m, k] w[n, k]) *
  scale[n // bn, k // bk]; fp32 products and sums, threads over N (OpenMP).
- `fp8_dequant` (many rows, prefill): rows [n0, n1) of w * scale as fp32 or bf16, so a tile
  loop hands them to torch's GEMM (oneDNN/MKL) and the dense copy never exceeds one tile.

Built once per machine with the system C compiler (`cc`, -O3 -march=native -fopenmp; a
few seconds) into $MIXQ_CACHE/cpu-kernels, keyed by the source, flags and CPU; loaded with
ctypes. Where no compiler is found, `available()` says why and the FP8 CPU method refuses
(the torch reference computes instead).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger("mixq.kernels")

_SOURCE = r"""
#include <stdint.h>
#include <string.h>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

typedef float v16f __attribute__((vector_size(64)));
typedef uint32_t v16u __attribute__((vector_size(64)));
typedef uint8_t v16b __attribute__((vector_size(16)));

static inline v16u widen16(const uint8_t *p) {  /* 16 bytes -> 16 x uint32 (vpmovzxbd) */
#if defined(__AVX512F__)
    return (v16u)_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
#elif defined(__AVX2__)
    const __m128i b = _mm_loadu_si128((const __m128i *)p);
    v16u u;
    const __m256i lo = _mm256_cvtepu8_epi32(b), hi = _mm256_cvtepu8_epi32(_mm_srli_si128(b, 8));
    memcpy(&u, &lo, 32);
    memcpy((char *)&u + 32, &hi, 32);
    return u;
#else  /* portable: GCC 12 builds this lane by lane, ~10x slower than the instruction */
    v16b b;
    memcpy(&b, p, 16);
    return __builtin_convertvector(b, v16u);
#endif
}

static inline v16f e4m3x16(const uint8_t *p) {
    const v16u u = widen16(p);
    v16u mag = u & 0x7f;
    v16u normal = (mag << 20) + (120u << 23);
    v16f sub = __builtin_convertvector(mag, v16f) * (1.0f / 512.0f);
    v16u is_normal = (v16u)(mag >= 8);
    v16u bits = (normal & is_normal) | ((v16u)sub & ~is_normal);
    return (v16f)(bits | ((u & 0x80) << 24));
}

static inline float e4m3(uint8_t b) {
    uint32_t mag = b & 0x7f, bits;
    float f;
    if (mag >= 8) { bits = (mag << 20) + (120u << 23); memcpy(&f, &bits, 4); }
    else f = (float)mag * (1.0f / 512.0f);
    return (b & 0x80) ? -f : f;
}

static inline float hsum(v16f v) {
    float s = 0.0f;
    for (int i = 0; i < 16; i++) s += v[i];
    return s;
}

/* R rows of x (R <= 4, a constant at every call) against row n of w:
   out[r * N] = sum over K blocks of (x[r] . w[n] over the block) * scale */
static inline __attribute__((always_inline)) void rows(const int R, const float *x, int64_t K,
        const uint8_t *wr, const float *sr, int64_t bk, float *out, int64_t N) {
    float t0 = 0.0f, t1 = 0.0f, t2 = 0.0f, t3 = 0.0f;
    for (int64_t k0 = 0; k0 < K; k0 += bk) {
        const int64_t k1 = k0 + bk < K ? k0 + bk : K;
        v16f a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, xv;
        int64_t k = k0;
        for (; k + 16 <= k1; k += 16) {
            const v16f wf = e4m3x16(wr + k);
            memcpy(&xv, x + k, 64); a0 += xv * wf;
            if (R > 1) { memcpy(&xv, x + K + k, 64); a1 += xv * wf; }
            if (R > 2) { memcpy(&xv, x + 2 * K + k, 64); a2 += xv * wf; }
            if (R > 3) { memcpy(&xv, x + 3 * K + k, 64); a3 += xv * wf; }
        }
        float s0 = hsum(a0), s1 = hsum(a1), s2 = hsum(a2), s3 = hsum(a3);
        for (; k < k1; k++) {
            const float wf = e4m3(wr[k]);
            s0 += x[k] * wf;
            if (R > 1) s1 += x[K + k] * wf;
            if (R > 2) s2 += x[2 * K + k] * wf;
            if (R > 3) s3 += x[3 * K + k] * wf;
        }
        const float s = sr[k0 / bk];
        t0 += s0 * s; t1 += s1 * s; t2 += s2 * s; t3 += s3 * s;
    }
    out[0] = t0;
    if (R > 1) out[N] = t1;
    if (R > 2) out[2 * N] = t2;
    if (R > 3) out[3 * N] = t3;
}

void fp8_gemm(const float *x, int64_t M, int64_t K, const uint8_t *w, int64_t N, const float *scale,
              int64_t bn, int64_t bk, int64_t sk, float *out, int nthreads) {
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *wr = w + n * K;
        const float *sr = scale + (n / bn) * sk;
        for (int64_t m0 = 0; m0 < M; m0 += 4) {
            const float *xm = x + m0 * K;
            float *om = out + m0 * N + n;
            switch (M - m0 < 4 ? M - m0 : 4) {  /* constant R: each case is specialised */
                case 1: rows(1, xm, K, wr, sr, bk, om, N); break;
                case 2: rows(2, xm, K, wr, sr, bk, om, N); break;
                case 3: rows(3, xm, K, wr, sr, bk, om, N); break;
                default: rows(4, xm, K, wr, sr, bk, om, N); break;
            }
        }
    }
}

static inline void store(v16f v, void *out, int64_t k, int bf16) {
    if (bf16) {  /* round to nearest even */
        v16u b = (v16u)v;
        b = (b + 0x7fffu + ((b >> 16) & 1u)) >> 16;
        for (int i = 0; i < 16; i++) ((uint16_t *)out)[k + i] = (uint16_t)b[i];
    } else {
        memcpy((float *)out + k, &v, 64);
    }
}

void fp8_dequant(const uint8_t *w, int64_t n0, int64_t n1, int64_t K, const float *scale, int64_t bn,
                 int64_t bk, int64_t sk, void *out, int bf16, int nthreads) {
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *wr = w + n * K;
        const float *sr = scale + (n / bn) * sk;
        void *row = bf16 ? (void *)((uint16_t *)out + (n - n0) * K) : (void *)((float *)out + (n - n0) * K);
        for (int64_t k0 = 0; k0 < K; k0 += bk) {
            const int64_t k1 = k0 + bk < K ? k0 + bk : K;
            const float s = sr[k0 / bk];
            int64_t k = k0;
            for (; k + 16 <= k1; k += 16) store(e4m3x16(wr + k) * s, row, k, bf16);
            for (; k < k1; k++) {
                v16f v = {0};
                v[0] = e4m3(wr[k]) * s;
                if (bf16) {
                    uint32_t b = ((v16u)v)[0];
                    ((uint16_t *)row)[k] = (uint16_t)((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
                } else {
                    ((float *)row)[k] = v[0];
                }
            }
        }
    }
}
"""
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=gnu11"]
_lib: ctypes.CDLL | None = None
_error: str | None = None
# rows from which a forward dequantizes tiles for torch's GEMM instead of the GEMV kernel
TILE_MIN_ROWS = 16
TILE_BYTES = 4 << 20  # one dequantized tile: ~4 MiB (stays in L2/L3 while the GEMM reads it)


def _cache_dir() -> Path:
    return Path(os.environ.get("MIXQ_CACHE") or Path.home() / ".cache" / "mixq") / "cpu-kernels"


def _cpu_id() -> str:
    """What -march=native depends on: the CPU's flags (Linux) or its name elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _build() -> ctypes.CDLL:
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler found (cc / gcc / $CC) to build the CPU FP8 kernel")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    key = hashlib.sha256("\n".join([_SOURCE, " ".join(_FLAGS), *version, _cpu_id()]).encode()).hexdigest()[:16]
    lib = _cache_dir() / f"mixq_fp8_{key}.so"
    if not lib.is_file():
        lib.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
            src, out = Path(tmp) / "fp8.c", Path(tmp) / "fp8.so"
            src.write_text(_SOURCE)
            r = subprocess.run([cc, *_FLAGS, str(src), "-o", str(out)], capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"building the CPU FP8 kernel with {cc} failed: {r.stderr.strip()[-500:]}")
            os.replace(out, lib)  # atomic: concurrent builders each write their own temp file
    dll = ctypes.CDLL(str(lib))
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    dll.fp8_gemm.argtypes = [ptr, i64, i64, ptr, i64, ptr, i64, i64, i64, ptr, ctypes.c_int]
    dll.fp8_dequant.argtypes = [ptr, i64, i64, i64, ptr, i64, i64, i64, ptr, ctypes.c_int, ctypes.c_int]
    return dll


def available() -> tuple[bool, str]:
    """Whether the kernel is built (building it on first call); else why not."""
    global _lib, _error
    if _lib is None and _error is None:
        try:
            _lib = _build()
        except (RuntimeError, OSError) as e:
            _error = str(e)
            log.warning("FP8 weights on the CPU use the torch reference: %s", _error)
    return _lib is not None, _error or ""


def _check(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, bn: int, bk: int) -> None:
    if w.dtype != torch.float8_e4m3fn or w.dim() != 2 or not w.is_contiguous() or w.device.type != "cpu":
        raise ValueError(f"cpu fp8: w must be a contiguous CPU float8_e4m3fn [N, K], got {w.dtype} {list(w.shape)}")
    n, k = w.shape
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"cpu fp8: x must be [M, {k}], got {list(x.shape)}")
    grid = (-(-n // bn), -(-k // bk))
    if scale.dtype != torch.float32 or tuple(scale.shape) != grid or not scale.is_contiguous():
        raise ValueError(f"cpu fp8: scale must be contiguous float32 {list(grid)} for blocks {bn}x{bk}, "
                         f"got {scale.dtype} {list(scale.shape)}")


@torch.library.custom_op("mixq::cpu_fp8_linear", mutates_args=())
def _fp8_linear_op(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, bn: int, bk: int) -> torch.Tensor:
    m, k = x.shape
    n = w.shape[0]
    threads = torch.get_num_threads()
    wp = w.view(torch.uint8)
    if m < TILE_MIN_ROWS:
        xf = x.float().contiguous()
        out = torch.empty(m, n, dtype=torch.float32)
        _lib.fp8_gemm(xf.data_ptr(), m, k, wp.data_ptr(), n, scale.data_ptr(), bn, bk, scale.shape[1],
                      out.data_ptr(), threads)
        return out.to(x.dtype)
    dt = torch.bfloat16 if x.dtype == torch.bfloat16 else torch.float32
    xc = x.to(dt).contiguous()
    out = torch.empty(m, n, dtype=dt)
    rows = max(1, TILE_BYTES // (k * dt.itemsize))
    tile = torch.empty(min(rows, n), k, dtype=dt)
    for n0 in range(0, n, rows):
        n1 = min(n, n0 + rows)
        t = tile[: n1 - n0]
        _lib.fp8_dequant(wp.data_ptr(), n0, n1, k, scale.data_ptr(), bn, bk, scale.shape[1], t.data_ptr(),
                         int(dt == torch.bfloat16), threads)
        out[:, n0:n1] = xc @ t.t()
    return out.to(x.dtype)


@_fp8_linear_op.register_fake
def _(x, w, scale, bn, bk):
    return x.new_empty((x.shape[0], w.shape[0]))


def fp8_linear(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """x [M, K] float (fp32/bf16/fp16) @ (w * scale)^T -> [M, N] in x's dtype, on the CPU.

    w: float8_e4m3fn [N, K] contiguous; scale: float32 [ceil(N/bn), ceil(K/bk)] for `block`
    = (bn, bk): (1, K) per channel, (bn, bk) block-scaled, (1, G) group. Fewer than
    TILE_MIN_ROWS rows run the GEMV kernel (fp32 sums); more dequantize ~4 MiB tiles of w
    (bf16 when x is bf16, else fp32) for torch's GEMM."""
    ok, why = available()
    if not ok:
        raise RuntimeError(why)
    bn, bk = block
    _check(x, w, scale, bn, bk)
    return torch.ops.mixq.cpu_fp8_linear(x, w, scale, bn, bk)
