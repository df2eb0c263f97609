"""GGUF q8_0 weights on the CPU, read as stored: a small C GEMV over llama.cpp's blocks.

A q8_0 block is 34 bytes: an fp16 scale d, then 32 int8 values; w = d * q. The default
model's embedding table is q8_0 and, tied, its LM head (49152 x 576, the largest GEMV of a
decode step); the torch reference dequantizes all of it in every forward. This kernel reads
the blocks in place (no repacked copy, so the table the embedding looks rows up in is the
head's weight too, held once):

- `q8_0_gemm` (few rows, decode): y[m, n] = sum over blocks b of d[n, b] * (x[m, b] . q[n, b]);
  per block one product vector (bf16 pairs through AVX512-BF16's vdpbf16ps where the CPU
  has it: int8 values are exact in bf16; else fp32 FMAs), scaled by d and summed in fp32;
  threads over N (OpenMP).
- many rows (prefill): ~4 MiB tiles dequantized by torch (`dequantize_blocks`, exact) for
  torch's GEMM, so no dense copy of the whole weight exists.

Built with mixq.kernels.cpu_fp8.build_library (the system C compiler, once per machine).
"""

from __future__ import annotations

import ctypes
import logging

import torch

from mixq.formats.gguf_quants import dequantize_blocks
from mixq.kernels.cpu_fp8 import C_PRELUDE, build_library

log = logging.getLogger("mixq.kernels")

_SOURCE = C_PRELUDE + r"""
typedef int8_t v16c __attribute__((vector_size(16)));

static inline float f16_to_f32(const uint8_t *p) {  /* IEEE half, little endian; exact */
#if defined(__F16C__)
    uint16_t h16;  /* one vcvtph2ps: the branchy decode below took ~40% of the head's time */
    memcpy(&h16, p, 2);
    return _cvtsh_ss(h16);
#else
    const uint32_t h = (uint32_t)p[0] | ((uint32_t)p[1] << 8);
    const uint32_t sign = (h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    float f;
    if (e == 0) {  /* zero and subnormals: man * 2**-24 */
        f = (float)man * (1.0f / 16777216.0f);
        return sign ? -f : f;
    }
    const uint32_t bits = sign | (e == 31 ? (0xffu << 23) : ((e + 112u) << 23)) | (man << 13);
    memcpy(&f, &bits, 4);
    return f;
#endif
}

static inline v16f i8x16(const uint8_t *p) {  /* 16 int8 -> 16 fp32 (exact) */
#if defined(__AVX512F__)
    return (v16f)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
#else
    v16c c;
    memcpy(&c, p, 16);
    return __builtin_convertvector(c, v16f);
#endif
}

/* R rows of fp32 x against one row of blocks: acc[r] = sum_b d_b * (x[r] . q_b) */
static inline __attribute__((always_inline)) void rows_f32(const int R, const float *x, int64_t K,
        const uint8_t *wr, float *acc) {
    v16f a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, x0, x1;
    for (int64_t k = 0; k < K; k += 32) {
        const uint8_t *blk = wr + (k / 32) * 34;
        const float d = f16_to_f32(blk);
        const v16f w0 = i8x16(blk + 2), w1 = i8x16(blk + 18);
        memcpy(&x0, x + k, 64); memcpy(&x1, x + k + 16, 64); a0 += (x0 * w0 + x1 * w1) * d;
        if (R > 1) { memcpy(&x0, x + K + k, 64); memcpy(&x1, x + K + k + 16, 64); a1 += (x0 * w0 + x1 * w1) * d; }
        if (R > 2) { memcpy(&x0, x + 2 * K + k, 64); memcpy(&x1, x + 2 * K + k + 16, 64); a2 += (x0 * w0 + x1 * w1) * d; }
        if (R > 3) { memcpy(&x0, x + 3 * K + k, 64); memcpy(&x1, x + 3 * K + k + 16, 64); a3 += (x0 * w0 + x1 * w1) * d; }
    }
    for (int i = 0; i < 16; i++) {
        acc[0] += a0[i];
        if (R > 1) acc[1] += a1[i];
        if (R > 2) acc[2] += a2[i];
        if (R > 3) acc[3] += a3[i];
    }
}

#if defined(__AVX512BF16__)
static inline __m512bh i8x32_bf16(const uint8_t *p) {  /* 32 int8 -> 32 bf16 (exact: |q| <= 128) */
    const __m256i b = _mm256_loadu_si256((const __m256i *)p);
    const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(b)));
    const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(b, 1)));
    return _mm512_cvtne2ps_pbh(hi, lo);  /* low half from lo: values in order */
}

/* as rows_f32 for bf16 x: each block's 32 products in bf16 pairs (vdpbf16ps), times d */
static inline __attribute__((always_inline)) void rows_bf16(const int R, const uint16_t *x, int64_t K,
        const uint8_t *wr, float *acc) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    const __m512 z = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 32) {
        const uint8_t *blk = wr + (k / 32) * 34;
        const __m512 d = _mm512_set1_ps(f16_to_f32(blk));
        const __m512bh wb = i8x32_bf16(blk + 2);
        a0 = _mm512_fmadd_ps(_mm512_dpbf16_ps(z, (__m512bh)_mm512_loadu_si512(x + k), wb), d, a0);
        if (R > 1) a1 = _mm512_fmadd_ps(_mm512_dpbf16_ps(z, (__m512bh)_mm512_loadu_si512(x + K + k), wb), d, a1);
        if (R > 2) a2 = _mm512_fmadd_ps(_mm512_dpbf16_ps(z, (__m512bh)_mm512_loadu_si512(x + 2 * K + k), wb), d, a2);
        if (R > 3) a3 = _mm512_fmadd_ps(_mm512_dpbf16_ps(z, (__m512bh)_mm512_loadu_si512(x + 3 * K + k), wb), d, a3);
    }
    acc[0] += _mm512_reduce_add_ps(a0);
    if (R > 1) acc[1] += _mm512_reduce_add_ps(a1);
    if (R > 2) acc[2] += _mm512_reduce_add_ps(a2);
    if (R > 3) acc[3] += _mm512_reduce_add_ps(a3);
}
#endif

/* out[m, n] = sum over K/32 blocks of row n: d * (x[m] . q). x: fp32, or bf16 when x_bf16;
   blocks: uint8 [N, K/32, 34]; out: fp32, or bf16 when out_bf16. K % 32 == 0. */
void q8_0_gemm(const void *x, int x_bf16, int64_t M, int64_t K, const uint8_t *blocks, int64_t N, void *out,
               int out_bf16, int nthreads) {
    float *xf = widen_bf16_x(&x, &x_bf16, M * K);
    const int64_t row_bytes = (K / 32) * 34;
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *wr = blocks + n * row_bytes;
        for (int64_t m0 = 0; m0 < M; m0 += 4) {
            const int R = M - m0 < 4 ? (int)(M - m0) : 4;
            float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            if (!x_bf16) {
                const float *xm = (const float *)x + m0 * K;
                ROWS_BY_R(R, rows_f32, xm, K, wr, acc)
            }
#if defined(__AVX512BF16__)
            else {
                const uint16_t *xm = (const uint16_t *)x + m0 * K;
                ROWS_BY_R(R, rows_bf16, xm, K, wr, acc)
            }
#endif
            for (int r = 0; r < R; r++) {
                if (out_bf16) ((uint16_t *)out)[(m0 + r) * N + n] = f32_to_bf16(acc[r]);
                else ((float *)out)[(m0 + r) * N + n] = acc[r];
            }
        }
    }
    free(xf);
}
"""
_lib: ctypes.CDLL | None = None
_error: str | None = None
TILE_MIN_ROWS = 16  # from here a forward dequantizes tiles for torch's GEMM
TILE_BYTES = 4 << 20


def available() -> tuple[bool, str]:
    """Whether the q8_0 kernel is built (building it on first call); else why not."""
    global _lib, _error
    if _lib is None and _error is None:
        try:
            dll = build_library("mixq_q8_0", _SOURCE)
            i64, ptr, c_int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
            dll.q8_0_gemm.argtypes = [ptr, c_int, i64, i64, ptr, i64, ptr, c_int, c_int]
            _lib = dll
        except (RuntimeError, OSError) as e:
            _error = str(e)
            log.warning("GGUF q8_0 weights on the CPU use the torch reference: %s", _error)
    return _lib is not None, _error or ""


def q8_0_linear(x: torch.Tensor, blocks: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x [M, K] float (fp32/bf16/fp16) @ W^T -> [M, N] in out_dtype (default x's), on the CPU,
    W the q8_0 blocks: uint8 [N, K/32, 34] contiguous (llama.cpp's layout, as stored).
    Fewer than TILE_MIN_ROWS rows run the GEMV kernel (fp32 sums; bf16 x in bf16 pairs
    where the CPU has AVX512-BF16); more dequantize ~4 MiB tiles for torch's GEMM."""
    ok, why = available()
    if not ok:
        raise RuntimeError(why)
    if (blocks.dtype != torch.uint8 or blocks.dim() != 3 or blocks.shape[2] != 34 or not blocks.is_contiguous()
            or blocks.device.type != "cpu"):
        raise ValueError(f"cpu q8_0: blocks must be contiguous CPU uint8 [N, K/32, 34], got {blocks.dtype} "
                         f"{list(blocks.shape)}")
    n, k = blocks.shape[0], blocks.shape[1] * 32
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"cpu q8_0: x must be [M, {k}], got {list(x.shape)}")
    out_dtype = out_dtype or x.dtype
    m = x.shape[0]
    dt = torch.bfloat16 if out_dtype == torch.bfloat16 else torch.float32
    if m < TILE_MIN_ROWS:
        xc = (x if x.dtype in (torch.float32, torch.bfloat16) else x.float()).contiguous()
        out = torch.empty(m, n, dtype=dt)
        _lib.q8_0_gemm(xc.data_ptr(), int(xc.dtype == torch.bfloat16), m, k, blocks.data_ptr(), n, out.data_ptr(),
                       int(dt == torch.bfloat16), torch.get_num_threads())
        return out if dt == out_dtype else out.to(out_dtype)
    xc = x.to(dt)
    out = torch.empty(m, n, dtype=dt)
    rows = max(1, TILE_BYTES // (k * 4))
    for n0 in range(0, n, rows):
        out[:, n0:n0 + rows] = xc @ dequantize_blocks(blocks[n0:n0 + rows], "q8_0").to(dt).t()
    return out if dt == out_dtype else out.to(out_dtype)
