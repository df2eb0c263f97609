"""The per-token ops of a decoder layer on the CPU, one C call each.

In eager torch an RMSNorm with its residual add is ~9 ops and neox rotary on q and k ~14; on
one CPU core each op costs a few microseconds of dispatch whatever its size, so at decode
(one row of a few hundred values) the two took 18 and 38 us per call against 8 and 10 here
(bench/cpu_ops.py; the default model runs 61 norms and 30 rotaries a step). Here each is
one call into a small C library, computing what the torch code in mixq.layers computes:

  add_rms_norm   x (+ residual) -> (weight * (s * rsqrt(mean(s^2) + eps)).to(dtype), s)
  rotary_neox    q [T, H, D], k [T, Hkv, D] rotated by cos/sin [P, D/2] at positions [T]

with the same rounding points (the sum x + residual and the normalized row rounded to the
dtype; rotary's products and differences each rounded to fp32, so no fused multiply-add:
the library is built with -ffp-contract=off). Rotary is bit-identical to the torch code;
the norm's mean of squares is summed in double, where torch sums fp32 in its own order, so
a bf16 output can differ from torch's by one unit in the last place (rarely) and both are
within float32 rounding of the float64 result.

fp32 and bf16 tensors with the weight in the same dtype, rows contiguous; anything else
(fp16, mixed dtypes, strided rows) runs the torch code. Built like the other CPU kernels
(mixq.kernels.cpu_fp8.build_library); where no C compiler is found the torch code runs and
a warning says why once.
"""

from __future__ import annotations

import ctypes
import logging

import torch

from mixq.kernels.cpu_fp8 import C_PRELUDE, build_library

log = logging.getLogger("mixq.kernels")

_SOURCE = C_PRELUDE + r"""
static inline float ld(const void *p, int64_t i, int bf16) {
    return bf16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline void st(void *p, int64_t i, float v, int bf16) {
    if (bf16) ((uint16_t *)p)[i] = f32_to_bf16(v);
    else ((float *)p)[i] = v;
}

/* rows t < T of n values: s = x (+ r, rounded to the dtype, stored to rout);
   out = w * dtype(s * (1 / sqrt(mean(s^2) + eps))). Rows at x + t * sx, r + t * sr. */
void add_rms_norm(const void *x, int64_t sx, const void *r, int64_t sr, const void *w, void *out, void *rout,
                  int64_t T, int64_t n, float eps, int bf16, int nthreads) {
    const int64_t es = bf16 ? 2 : 4;
    #pragma omp parallel for if (T >= 64) num_threads(nthreads) schedule(static)
    for (int64_t t = 0; t < T; t++) {
        const char *xt = (const char *)x + t * sx * es;
        const char *rt = r ? (const char *)r + t * sr * es : NULL;
        char *ot = (char *)out + t * n * es;
        char *rot = rout ? (char *)rout + t * n * es : NULL;
        double ss = 0.0;
        for (int64_t i = 0; i < n; i++) {
            float s = ld(xt, i, bf16);
            if (rt) {
                s += ld(rt, i, bf16);
                st(rot, i, s, bf16);
                s = ld(rot, i, bf16);  /* the rounded sum, as torch materialises it */
            }
            ss += (double)s * s;
        }
        const float inv = 1.0f / sqrtf((float)(ss / (double)n) + eps);
        const char *src = rt ? rot : xt;
        for (int64_t i = 0; i < n; i++) {
            float v = ld(src, i, bf16) * inv;
            if (bf16) v = bf16_to_f32(f32_to_bf16(v));  /* .to(dtype) before the weight */
            st(ot, i, ld(w, i, bf16) * v, bf16);
        }
    }
}

/* x [T, h, d] at x + t * sxt + head * d -> o [T, h, d] contiguous: with a = x[:d/2],
   b = x[d/2:], c = cos[pos[t]], s = sin[pos[t]]: o = (a c - b s, b c + a s) */
static void rotate(const void *x, int64_t sxt, void *o, const int64_t *pos, const float *cs, const float *sn,
                   int64_t T, int64_t h, int64_t d, int bf16, int nthreads) {
    const int64_t half = d / 2, es = bf16 ? 2 : 4;
    #pragma omp parallel for if (T >= 64) num_threads(nthreads) schedule(static)
    for (int64_t t = 0; t < T; t++) {
        const float *c = cs + pos[t] * half, *s = sn + pos[t] * half;
        for (int64_t j = 0; j < h; j++) {
            const char *xr = (const char *)x + (t * sxt + j * d) * es;
            char *orow = (char *)o + (t * h + j) * d * es;
            for (int64_t i = 0; i < half; i++) {
                const float a = ld(xr, i, bf16), b = ld(xr, i + half, bf16);
                const float ac = a * c[i], bs = b * s[i], bc = b * c[i], as = a * s[i];
                st(orow, i, ac - bs, bf16);
                st(orow, i + half, bc + as, bf16);
            }
        }
    }
}

/* -1 - t for the first token t whose position is outside the P rows of the tables, else 0 */
int rotary_neox(const void *q, int64_t sqt, const void *k, int64_t skt, void *qo, void *ko, const int64_t *pos,
                const float *cs, const float *sn, int64_t P, int64_t T, int64_t hq, int64_t hk, int64_t d, int bf16,
                int nthreads) {
    for (int64_t t = 0; t < T; t++)
        if (pos[t] < 0 || pos[t] >= P) return (int)(-1 - t);
    rotate(q, sqt, qo, pos, cs, sn, T, hq, d, bf16, nthreads);
    rotate(k, skt, ko, pos, cs, sn, T, hk, d, bf16, nthreads);
    return 0;
}
"""
_lib: ctypes.CDLL | None = None
_error: str | None = None
DTYPES = (torch.float32, torch.bfloat16)


def available() -> tuple[bool, str]:
    """Whether the library is built (building it on first call); else why not."""
    global _lib, _error
    if _lib is None and _error is None:
        try:
            dll = build_library("mixq_elementwise", _SOURCE, extra_flags=("-ffp-contract=off",))
            i64, ptr = ctypes.c_int64, ctypes.c_void_p
            dll.add_rms_norm.argtypes = [ptr, i64, ptr, i64, ptr, ptr, ptr, i64, i64, ctypes.c_float, ctypes.c_int,
                                         ctypes.c_int]
            dll.add_rms_norm.restype = None
            dll.rotary_neox.argtypes = [ptr, i64, ptr, i64, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64,
                                        ctypes.c_int, ctypes.c_int]
            dll.rotary_neox.restype = ctypes.c_int
            _lib = dll
        except (RuntimeError, OSError) as e:
            _error = str(e)
            log.warning("RMSNorm and rotary on the CPU run as torch ops: %s", _error)
    return _lib is not None, _error or ""


def _rows_ok(t: torch.Tensor, dtype: torch.dtype) -> bool:
    return t.device.type == "cpu" and t.dtype == dtype and t.stride(-1) == 1


def takes_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor) -> bool:
    """Whether add_rms_norm computes this call (else the torch code runs): CPU tensors of
    one dtype in DTYPES, x and residual 2-d-able with unit column stride, not autograd."""
    if x.dtype not in DTYPES or not _rows_ok(x, x.dtype) or not _rows_ok(weight, x.dtype) or weight.dim() != 1:
        return False
    if residual is not None and (not residual.is_contiguous() or residual.dtype != x.dtype or
                                 residual.shape != x.shape or residual.device.type != "cpu"):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return False
    if x.dim() != 2 and not x.is_contiguous():
        return False
    return available()[0]


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(normed x + residual, x + residual) as the torch RMSNorm computes them (module
    docstring); new tensors. Call only where takes_norm says so."""
    shape, n = x.shape, x.shape[-1]
    x2 = x if x.dim() == 2 else x.reshape(-1, n)
    t = x2.shape[0]
    out = torch.empty(shape, dtype=x.dtype)
    rout = None if residual is None else torch.empty(shape, dtype=x.dtype)
    _lib.add_rms_norm(x2.data_ptr(), x2.stride(0), None if residual is None else residual.data_ptr(), n,
                      weight.data_ptr(), out.data_ptr(), None if rout is None else rout.data_ptr(), t, n, eps,
                      int(x.dtype == torch.bfloat16), torch.get_num_threads())
    return out, rout


def takes_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 positions: torch.Tensor) -> bool:
    """Whether rotary_neox computes this call: CPU q [T, H, D] and k [T, Hkv, D] of one dtype
    in DTYPES with contiguous heads (token stride free: views of a merged q/k/v output),
    fp32 contiguous tables, int64 positions."""
    if q.dtype not in DTYPES or k.dtype != q.dtype or q.dim() != 3 or k.dim() != 3:
        return False
    d = q.shape[2]
    for t in (q, k):
        if t.device.type != "cpu" or t.shape[2] != d or t.stride(2) != 1 or t.stride(1) != d:
            return False
    if cos.dtype != torch.float32 or sin.dtype != torch.float32 or cos.dim() != 2 or cos.shape != sin.shape:
        return False
    if not (cos.is_contiguous() and sin.is_contiguous()) or cos.device.type != "cpu":
        return False
    if cos.shape[-1] * 2 != d or positions.dtype != torch.int64 or not positions.is_contiguous():
        return False
    if positions.device.type != "cpu" or (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)):
        return False
    return available()[0]


def rotary_neox(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rotated q, rotated k), new contiguous tensors, bit-identical to the torch code; an
    IndexError names a position outside the tables. Call only where takes_rotary says so."""
    qo, ko = torch.empty(q.shape, dtype=q.dtype), torch.empty(k.shape, dtype=k.dtype)
    t, hq, d = q.shape
    if positions.numel() != t or k.shape[0] != t:
        raise ValueError(f"rotary: {positions.numel()} positions for q {list(q.shape)} and k {list(k.shape)}")
    bad = _lib.rotary_neox(q.data_ptr(), q.stride(0), k.data_ptr(), k.stride(0), qo.data_ptr(), ko.data_ptr(),
                           positions.data_ptr(), cos.data_ptr(), sin.data_ptr(), cos.shape[0], t, hq, k.shape[1], d,
                           int(q.dtype == torch.bfloat16), torch.get_num_threads())
    if bad:
        i = -1 - bad
        raise IndexError(f"rotary: position {int(positions[i])} of token {i} is outside the "
                         f"{cos.shape[0]}-position tables")
    return qo, ko
