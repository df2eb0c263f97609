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

# What every CPU kernel source here starts with (cpu_gguf.py's too): headers, the 16-lane fp32
# vector type, and exact bf16 <-> fp32 conversion (round to nearest even).
C_PRELUDE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

typedef float v16f __attribute__((vector_size(64)));

static inline float bf16_to_f32(uint16_t h) {
    uint32_t b = (uint32_t)h << 16;
    float f;
    memcpy(&f, &b, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {  /* round to nearest even */
    uint32_t b;
    memcpy(&b, &f, 4);
    return (uint16_t)((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
}

/* Where the CPU has no AVX512-BF16 dot, n bf16 activations widened to fp32 once: *x points
   at the copy and *x_bf16 becomes 0; returns the copy for the caller to free (else NULL). */
static inline float *widen_bf16_x(const void **x, int *x_bf16, int64_t n) {
#if !defined(__AVX512BF16__)
    if (*x_bf16) {
        float *xf = (float *)malloc((size_t)n * sizeof(float));
        for (int64_t i = 0; i < n; i++) xf[i] = bf16_to_f32(((const uint16_t *)*x)[i]);
        *x = xf;
        *x_bf16 = 0;
        return xf;
    }
#endif
    return NULL;
}

/* fn(R, ...) with R (1..4 rows) a constant in each case, so each case is specialised */
#define ROWS_BY_R(R, fn, ...) switch (R) { \
    case 1: fn(1, __VA_ARGS__); break; case 2: fn(2, __VA_ARGS__); break; \
    case 3: fn(3, __VA_ARGS__); break; default: fn(4, __VA_ARGS__); break; }

"""

_SOURCE = C_PRELUDE + r"""
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

/* R rows of fp32 x (R <= 4, a constant at every call) against row n of w: acc[r] = sum over
   K blocks of (x[r] . w[n] over the block) * scale */
static inline __attribute__((always_inline)) void rows_f32(const int R, const float *x, int64_t K,
        const uint8_t *wr, const float *sr, int64_t bk, float *acc) {
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
        acc[0] += s0 * s;
        if (R > 1) acc[1] += s1 * s;
        if (R > 2) acc[2] += s2 * s;
        if (R > 3) acc[3] += s3 * s;
    }
}

#if defined(__AVX512BF16__)
/* 32 e4m3 bytes -> 32 bf16 (exact: e4m3 has 3 mantissa bits, bf16 7): normal magnitudes by
   shifting the bits into place and rebasing the exponent (+120), the 7 subnormal ones
   (m * 2**-9) from a table, the sign bit moved from bit 7 to bit 15 */
static inline __m512i e4m3x32_bf16(const uint8_t *p) {
    static const uint16_t sub_table[32] = {0, 0x3B00, 0x3B80, 0x3BC0, 0x3C00, 0x3C20, 0x3C40, 0x3C60};
    const __m512i u = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)p));
    const __m512i mag = _mm512_and_si512(u, _mm512_set1_epi16(0x7f));
    const __m512i normal = _mm512_add_epi16(_mm512_slli_epi16(mag, 4), _mm512_set1_epi16(120 << 7));
    const __m512i sub = _mm512_permutexvar_epi16(mag, _mm512_loadu_si512(sub_table));
    const __m512i v = _mm512_mask_blend_epi16(_mm512_cmplt_epu16_mask(mag, _mm512_set1_epi16(8)), normal, sub);
    /* v | (u << 8 & 0x8000) */
    return _mm512_ternarylogic_epi32(v, _mm512_slli_epi16(u, 8), _mm512_set1_epi16((short)0x8000), 0xF8);
}

/* as rows_f32 for bf16 x: pairs of products summed in fp32 by vdpbf16ps */
static inline __attribute__((always_inline)) void rows_bf16(const int R, const uint16_t *x, int64_t K,
        const uint8_t *wr, const float *sr, int64_t bk, float *acc) {
    for (int64_t k0 = 0; k0 < K; k0 += bk) {
        const int64_t k1 = k0 + bk < K ? k0 + bk : K;
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        int64_t k = k0;
        for (; k + 32 <= k1; k += 32) {
            const __m512bh wb = (__m512bh)e4m3x32_bf16(wr + k);
            a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(x + k), wb);
            if (R > 1) a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(x + K + k), wb);
            if (R > 2) a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_loadu_si512(x + 2 * K + k), wb);
            if (R > 3) a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_loadu_si512(x + 3 * K + k), wb);
        }
        float s0 = _mm512_reduce_add_ps(a0), s1 = _mm512_reduce_add_ps(a1);
        float s2 = _mm512_reduce_add_ps(a2), s3 = _mm512_reduce_add_ps(a3);
        for (; k < k1; k++) {
            const float wf = e4m3(wr[k]);
            s0 += bf16_to_f32(x[k]) * wf;
            if (R > 1) s1 += bf16_to_f32(x[K + k]) * wf;
            if (R > 2) s2 += bf16_to_f32(x[2 * K + k]) * wf;
            if (R > 3) s3 += bf16_to_f32(x[3 * K + k]) * wf;
        }
        const float s = sr[k0 / bk];
        acc[0] += s0 * s;
        if (R > 1) acc[1] += s1 * s;
        if (R > 2) acc[2] += s2 * s;
        if (R > 3) acc[3] += s3 * s;
    }
}
#endif

int fp8_has_bf16_dot(void) {
#if defined(__AVX512BF16__)
    return 1;
#else
    return 0;
#endif
}

/* out[m, n] = xscale[m] * sum over K blocks of (x[m] . w[n] over the block) * scale[n / bn, block]
   x: fp32, or bf16 when x_bf16 (multiplied in bf16 pairs where the CPU has AVX512-BF16, else
   widened to fp32 first); xscale: fp32 [M] or NULL; out: fp32, or bf16 when out_bf16 */
void fp8_gemm(const void *x, int x_bf16, int64_t M, int64_t K, const uint8_t *w, int64_t N, const float *scale,
              int64_t bn, int64_t bk, int64_t sk, const float *xscale, void *out, int out_bf16, int nthreads) {
    float *xf = widen_bf16_x(&x, &x_bf16, M * K);
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *wr = w + n * K;
        const float *sr = scale + (n / bn) * sk;
        for (int64_t m0 = 0; m0 < M; m0 += 4) {
            const int R = M - m0 < 4 ? (int)(M - m0) : 4;
            float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            if (!x_bf16) {
                const float *xm = (const float *)x + m0 * K;
                ROWS_BY_R(R, rows_f32, xm, K, wr, sr, bk, acc)
            }
#if defined(__AVX512BF16__)
            else {
                const uint16_t *xm = (const uint16_t *)x + m0 * K;
                ROWS_BY_R(R, rows_bf16, xm, K, wr, sr, bk, acc)
            }
#endif
            for (int r = 0; r < R; r++) {
                const float v = xscale ? acc[r] * xscale[m0 + r] : acc[r];
                if (out_bf16) ((uint16_t *)out)[(m0 + r) * N + n] = f32_to_bf16(v);
                else ((float *)out)[(m0 + r) * N + n] = v;
            }
        }
    }
    free(xf);
}

/* Per-token symmetric quantization, the rule of mixq.kernels.quant (fp32 arithmetic, IEEE
   division): s = static ? *static : max(amax(row), 1e-10) / qmax; y = clamp(x / s, +-qmax);
   INT8 (is_int8): round half away from zero; FP8: nearest-even e4m3 value. The codes (exact
   in bf16 and fp32) go to codes as fp32, or bf16 when codes_bf16; the scales to scales[M]. */
void quant_rows(const void *x, int x_bf16, int64_t M, int64_t K, float qmax, int is_int8,
                const float *static_scale, void *codes, int codes_bf16, float *scales, int nthreads) {
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t m = 0; m < M; m++) {
        float *row = (float *)malloc((size_t)K * sizeof(float));
        for (int64_t k = 0; k < K; k++)
            row[k] = x_bf16 ? bf16_to_f32(((const uint16_t *)x)[m * K + k]) : ((const float *)x)[m * K + k];
        float s;
        if (static_scale) {
            s = *static_scale;
        } else {
            float amax = 0.0f;
            for (int64_t k = 0; k < K; k++) {
                const float a = row[k] < 0 ? -row[k] : row[k];
                amax = a > amax ? a : amax;
            }
            s = (amax > 1e-10f ? amax : 1e-10f) / qmax;
        }
        scales[m] = s;
        for (int64_t k = 0; k < K; k++) {
            float y = row[k] / s;
            y = y > qmax ? qmax : (y < -qmax ? -qmax : y);
            float q;
            if (is_int8) {
                const float r = __builtin_floorf((y < 0 ? -y : y) + 0.5f);
                q = y < 0 ? -r : r;
            } else {
                const float a = y < 0 ? -y : y;
                if (a < 0.015625f) {  /* e4m3 subnormals: a fixed grid of 2**-9 */
                    q = (y + 24576.0f) - 24576.0f;  /* 1.5 * 2**14: fp32's ulp there is 2**-9 */
                } else {
                    uint32_t b;
                    memcpy(&b, &y, 4);
                    b = (b + 0x7FFFFu + ((b >> 20) & 1u)) & ~0xFFFFFu;  /* keep 3 mantissa bits, ties to even */
                    memcpy(&q, &b, 4);
                }
            }
            if (codes_bf16) {  /* at most 8 significant bits: the top half of the fp32 is exact */
                uint32_t b;
                memcpy(&b, &q, 4);
                ((uint16_t *)codes)[m * K + k] = (uint16_t)(b >> 16);
            } else {
                ((float *)codes)[m * K + k] = q;
            }
        }
        free(row);
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


def build_library(stem: str, source: str, extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL:
    """Compile C `source` once per machine into $MIXQ_CACHE/cpu-kernels/<stem>_<key>.so (key:
    the source, flags, compiler version and CPU) and load it. RuntimeError when no compiler
    is found or the build fails."""
    flags = [*_FLAGS, *extra_flags]
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        raise RuntimeError(f"no C compiler found (cc / gcc / $CC) to build the CPU kernel {stem}")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    key = hashlib.sha256("\n".join([source, " ".join(flags), *version, _cpu_id()]).encode()).hexdigest()[:16]
    lib = _cache_dir() / f"{stem}_{key}.so"
    if not lib.is_file():
        lib.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
            src, out = Path(tmp) / f"{stem}.c", Path(tmp) / f"{stem}.so"
            src.write_text(source)
            r = subprocess.run([cc, *flags, str(src), "-o", str(out)], capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"building the CPU kernel {stem} with {cc} failed: {r.stderr.strip()[-500:]}")
            os.replace(out, lib)  # atomic: concurrent builders each write their own temp file
    return ctypes.CDLL(str(lib))


def _build() -> ctypes.CDLL:
    dll = build_library("mixq_fp8", _SOURCE)
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    c_int = ctypes.c_int
    dll.fp8_gemm.argtypes = [ptr, c_int, i64, i64, ptr, i64, ptr, i64, i64, i64, ptr, ptr, c_int, c_int]
    dll.fp8_has_bf16_dot.restype = c_int
    dll.quant_rows.argtypes = [ptr, c_int, i64, i64, ctypes.c_float, c_int, ptr, ptr, c_int, ptr, c_int]
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


def _impl(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, bn: int, bk: int,
          x_scale: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    m, k = x.shape
    n = w.shape[0]
    threads = torch.get_num_threads()
    wp = w.view(torch.uint8)
    if m < TILE_MIN_ROWS:
        xc = x if x.dtype in (torch.float32, torch.bfloat16) else x.float()
        xc = xc.contiguous()
        out = torch.empty(m, n, dtype=torch.bfloat16 if out_dtype == torch.bfloat16 else torch.float32)
        _lib.fp8_gemm(xc.data_ptr(), int(xc.dtype == torch.bfloat16), m, k, wp.data_ptr(), n, scale.data_ptr(), bn,
                      bk, scale.shape[1], None if x_scale is None else x_scale.data_ptr(), out.data_ptr(),
                      int(out.dtype == torch.bfloat16), threads)
        return out if out.dtype == out_dtype else out.to(out_dtype)
    dt = torch.bfloat16 if out_dtype == torch.bfloat16 else torch.float32
    xc = x.float() * x_scale[:, None] if x_scale is not None else x
    xc = xc.to(dt).contiguous()
    out = torch.empty(m, n, dtype=dt)
    rows = max(1, TILE_BYTES // (k * dt.itemsize))
    tile = torch.empty(min(rows, n), k, dtype=dt)
    for n0 in range(0, n, rows):
        n1 = min(n, n0 + rows)
        t = tile[: n1 - n0]
        _lib.fp8_dequant(wp.data_ptr(), n0, n1, k, scale.data_ptr(), bn, bk, scale.shape[1], t.data_ptr(),
                         int(dt == torch.bfloat16), threads)
        out[:, n0:n1] = xc @ t.t()
    return out if out.dtype == out_dtype else out.to(out_dtype)


@torch.library.custom_op("mixq::cpu_fp8_linear", mutates_args=())
def _fp8_linear_op(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, bn: int, bk: int,
                   x_scale: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    return _impl(x, w, scale, bn, bk, x_scale, out_dtype)


@_fp8_linear_op.register_fake
def _(x, w, scale, bn, bk, x_scale, out_dtype):
    return x.new_empty((x.shape[0], w.shape[0]), dtype=out_dtype)


def has_bf16_dot() -> bool:
    """Whether the built kernel multiplies bf16 activations in bf16 pairs (AVX512-BF16):
    then bf16 inputs, FP8 codes included (exact in bf16), skip the widening to fp32."""
    return available()[0] and bool(_lib.fp8_has_bf16_dot())


def fp8_linear(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, block: tuple[int, int],
               x_scale: torch.Tensor | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x [M, K] float (fp32/bf16/fp16) @ (w * scale)^T, rows scaled by x_scale -> [M, N] in
    out_dtype (default x's), on the CPU.

    w: float8_e4m3fn [N, K] contiguous; scale: float32 [ceil(N/bn), ceil(K/bk)] for `block`
    = (bn, bk): (1, K) per channel, (bn, bk) block-scaled, (1, G) group; x_scale: float32
    [M] or None (per-token activation scales of FP8 codes passed as x). Fewer than
    TILE_MIN_ROWS rows run the GEMV kernel (fp32 sums; bf16 x in bf16 pairs where the CPU
    has AVX512-BF16); more dequantize ~4 MiB tiles of w (bf16 for a bf16 output, else fp32)
    for torch's GEMM."""
    ok, why = available()
    if not ok:
        raise RuntimeError(why)
    bn, bk = block
    _check(x, w, scale, bn, bk)
    m = x.shape[0]
    if x_scale is not None and (x_scale.dtype != torch.float32 or tuple(x_scale.shape) != (m,)
                                or not x_scale.is_contiguous()):
        raise ValueError(f"cpu fp8: x_scale must be contiguous float32 [{m}], got {x_scale.dtype} "
                         f"{list(x_scale.shape)}")
    out_dtype = out_dtype or x.dtype
    if torch.compiler.is_compiling():
        return torch.ops.mixq.cpu_fp8_linear(x, w, scale, bn, bk, x_scale, out_dtype)
    return _impl(x, w, scale, bn, bk, x_scale, out_dtype)  # eager: skip the op dispatch (~15 us a call)


def quant_rows(x: torch.Tensor, to_int8: bool, static_scale: torch.Tensor | None,
               codes_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token quantization in C (mixq.kernels.cpu_quant.token_codes is the contract):
    x [M, K] fp32/bf16 -> (codes [M, K] in codes_dtype (fp32 or bf16, exact), scales fp32 [M])."""
    m, k = x.shape
    xc = x.contiguous() if x.dtype in (torch.float32, torch.bfloat16) else x.float().contiguous()
    codes = torch.empty(m, k, dtype=codes_dtype)
    scales = torch.empty(m, dtype=torch.float32)
    st = None if static_scale is None else static_scale.float().contiguous()
    _lib.quant_rows(xc.data_ptr(), int(xc.dtype == torch.bfloat16), m, k, 127.0 if to_int8 else 448.0, int(to_int8),
                    None if st is None else st.data_ptr(), codes.data_ptr(), int(codes_dtype == torch.bfloat16),
                    scales.data_ptr(), torch.get_num_threads() if m > 1 else 1)
    return codes, scales
