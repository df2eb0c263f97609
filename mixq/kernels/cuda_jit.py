"""Build mixq's CUDA sources on first use, cache the build, load it with ctypes.

A source in `mixq/kernels/cuda/` is a plain CUDA translation unit with `extern "C"` entry
points and no torch headers (so no coupling to the installed torch's C++ ABI). It is
compiled once per (source, GPU architecture, flags) with nvcc into a shared library under
`$MIXQ_CUDA_CACHE` (default `~/.cache/mixq/cuda`), as DeepGEMM and FlashInfer JIT-build
theirs, and loaded with ctypes. The kernels take raw pointers and the current CUDA stream,
so CUDA graphs capture them like any other launch.

Without nvcc (and no cached build) `available` says why, and the methods that need a
build refuse in `can_implement`, so the Triton kernels take those weights.
`MIXQ_CUDA_KERNELS=0` turns the compiled kernels off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

SRC_DIR = Path(__file__).parent / "cuda"
FLAGS = ("-O3", "-std=c++17", "-Xcompiler", "-fPIC", "-lineinfo")


def cache_dir() -> Path:
    """Where built libraries are kept (`MIXQ_CUDA_CACHE`, default ~/.cache/mixq/cuda)."""
    env = os.environ.get("MIXQ_CUDA_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "mixq" / "cuda"


def nvcc_path() -> str | None:
    """The nvcc to build with: `MIXQ_NVCC`, then PATH, then $CUDA_HOME and /usr/local/cuda."""
    env = os.environ.get("MIXQ_NVCC")
    if env:
        return env if Path(env).exists() else None
    found = shutil.which("nvcc")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and (Path(root) / "bin" / "nvcc").exists():
            return str(Path(root) / "bin" / "nvcc")
    return None


def arch_flags(capability: tuple[int, int]) -> list[str]:
    """nvcc target for a compute capability: sm_90a on Hopper (its own instructions need
    the `a` target), sm_XY elsewhere."""
    major, minor = capability
    a = f"{major}{minor}" + ("a" if (major, minor) == (9, 0) else "")
    return [f"-gencode=arch=compute_{a},code=sm_{a}"]


def library_path(name: str, capability: tuple[int, int], parts: int = 1) -> Path:
    """The cached build of `cuda/<name>.cu` for a capability: keyed by the source's bytes,
    the flags, the target and the number of parts, so an edited source is rebuilt."""
    src = (SRC_DIR / f"{name}.cu").read_bytes()
    key = hashlib.sha256(src + repr((FLAGS, arch_flags(capability), parts)).encode()).hexdigest()[:16]
    return cache_dir() / f"{name}-sm{capability[0]}{capability[1]}-{key}.so"


def enabled() -> bool:
    return os.environ.get("MIXQ_CUDA_KERNELS", "1") != "0"


def available(name: str, capability: tuple[int, int], parts: int = 1) -> tuple[bool, str]:
    """Whether `name` can be loaded for a capability (cached or buildable), and if not why."""
    if not enabled():
        return False, "compiled CUDA kernels are off (MIXQ_CUDA_KERNELS=0)"
    if library_path(name, capability, parts).exists():
        return True, ""
    if nvcc_path() is None:
        return False, "no nvcc found to build the CUDA kernel (set MIXQ_NVCC or CUDA_HOME) and no cached build"
    return True, ""


def _run(cmd: list[str], name: str) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"CUDA kernel {name}: nvcc failed ({' '.join(cmd)}):\n{r.stderr[-4000:]}")


def build(name: str, capability: tuple[int, int], parts: int = 1) -> Path:
    """Compile `cuda/<name>.cu` unless cached; returns the library path. With parts > 1 the
    source is compiled as that many translation units at once (-DMIXQ_PARTS=P
    -DMIXQ_PART=i; the source splits its instantiations by them), in parallel, then linked.
    Concurrent builders each write a temporary file and rename it into place (atomic)."""
    out = library_path(name, capability, parts)
    if out.exists():
        return out
    nvcc = nvcc_path()
    if nvcc is None:
        raise RuntimeError(f"CUDA kernel {name}: no nvcc found (set MIXQ_NVCC or CUDA_HOME) and no cached build at {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    src = str(SRC_DIR / f"{name}.cu")
    arch = arch_flags(capability)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmpdir:
        tmp = os.path.join(tmpdir, "lib.so")
        if parts == 1:
            _run([nvcc, *FLAGS, *arch, "-shared", "-o", tmp, src], name)
        else:
            objs = [os.path.join(tmpdir, f"part{i}.o") for i in range(parts)]
            cmds = [[nvcc, *FLAGS, *arch, f"-DMIXQ_PARTS={parts}", f"-DMIXQ_PART={i}", "-c", "-o", o, src]
                    for i, o in enumerate(objs)]
            with ThreadPoolExecutor(max_workers=min(parts, os.cpu_count() or 1)) as pool:
                list(pool.map(lambda c: _run(c, name), cmds))
            _run([nvcc, *arch, "-shared", "-o", tmp, *objs], name)
        os.replace(tmp, out)
    return out


@functools.cache
def load(name: str, capability: tuple[int, int], parts: int = 1) -> ctypes.CDLL:
    """The loaded library (built on first use)."""
    return ctypes.CDLL(str(build(name, capability, parts)))
