"""The engine: loads a mixed-precision model and serves many requests at once.

`LLMEngine` is the step-driven core (add_request / step / abort) that the server runs in
its own thread; `LLM` is the synchronous convenience API (`generate`, `stream`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from mixq.engine.detokenizer import DetokState, IncrementalDetokenizer, find_stop, held_back
from mixq.engine.model_runner import ModelRunner
from mixq.engine.overlap import LaunchedStep, pending_ids, step_chunks
from mixq.engine.sampler import Sampler, SampleRow
from mixq.engine.sampling_params import SamplingParams
from mixq.engine.scheduler import Scheduler, SchedulerConfig
from mixq.engine.sequence import Sequence
from mixq.layers.rotary import rope_max_position

log = logging.getLogger("mixq.engine")


@dataclass
class EngineConfig:
    """What the engine needs; built by the CLI/launcher from flags (one place)."""

    model_path: str | None = None
    mixed_precision_config: str | None = None
    tokenizer_path: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    max_model_len: int | None = None
    max_running_requests: int = 64
    chunked_prefill_size: int = 2048
    max_total_tokens: int | None = None
    page_size: int = 16
    mem_fraction_static: float = 0.85
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


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    delta_text: str = ""  # new since the previous RequestOutput of this request
    delta_token_ids: list[int] = field(default_factory=list)


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: dict = field(default_factory=dict)


@dataclass
class _Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    outputs: list[CompletionOutput]
    arrival: float
    first_token_time: float | None = None


@dataclass
class _SeqState:
    detok: DetokState
    out: CompletionOutput
    emitted: int = 0  # characters of out.text already sent as deltas
    tokens_sent: int = 0
    generator: torch.Generator | None = None


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device, hf_config: dict) -> torch.dtype:
    if dtype == "auto":
        if device.type == "cpu":
            return torch.float32  # CPU bf16 GEMMs are slow and lossy; fp32 is the reference
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
    """(LoadPlan, MixedPrecisionConfig | None) for an engine config; headers only."""
    from mixq.config.schema import MixedPrecisionConfig
    from mixq.formats import build_plan

    mp = None
    if cfg.mixed_precision_config:
        mp = MixedPrecisionConfig.from_yaml(cfg.mixed_precision_config, model_path=cfg.model_path)
    return build_plan(mp, model_path=cfg.model_path), mp


def kv_cache_blocks(model, cfg: EngineConfig, device: torch.device, dtype: torch.dtype, max_model_len: int) -> int:
    """KV blocks this process can hold: --max-total-tokens, else the GPU memory left under
    --mem-fraction-static, else (CPU) room for every running request within 4 GiB."""
    bs = cfg.page_size
    if cfg.max_total_tokens:
        return max(1, -(-cfg.max_total_tokens // bs))
    per = ModelRunner.kv_bytes_per_block(model, bs, dtype)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        budget = total * cfg.mem_fraction_static - (total - free)
        if budget < per * (-(-max_model_len // bs)):
            raise RuntimeError(
                f"not enough GPU memory for the KV cache of one {max_model_len}-token sequence at "
                f"--mem-fraction-static {cfg.mem_fraction_static}; raise it or lower --context-length"
            )
        return int(budget // per)
    want = cfg.max_running_requests * -(-max_model_len // bs)
    return max(-(-max_model_len // bs), min(want, int(4 * 2**30 // per)))


class LLMEngine:
    def __init__(self, cfg: EngineConfig):
        self.dist = None  # rank 0 of a tensor-parallel group (mixq.distributed.workers.Driver)
        try:
            self._init(cfg)
        except BaseException:
            self.close()  # other ranks already started must not be left waiting
            raise

    def _init(self, cfg: EngineConfig) -> None:
        from transformers import AutoTokenizer

        from mixq.formats import iter_weights
        from mixq.models import build_model, load_model_weights
        from mixq.models.registry import held_weights, load_kv_scales
        from mixq.tracking.memory import register_loaded_weights

        self.cfg = cfg
        parallel = cfg.parallel()
        self.device = resolve_device(cfg.device)
        self.plan, mp = load_plan(cfg)
        hf_cfg = self.plan.model_config
        dtype, max_len = cfg.dtype, cfg.max_model_len
        if mp is not None:  # the config's inference section fills what was left at default
            dtype = mp.inference.dtype if dtype == "auto" else dtype
            max_len = max_len or mp.inference.max_seq_length
        self.dtype = resolve_dtype(dtype, self.device, hf_cfg)
        self.kv_dtype = resolve_kv_dtype(cfg.kv_cache_dtype, self.dtype)
        limit = rope_max_position(hf_cfg)  # positions the model serves (YaRN: original x factor)
        max_len = min(max_len or limit, limit)
        t0 = time.perf_counter()
        if parallel.distributed:
            from mixq.distributed.workers import Driver

            # checks the layout against the plan before any process starts or weight is read
            self.dist = Driver.start(cfg, parallel, self.plan, self.dtype, max_len, self.kv_dtype)
            self.device, self.model = self.dist.device, self.dist.model
        else:
            self.model = build_model(hf_cfg, self.device)
            weights = iter_weights(self.plan, device=self.device)
            if cfg.show_progress:
                from tqdm import tqdm

                weights = tqdm(weights, total=len(self.plan.tensors), desc="loading weights", unit="tensor")
            load_model_weights(self.model, weights, self.dtype, cfg.merge_projections)
            load_kv_scales(self.model, self.plan)
        self.weights = held_weights(self.model)  # this process's weights (its shard under TP)
        register_loaded_weights(self.weights)
        self.load_seconds = time.perf_counter() - t0
        self.model_config = self.model.config

        tok_path = cfg.tokenizer_path or str(self.plan.base.path)
        self.tokenizer = AutoTokenizer.from_pretrained(tok_path)
        self.detok = IncrementalDetokenizer(self.tokenizer)
        self.max_model_len = max_len
        eos = set(self.model_config.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = tuple(sorted(eos))

        if self.dist is not None:  # every rank holds the same blocks: the smallest count fits all
            num_blocks = self.dist.num_blocks
            self.runner = self.dist.runner(cfg.page_size, self.kv_dtype, cfg.attention_backend)
        else:
            num_blocks = self._num_blocks()
            self.runner = ModelRunner(self.model, num_blocks, cfg.page_size, self.kv_dtype, self.device,
                                      cfg.attention_backend)
        self.scheduler = Scheduler(SchedulerConfig(
            num_blocks=num_blocks, block_size=cfg.page_size, max_running_requests=cfg.max_running_requests,
            max_model_len=self.max_model_len, chunked_prefill_size=cfg.chunked_prefill_size,
            eos_token_ids=self.eos_token_ids, enable_prefix_caching=not cfg.disable_radix_cache))
        self.sampler = Sampler(self.eos_token_ids)
        # the ranks of a TP group take a step's chunks as host data: a placeholder for a
        # token on rank 0's device cannot cross, so TP runs without the overlap schedule
        self.overlap = not cfg.disable_overlap_schedule and self.dist is None
        if not self.overlap:
            log.info("overlap schedule off: %s", "--disable-overlap-schedule" if cfg.disable_overlap_schedule
                     else "tensor parallelism")
        self._in_flight: LaunchedStep | None = None  # the step queued and not recorded yet
        self.requests: dict[str, _Request] = {}
        self.stats = {"requests_total": 0, "prompt_tokens_total": 0, "generation_tokens_total": 0}
        self.step_hooks: list = []  # called with the ScheduledBatch before each forward (tracking)
        self.finish_hooks: list = []  # called with (request_id, input_len, output_len) when a request ends
        self.expert_tracker = None
        if cfg.enable_expert_tracking:  # off: nothing is installed, the forward is the untracked one
            from mixq.tracking.experts import install_expert_tracking

            self.expert_tracker = install_expert_tracking(self)
        self._capture_cuda_graphs()

    def cuda_graph_plan(self) -> tuple[list[int] | None, str]:
        """The decode batch sizes to capture, or None and why not."""
        from mixq.engine.cuda_graph import graph_batch_sizes

        cfg = self.cfg
        if cfg.disable_cuda_graph:
            return None, "--disable-cuda-graph"
        if self.device.type != "cuda":
            return None, f"device {self.device.type}"
        if self.runner.attention_backend != "triton":
            return None, f"attention backend {self.runner.attention_backend} (graphs need triton)"
        if cfg.ep_size > 1 and cfg.moe_dispatch == "all-to-all":
            return None, "--moe-dispatch all-to-all (its split sizes are host data)"
        max_bs = min(cfg.cuda_graph_max_bs or min(cfg.max_running_requests, 256), cfg.max_running_requests)
        return graph_batch_sizes(max_bs, cfg.cuda_graph_bs), ""

    def _capture_cuda_graphs(self) -> None:
        sizes, why = self.cuda_graph_plan()
        if sizes is None:
            log.info("CUDA graphs off: %s", why)
            return
        counters = self.expert_tracker.counters if self.expert_tracker is not None else None
        if counters is not None:
            counters.reserve(max(sizes))  # the hooks' buffers must not move after capture
            counters.begin_pass(0)  # warm-up and capture forwards count nothing
        try:
            self.runner.capture_decode_graphs(sizes, -(-self.max_model_len // self.cfg.page_size))
        except Exception as e:  # say which flag avoids it; the cause stays attached
            raise RuntimeError(f"capturing CUDA graphs for decode batch sizes {sizes} failed: {e} "
                               "(--disable-cuda-graph runs decode steps eagerly)") from e
        if self.expert_tracker is not None:
            self.expert_tracker.reset_stats()

    def _num_blocks(self) -> int:
        return kv_cache_blocks(self.model, self.cfg, self.device, self.kv_dtype, self.max_model_len)

    def close(self) -> None:
        """Stop the other ranks of a tensor-parallel group (idempotent; no-op otherwise)."""
        if self.dist is not None:
            self.dist.close()
            self.dist = None

    # -- requests -------------------------------------------------------------------

    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        return list(prompt)

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> None:
        """Queue a request (n sequences), all or nothing: ValueError (nothing queued, no other
        request touched) when it can never be served."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if not isinstance(params, SamplingParams):
            raise TypeError(f"request {request_id}: params must be SamplingParams, got {type(params).__name__}")
        params.validate()  # fields may have been changed since construction
        ids = self.encode(prompt)
        vocab = self.model_config.vocab_size
        if any(type(t) is not int or not 0 <= t < vocab for t in ids):
            raise ValueError(f"request {request_id}: token ids must be in [0, {vocab})")
        seqs = [Sequence(request_id, ids, params, i) for i in range(params.n)]
        self.scheduler.check(seqs[0])  # the n sequences are alike
        for s in seqs:
            gen = None
            if params.seed is not None:  # sequence i draws from seed + i (mod 2**64, manual_seed's range)
                gen = torch.Generator(device=self.device).manual_seed((params.seed + s.index) % 2**64)
            s.engine_state = _SeqState(DetokState(), CompletionOutput(s.index), generator=gen)
        for s in seqs:  # nothing above queued anything; from here nothing can fail
            self.scheduler.add(s)
        self.requests[request_id] = _Request(request_id, ids, params, seqs, [s.engine_state.out for s in seqs],
                                             time.monotonic())
        self.stats["requests_total"] += 1
        self.stats["prompt_tokens_total"] += len(ids)

    def abort(self, request_id: str) -> int:
        """Abort a request; its KV blocks are freed at once. Returns how many of its
        sequences it ended (0, falsy, if the request is unknown or finished)."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return 0
        ended = len(self.scheduler.abort(request_id))
        step = self._in_flight
        if step is not None and all(i.seq.is_finished for i in step.batch.items):
            self._in_flight = None  # nothing left to record: every token it samples is dropped
        for f in self.finish_hooks:
            f(request_id, len(req.prompt_ids), sum(len(s.output_token_ids) for s in req.seqs))
        return ended

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or self._in_flight is not None

    # -- the step -------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one scheduled batch; return an update for every request that progressed.
        With the overlap schedule the update is one step behind: the batch is queued on
        the device, then the step before it is recorded while it runs."""
        prev, self._in_flight = self._in_flight, None
        batch = self.scheduler.schedule()
        if not batch and prev is None and self.scheduler.has_unfinished():  # would spin forever
            raise RuntimeError(f"the scheduler found nothing to run: running {self.scheduler.running}, "
                               f"waiting {list(self.scheduler.waiting)}")
        launched = self._launch(batch, prev) if batch else None
        if self.overlap:
            self._in_flight, launched = launched, prev
        return self._record(launched) if launched is not None else []

    def _launch(self, batch, prev: LaunchedStep | None) -> LaunchedStep:
        """Queue a committed batch on the device: forward, then sampling (no host sync)."""
        for h in self.step_hooks:
            h(batch)
        chunks, placeholders = step_chunks(batch, prev)
        logits = self.runner.forward(chunks, prev.tokens) if placeholders else self.runner.forward(chunks)
        sampling = [i.seq for i in batch.items if i.samples]
        step = LaunchedStep(batch, sampling)
        if sampling:
            # num_pending > 1: the token this sequence sampled last is still in flight
            rows = [SampleRow(s.params, s.prompt_token_ids, s.output_token_ids, s.engine_state.generator,
                              pending=s.num_pending > 1) for s in sampling]
            res = self.sampler.sample(logits, rows, pending_ids(sampling, prev, logits.device))
            step.tokens, step.result = res.token_ids, res.to_host()
            step.rows = {s.seq_id: k for k, s in enumerate(sampling)}
        return step

    def _record(self, step: LaunchedStep) -> list[RequestOutput]:
        """A step's results into the sequences and requests (stop checks, detokenization);
        a sequence that ended while the step ran (stop, abort) drops its token."""
        out = step.result.output() if step.result is not None else None
        tokens = out.token_ids if out else []
        live = [not s.is_finished for s in step.sampling]
        self.scheduler.postprocess(step.batch, tokens)
        self.stats["generation_tokens_total"] += sum(live)
        touched: dict[str, _Request] = {}
        now = time.monotonic()
        for k, seq in enumerate(step.sampling):
            req = self.requests.get(seq.request_id)
            if req is None or not live[k]:
                continue
            if req.first_token_time is None:
                req.first_token_time = now
            st: _SeqState = seq.engine_state
            st.out.token_ids.append(tokens[k])
            if seq.params.logprobs is not None:  # (the batch has them when any row asked)
                st.out.logprobs.append(out.logprobs[k])
                if out.top_logprobs is not None:
                    st.out.top_logprobs.append(out.top_logprobs[k])
            self._update_text(seq, st)
            touched[req.request_id] = req
        return [self._emit(req) for req in touched.values()]

    def _update_text(self, seq: Sequence, st: _SeqState) -> None:
        p = seq.params
        ids = seq.output_token_ids
        if ids and not (seq.finish_reason == "stop" and ids[-1] in (*self.eos_token_ids, *p.stop_token_ids)):
            start = len(st.out.text)
            st.out.text += self.detok.step(st.detok, ids, p.skip_special_tokens)
            if p.stop and (hit := find_stop(st.out.text, start, p.stop)) is not None:
                st.out.text = st.out.text[: hit[0]]
                if not seq.is_finished:
                    self.scheduler.finish(seq, "stop")
                else:
                    seq.finish_reason = "stop"
        if seq.is_finished:
            st.out.finish_reason = seq.finish_reason

    def _emit(self, req: _Request) -> RequestOutput:
        finished = all(s.is_finished for s in req.seqs)
        for s in req.seqs:
            st: _SeqState = s.engine_state
            # while running, hold back a tail that may become a stop string
            end = len(st.out.text) if s.is_finished else len(st.out.text) - held_back(st.out.text, s.params.stop)
            end = max(end, st.emitted)
            st.out.delta_text = st.out.text[st.emitted : end]
            st.emitted = end
            st.out.delta_token_ids = st.out.token_ids[st.tokens_sent :]
            st.tokens_sent = len(st.out.token_ids)
        metrics = {"arrival": req.arrival, "first_token_time": req.first_token_time,
                   "cached_tokens": req.seqs[0].num_cached_tokens}
        if finished:
            self.requests.pop(req.request_id, None)
            for f in self.finish_hooks:
                f(req.request_id, len(req.prompt_ids), sum(len(s.output_token_ids) for s in req.seqs))
        outs = [CompletionOutput(o.index, o.text, list(o.token_ids), o.finish_reason, list(o.logprobs),
                                 list(o.top_logprobs), o.delta_text, list(o.delta_token_ids)) for o in req.outputs]
        return RequestOutput(req.request_id, req.prompt_ids, outs, finished, metrics)

    def kv_cache_stats(self) -> dict:
        """This process's KV cache against the same cache in bf16 (/memory_stats)."""
        from mixq.kernels.kv_quant import KV_CACHE_DTYPES
        from mixq.tracking.memory import kv_cache_stats

        name = next((k for k, v in KV_CACHE_DTYPES.items() if v == self.kv_dtype),
                    str(self.kv_dtype).removeprefix("torch."))
        per = ModelRunner.kv_bytes_per_block(self.model, 1, self.kv_dtype)
        bf16 = ModelRunner.kv_bytes_per_block(self.model, 1, torch.bfloat16)
        scaled = sum(1 for m in self.runner.attn_layers if (m.k_scale, m.v_scale) != (1.0, 1.0))
        tokens = self.scheduler.blocks.num_blocks * self.scheduler.blocks.block_size
        return kv_cache_stats(name, per, tokens, bf16, scaled)

    def kv_usage(self) -> float:
        b = self.scheduler.blocks
        return b.num_used / b.num_blocks


class LLM:
    """Synchronous API: `LLM(model_path=..., mixed_precision_config=...).generate(...)`;
    `tp_size=N` (and `ep_size`) runs N ranks, this process being rank 0: `close()` (or a
    `with` block) stops the others."""

    def __init__(self, model_path: str | None = None, mixed_precision_config: str | None = None, **kw):
        self.engine = LLMEngine(EngineConfig(model_path=model_path, mixed_precision_config=mixed_precision_config,
                                             **kw))
        self._n = 0

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def generate(self, prompts: str | list[str] | list[list[int]],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        """Generate for every prompt (batched together); results in prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        params = params if isinstance(params, list) else [params] * len(prompts)
        ids = []
        for p, sp in zip(prompts, params):
            rid = f"gen-{self._n}"
            self._n += 1
            self.engine.add_request(rid, p, sp)
            ids.append(rid)
        final: dict[str, RequestOutput] = {}
        while self.engine.has_unfinished():
            for o in self.engine.step():
                if o.finished:
                    final[o.request_id] = o
        return [final[r] for r in ids]

    def stream(self, prompt: str | list[int], sampling_params: SamplingParams | None = None) -> Iterator[str]:
        """Yield text deltas of one request (n = 1) as they are generated."""
        rid = f"stream-{self._n}"
        self._n += 1
        self.engine.add_request(rid, prompt, sampling_params or SamplingParams())
        while self.engine.has_unfinished():
            for o in self.engine.step():
                if o.request_id == rid and o.outputs[0].delta_text:
                    yield o.outputs[0].delta_text
