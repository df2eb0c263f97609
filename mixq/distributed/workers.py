"""The processes of a tensor-parallel group: one per rank (per GPU).

Rank 0 is the engine's own process (`Driver`): it keeps the scheduler, and before every
forward it broadcasts the step's batch (the scheduler's `SeqChunk`s, plain Python) to the
other ranks, which build the same tensors and run the same model on their shards
(`worker_main`). Collectives inside the model (all-reduces, the vocab gather, the MoE
dispatch) keep them in lock step; only rank 0 samples, from the full logits.

Startup: rank 0 checks the layout against the plan (headers only) before any process
starts; every rank then loads only its part, and all report back at once, so a rank that
failed names itself in rank 0's error.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import os
import threading
import time
import weakref
from dataclasses import dataclass, replace

import torch

from mixq.distributed.comm import RankGroup, join_group
from mixq.distributed.config import ParallelConfig, free_port
from mixq.distributed.layers import parallelize
from mixq.distributed.layout import ShardLayout
from mixq.distributed.report import format_layout
from mixq.engine.engine_config import EngineConfig, kv_cache_blocks, load_plan, resolve_device
from mixq.engine.model_runner import ModelRunner, SeqChunk
from mixq.errors import ConfigError, MixqError
from mixq.formats import iter_weights
from mixq.models import build_model, load_model_weights
from mixq.models.config import ModelConfig
from mixq.models.registry import load_kv_scales

log = logging.getLogger("mixq.distributed")


@dataclass
class WorkerSpec:
    """What a rank process needs to start (picklable)."""

    cfg: EngineConfig
    pc: ParallelConfig
    rank: int
    parent_pid: int | None = None  # exit when this process is gone (no orphans)
    cpu_threads: int | None = None  # intra-op threads of a CPU rank


def load_rank(plan, layout: ShardLayout, group: RankGroup, dtype: torch.dtype):
    """Build the model, make it this rank's part and stream in only its weights (its
    experts, its shards). Returns (model, stats) with the bytes read by format."""
    model = build_model(plan.model_config, group.device)
    parallelize(model, layout, group.rank, group.comm)
    place = layout.placements(plan, group.rank)
    by_format: dict[str, int] = {}

    def stream():
        for qw in iter_weights(plan, select=lambda n: place[n].held, shard_for=lambda n: place[n].shard,
                               device=group.device):
            by_format[qw.spec.family] = by_format.get(qw.spec.family, 0) + qw.nbytes
            yield qw

    load_model_weights(model, stream(), dtype)
    load_kv_scales(model, plan)  # per-tensor scalars: every rank reads them all
    ex = layout.local_experts(group.rank) if layout.experts_per_rank else None
    stats = {"rank": group.rank, "device": str(group.device), "bytes": sum(by_format.values()),
             "by_format": dict(sorted(by_format.items())), "experts": None if ex is None else [ex.start, ex.stop - 1]}
    return model, stats


def _gather_reports(group: RankGroup, stats: dict | None, error: str | None) -> list[dict]:
    reports = group.ctl.all_gather({"rank": group.rank, "error": error, "stats": stats})
    bad = [r for r in reports if r["error"]]
    if bad:
        raise MixqError("; ".join(f"rank {r['rank']}: {r['error']}" for r in bad))
    return [r["stats"] for r in reports]


class DistributedRunner(ModelRunner):
    """Rank 0's model runner: tells the other ranks what to run, then runs it too."""

    def __init__(self, group: RankGroup, *args):
        super().__init__(*args)
        self.group = group

    def forward(self, chunks: list[SeqChunk]) -> torch.Tensor:
        self.group.ctl.send(("forward", chunks))
        return super().forward(chunks)

    def score(self, token_ids: list[int], block_table: list[int]) -> torch.Tensor:
        self.group.ctl.send(("score", token_ids, block_table))
        return super().score(token_ids, block_table)

    def capture_decode_graphs(self, sizes: list[int], max_blocks: int, capture: bool = True) -> None:
        # every rank captures the same buckets: their collectives meet inside the graphs
        self.group.ctl.send(("capture_decode_graphs", sizes, max_blocks, capture))
        super().capture_decode_graphs(sizes, max_blocks, capture)


def _check_devices(pc: ParallelConfig, device_type: str) -> None:
    if device_type != "cuda":
        return
    need = pc.base_gpu_id + pc.ranks_per_node
    have = torch.cuda.device_count()
    if need > have:
        raise ConfigError(f"--tp-size {pc.tp_size} over --nnodes {pc.nnodes} needs {need} GPUs on this node "
                          f"(from GPU {pc.base_gpu_id}) but {have} are visible")


def _cpu_threads(pc: ParallelConfig) -> int:
    """Intra-op threads per CPU rank: this process's budget split over the node's ranks.
    Each rank's threads spin while they wait, so N ranks x all cores would oversubscribe
    the machine many times over (a DP replica's budget is already its share)."""
    return max(1, torch.get_num_threads() // pc.ranks_per_node)


def _spawn(cfg: EngineConfig, pc: ParallelConfig, ranks, threads: int) -> list:
    ctx = multiprocessing.get_context("spawn")
    procs = []
    for r in ranks:
        p = ctx.Process(target=_worker_process, args=(WorkerSpec(cfg, pc, r, os.getpid(), threads),), daemon=True,
                        name=f"mixq-rank{r}")
        p.start()
        procs.append(p)
    return procs


def _stop(procs: list, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            log.warning("rank process %s did not exit; terminating it", p.name)
            p.terminate()
            p.join(5)


class Driver:
    """Rank 0 of a TP group, inside the engine process: `model` is its part of the model,
    `num_blocks` the KV-cache size every rank agreed on."""

    def __init__(self, group: RankGroup, layout: ShardLayout, procs: list):
        self.group, self.layout, self.procs = group, layout, procs
        self.device = group.device
        self.model = None
        self.num_blocks = 0
        self.rank_stats: list[dict] = []
        self.threads = torch.get_num_threads()

    @classmethod
    def start(cls, cfg: EngineConfig, pc: ParallelConfig, plan, dtype: torch.dtype, max_model_len: int,
              kv_dtype: torch.dtype | None = None) -> Driver:
        """Check the layout, start this node's other ranks, join the group, send them the
        settings only rank 0 resolved (dtypes, context length), load every rank's part and
        agree on the KV-cache size. Any failure stops the other ranks and raises here."""
        layout = ShardLayout(ModelConfig.from_hf(plan.model_config), pc)
        layout.check(plan)  # bad layouts fail here: no process started, no weight read
        device_type = resolve_device(cfg.device).type
        _check_devices(pc, device_type)
        if pc.dist_init_addr is None:
            pc = replace(pc, dist_init_addr=f"127.0.0.1:{free_port()}")
            cfg = replace(cfg, dist_init_addr=pc.dist_init_addr)
        threads = torch.get_num_threads()
        per_rank = _cpu_threads(pc)
        procs = _spawn(cfg, pc, pc.node_ranks(0)[1:], per_rank)
        group = None
        if device_type == "cpu":
            torch.set_num_threads(per_rank)
        try:
            group = join_group(pc, 0, pc.device_for(0, device_type))
            kv_dtype = kv_dtype or dtype
            group.ctl.send({"dtype": dtype, "kv_dtype": kv_dtype, "max_model_len": max_model_len})
            driver = cls(group, layout, procs)
            driver.threads = threads
            model, stats, error = None, None, None
            try:
                model, stats = load_rank(plan, layout, group, dtype)
            except Exception as e:  # every rank must report, or the others wait forever
                log.exception("loading failed")
                error = f"{type(e).__name__}: {e}"
            driver.rank_stats = _gather_reports(group, stats, error)
            driver.model = model
            driver.num_blocks = group.ctl.min(kv_cache_blocks(model, cfg, group.device, kv_dtype, max_model_len))
        except BaseException:
            if group is not None:
                group.close()
            _stop(procs, 5.0)
            torch.set_num_threads(threads)
            raise
        log.info("%s", format_layout(layout, driver.rank_stats))
        atexit.register(_close_at_exit, weakref.ref(driver))
        threading.Thread(target=_watch_ranks, args=(weakref.ref(driver),), name="mixq-rank-watch", daemon=True).start()
        return driver

    def runner(self, page_size: int, kv_dtype: torch.dtype, attention_backend: str = "auto") -> DistributedRunner:
        return DistributedRunner(self.group, self.model, self.num_blocks, page_size, kv_dtype, self.device,
                                 attention_backend)

    def close(self) -> None:
        """Tell the other ranks to stop, leave the group, reap the processes."""
        group, self.group = self.group, None  # first: the rank watcher stops watching
        if group is None:
            return
        try:
            group.ctl.send(("stop",))
        except Exception as e:  # a rank already gone: the others exit on their own
            log.warning("could not stop the other ranks cleanly: %s", e)
        group.close()
        _stop(self.procs)
        torch.set_num_threads(self.threads)


def _watch_ranks(ref) -> None:
    """Name a rank process that dies while the group is up: the next collective fails
    (gloo at once, NCCL after its timeout) and this says which rank it was."""
    while True:
        time.sleep(1.0)
        driver = ref()
        if driver is None or driver.group is None:
            return
        for p in driver.procs:
            if p.exitcode is not None:
                log.error("rank process %s (pid %s) exited with status %s; the tensor-parallel group cannot "
                          "continue", p.name, p.pid, p.exitcode)
                return
        del driver


def _close_at_exit(ref) -> None:
    driver = ref()
    if driver is not None:
        driver.close()


def _watch_parent(parent_pid: int) -> None:
    def watch():
        while True:
            time.sleep(1.0)
            if os.getppid() != parent_pid:  # re-parented: the engine process is gone
                os._exit(1)

    threading.Thread(target=watch, name="mixq-parent-watch", daemon=True).start()


def worker_main(spec: WorkerSpec) -> int:
    """A rank > 0: join the group, load this rank's part, then run what rank 0 sends
    until it says stop. Returns the process exit status."""
    if spec.parent_pid is not None:
        _watch_parent(spec.parent_pid)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s rank{spec.rank} %(name)s: %(message)s")
    cfg, pc = spec.cfg, spec.pc
    device = pc.device_for(spec.rank, resolve_device(cfg.device).type)
    if device.type == "cpu" and spec.cpu_threads:
        torch.set_num_threads(spec.cpu_threads)
    group = join_group(pc, spec.rank, device)
    try:
        setup = group.ctl.recv()
        model, stats, error = None, None, None
        try:
            plan, _ = load_plan(cfg)
            layout = ShardLayout(ModelConfig.from_hf(plan.model_config), pc)
            model, stats = load_rank(plan, layout, group, setup["dtype"])
        except Exception as e:
            log.exception("loading failed")
            error = f"{type(e).__name__}: {e}"
        _gather_reports(group, stats, error)
        blocks = group.ctl.min(kv_cache_blocks(model, cfg, group.device, setup["kv_dtype"], setup["max_model_len"]))
        runner = ModelRunner(model, blocks, cfg.page_size, setup["kv_dtype"], group.device, cfg.attention_backend)
        while True:
            msg = group.ctl.recv()
            if msg[0] == "stop":
                return 0
            getattr(runner, msg[0])(*msg[1:])
    except MixqError as e:  # another rank failed to load: rank 0 reports it
        log.error("%s", e)
        return 1
    finally:
        group.close()


def _worker_process(spec: WorkerSpec) -> None:
    raise SystemExit(worker_main(spec))


def run_node(cfg: EngineConfig, pc: ParallelConfig) -> int:
    """A node other than 0 (--node-rank > 0): run its ranks until rank 0 stops them.
    The first rank runs in this process, the others in child processes."""
    _check_devices(pc, resolve_device(cfg.device).type)
    ranks = pc.node_ranks()
    threads = _cpu_threads(pc)
    procs = _spawn(cfg, pc, ranks[1:], threads)
    try:
        status = worker_main(WorkerSpec(cfg, pc, ranks[0], None, threads))
    finally:
        _stop(procs)
    return status or max((p.exitcode or 0 for p in procs), default=0)
