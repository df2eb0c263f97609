"""Timing helpers shared by the kernel benchmarks.

Each call is timed inside a CUDA graph (as the engine runs decode), cycling over enough
weight copies that every call reads its weight from HBM, not L2: launch and Python
overhead stay out of the figure, which is then the GPU time of the kernel(s) alone. Where
capture fails, eager timing (CUDA events around each call) is used and flagged.
"""

from __future__ import annotations

import statistics

import torch

L2_BYTES = 64 * 2**20  # more than H100's 50 MiB L2


def copies(nbytes: int) -> int:
    """Weight copies to cycle so that the working set is > 3x L2."""
    return max(1, min(16, -(-3 * L2_BYTES // max(nbytes, 1))))


def eager_us(fn, args_list=((),), reps: int = 50, warmup: int = 0) -> float:
    """Median microseconds of fn(*args) cycling through args_list, each call timed with
    CUDA events (launch gaps included: for what a CUDA graph cannot hold)."""
    for i in range(warmup):
        fn(*args_list[i % len(args_list)])
    torch.cuda.synchronize()
    times = []
    for i in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn(*args_list[i % len(args_list)])
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) * 1000)
    return statistics.median(times)


EAGER_FALLBACKS: list[str] = []  # names of timings that could not be graph-captured


def time_us(fn, args_list, reps: int = 20, replays: int = 5, name: str = "") -> float:
    """Median microseconds per fn(*args) call (args cycling through args_list)."""
    for a in args_list[:3]:  # compile / autotune / allocate outside the capture
        fn(*a)
    torch.cuda.synchronize()
    calls = max(reps, len(args_list))
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn(*args_list[0])
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for i in range(calls):
                fn(*args_list[i % len(args_list)])
    except Exception as e:  # not capturable: time it eagerly and say so in the report
        torch.cuda.synchronize()
        EAGER_FALLBACKS.append(f"{name or getattr(fn, '__name__', 'fn')}: {type(e).__name__}")
        return eager_us(fn, args_list, reps * replays)
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        st, en = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        st.record()
        g.replay()
        en.record()
        en.synchronize()
        times.append(st.elapsed_time(en) * 1000 / calls)
    del g
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Bytes/s of a device-to-device copy (read + write): the HBM roofline. The GPU is
    warmed up first (it idles at a low clock), then 256 MiB and 1 GiB copies are timed and
    the faster is kept, so percentages of it are never flattered by a slow reading."""
    best = 0.0
    for size, reps in ((2**28, 16), (2**30, 4)):
        x = torch.empty(size, dtype=torch.uint8, device="cuda")
        y = torch.empty_like(x)
        for _ in range(50 if size == 2**28 else 0):  # ~0.2 s of copies: clocks up
            y.copy_(x)
        t = time_us(lambda dst, src: dst.copy_(src), [(y, x)], reps=reps, replays=5)
        best = max(best, 2 * size / (t * 1e-6))
    return best


def bf16_peak() -> float:
    """FLOP/s of an 8192^3 cuBLAS BF16 matmul."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t = time_us(torch.matmul, [(a, b)], reps=10, replays=3)
    return 2 * 8192**3 / (t * 1e-6)


def fp8_peak() -> float | None:
    """FLOP/s of an 8192^3 torch._scaled_mm FP8 (tensorwise) matmul; None if unavailable."""
    try:
        a = torch.randn(8192, 8192, device="cuda").to(torch.float8_e4m3fn)
        b = torch.randn(8192, 8192, device="cuda").to(torch.float8_e4m3fn)
        one = torch.ones((), device="cuda")
        t = time_us(lambda: torch._scaled_mm(a, b.t(), one, one, out_dtype=torch.bfloat16), [()], reps=10, replays=3)
    except Exception as e:
        print(f"fp8 peak unavailable: {type(e).__name__}: {e}")
        return None
    return 2 * 8192**3 / (t * 1e-6)
