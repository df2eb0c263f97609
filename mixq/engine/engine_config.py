"""What the engine resolves before it runs, shared by the engine and the ranks of a
tensor-parallel group (mixq.distributed.workers): the config, the device and dtypes, the
load plan, the tokenizer's path and the KV-cache size. Nothing here imports the engine or
the rank processes (only the leaf mixq.distributed.config, for ParallelConfig), so both
import it and the arrows point one way.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from mixq.engine.model_runner import ModelRunner
from mixq.errors import ConfigError


@dataclass
class EngineConfig:
    """What the engine needs; built by the CLI/launcher from flags (one place)."""

    model_path: str | None = None
    mixed_precision_config: str | None = None
    # "auto": the checkpoints; "dummy": random weights in the mapped formats, no checkpoint
    # read (SGLang's --load-format dummy, for benchmarks; mixq.models.dummy)
    load_format: str = "auto"
    tokenizer_path: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    max_model_len: int | None = None
    max_running_requests: int = 64
    chunked_prefill_size: int = 2048
    max_total_tokens: int | None = None
    page_size: int = 16
    mem_fraction_static: float = 0.85
    # CPU KV cache budget in GiB (as vLLM's VLLM_CPU_KVCACHE_SPACE, whose default is 4): the
    # cache is the smaller of this and what --max-running-requests full-length sequences
    # need; --max-total-tokens overrides both (`mixq generate` sizes it to its prompts)
    cpu_kv_cache_space: float = 1.0
    attention_backend: str = "auto"  # "triton" | "torch_native" (mixq.engine.model_runner)
    kv_cache_dtype: str = "auto"  # auto: the model dtype; else bfloat16, float16, float32, fp8_e4m3 or fp8_e5m2
    disable_radix_cache: bool = False  # SGLang's flag: no prefix caching (mixq.engine.block_manager)
    # SGLang's flag: record each step right after it runs instead of while the device runs
    # the next one (mixq.engine.overlap)
    disable_overlap_schedule: bool = False
    show_progress: bool = False
    # q/k/v and gate/up as one GEMM where their formats agree (mixq.layers.merged); off for
    # tools that hook or swap single projections (mixq.quality) and for A/B timing
    merge_projections: bool = True
    enable_expert_tracking: bool = False  # count MoE expert activations (mixq.tracking.experts)
    # decode steps replayed from CUDA graphs (mixq.engine.cuda_graph); CUDA + triton attention
    disable_cuda_graph: bool = False
    cuda_graph_max_bs: int | None = None  # None: --max-running-requests, at most 256
    cuda_graph_bs: list[int] | None = None  # explicit buckets (SGLang's --cuda-graph-bs)
    # parallelism (mixq.distributed.config.ParallelConfig has the meanings)
    tp_size: int = 1
    ep_size: int = 1
    nnodes: int = 1
    node_rank: int = 0
    dist_init_addr: str | None = None
    moe_dispatch: str = "all-reduce"
    base_gpu_id: int = 0
    dist_timeout_s: float = 600.0

    def parallel(self):
        """The ParallelConfig these fields describe (checked: ConfigError when impossible)."""
        from mixq.distributed.config import ParallelConfig

        return ParallelConfig(self.tp_size, self.ep_size, self.nnodes, self.node_rank, self.dist_init_addr,
                              self.moe_dispatch, self.base_gpu_id, self.dist_timeout_s)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU computes bf16 in hardware (x86 AVX512-BF16 / AMX-BF16, Arm BF16):
    there torch's bf16 GEMMs and its int4/int8 weight-only kernels are the fast ones (the
    fp32 int4 path is ~30x slower than bf16 on a Sapphire Rapids core); elsewhere bf16 is
    emulated and fp32 is faster. `cpuinfo`: /proc/cpuinfo's text (read when None)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:  # not Linux: no cheap, dependable way to ask
            return False
    for line in cpuinfo.splitlines():
        if line.startswith(("flags", "Features")):
            flags = set(line.split(":", 1)[1].split())
            return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
    return False


def usable_cpus(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """Cores this process may run on: its affinity mask, capped by a cgroup CPU quota
    (containers: docker --cpus); torch's default thread count follows only the first."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = None
    try:  # cgroup v2: "max 100000" or "150000 100000"
        q, period = (cgroup / "cpu.max").read_text().split()[:2]
        quota = None if q == "max" else int(q) / int(period)
    except (OSError, ValueError):
        try:  # cgroup v1: -1 when unlimited
            q = int((cgroup / "cpu" / "cpu.cfs_quota_us").read_text())
            quota = None if q <= 0 else q / int((cgroup / "cpu" / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            pass
    return max(1, min(n, math.ceil(quota))) if quota else n


def resolve_dtype(dtype: str, device: torch.device, hf_config: dict) -> torch.dtype:
    """The activation / dense-weight dtype for --dtype. auto: on a GPU the checkpoint's
    (bf16 for fp32 checkpoints); on a CPU bf16 where it has native bf16, else fp32."""
    if dtype == "auto":
        if device.type == "cpu":
            return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
        name = hf_config.get("torch_dtype") or hf_config.get("dtype") or "bfloat16"
        return {"float16": torch.float16, "float32": torch.bfloat16}.get(name, torch.bfloat16)
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype]


def resolve_kv_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """--kv-cache-dtype: auto (the model dtype), bfloat16, float16, float32, fp8_e4m3 or
    fp8_e5m2 (8-bit with per-tensor scales, mixq.kernels.kv_quant)."""
    from mixq.kernels.kv_quant import KV_CACHE_DTYPES

    plain = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    if name == "auto":
        return model_dtype
    if name in plain:
        return plain[name]
    if name in KV_CACHE_DTYPES:
        return KV_CACHE_DTYPES[name]
    raise ValueError(f"--kv-cache-dtype {name!r}: expected auto, {', '.join(plain)}, {', '.join(KV_CACHE_DTYPES)}")


def load_plan(cfg: EngineConfig):
    """(LoadPlan, MixedPrecisionConfig | None) for an engine config; headers only. With
    --load-format dummy: (DummyPlan, None), the model directory's config.json only."""
    from mixq.config.schema import MixedPrecisionConfig
    from mixq.formats import build_plan

    if cfg.load_format not in ("auto", "dummy"):
        raise ConfigError(f"--load-format must be auto or dummy, got {cfg.load_format!r}")
    if cfg.load_format == "dummy":
        from mixq.models.dummy import DummyPlan

        return DummyPlan.of(cfg.model_path), None

    mp = None
    if cfg.mixed_precision_config:
        mp = MixedPrecisionConfig.from_yaml(cfg.mixed_precision_config, model_path=cfg.model_path)
    return build_plan(mp, model_path=cfg.model_path), mp


def tokenizer_path(cfg: EngineConfig, plan) -> str:
    """Where the engine loads its tokenizer: --tokenizer-path, else the base checkpoint."""
    return cfg.tokenizer_path or str(plan.base.path)


def kv_cache_blocks(model, cfg: EngineConfig, device: torch.device, dtype: torch.dtype, max_model_len: int) -> int:
    """KV blocks this process holds: --max-total-tokens when given; else on a GPU the memory
    left under --mem-fraction-static; else (CPU) what --max-running-requests sequences of
    max_model_len need, at most --cpu-kv-cache-space GiB. Raises when one sequence of
    max_model_len does not fit the budget (rather than allocating past it)."""
    bs = cfg.page_size
    if cfg.max_total_tokens:
        return max(1, -(-cfg.max_total_tokens // bs))
    per = ModelRunner.kv_bytes_per_block(model, bs, dtype)
    one_seq = -(-max_model_len // bs)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # blocks this process freed (an earlier engine's) count as free
        free, total = torch.cuda.mem_get_info(device)
        budget = total * cfg.mem_fraction_static - (total - free)
        if budget < per * one_seq:
            raise RuntimeError(
                f"not enough GPU memory for the KV cache of one {max_model_len}-token sequence at "
                f"--mem-fraction-static {cfg.mem_fraction_static}; raise it or lower --context-length"
            )
        return int(budget // per)
    budget = int(cfg.cpu_kv_cache_space * 2**30 // per)
    if budget < one_seq:
        raise ConfigError(
            f"--cpu-kv-cache-space {cfg.cpu_kv_cache_space:g} GiB holds {budget * bs} tokens of KV cache, less "
            f"than one {max_model_len}-token sequence ({one_seq * per / 2**30:.2f} GiB); raise it, lower "
            "--context-length or set --max-total-tokens"
        )
    return min(cfg.max_running_requests * one_seq, budget)
