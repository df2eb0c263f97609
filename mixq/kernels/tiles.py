"""Program-id helpers shared by the GEMM kernels (wna16, w8a16, w8a8)."""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: no kernels
    triton = None

if triton is not None:

    @triton.jit
    def grouped_tile(pid, M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
        """(pid_m, pid_n) of program `pid` in grouped order: GROUP_M row tiles take each
        weight column tile in turn while it is in L2, instead of every row tile sweeping
        the whole weight."""
        num_m = tl.cdiv(M, BM)
        width = GROUP_M * tl.cdiv(N, BN)
        first_m = (pid // width) * GROUP_M
        rows = tl.minimum(num_m - first_m, GROUP_M)
        return first_m + (pid % width) % rows, (pid % width) // rows

    @triton.jit
    def split_k_range(pid_k, k_tiles, split_k):
        """[t0, t1): the K tiles split `pid_k` of `split_k` covers (the last may be short
        or empty; an empty split still stores its zero partial)."""
        per_split = tl.cdiv(k_tiles, split_k)
        t0 = pid_k * per_split
        return t0, tl.minimum(t0 + per_split, k_tiles)
