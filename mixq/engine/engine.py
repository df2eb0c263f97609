"""The engine: loads a mixed-precision model and serves many requests at once.

`LLMEngine` is the step-driven core (add_request / step / abort) that the server runs in
its own thread; `LLM` is the synchronous convenience API (`generate`, `stream`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from mixq.engine.detokenizer import (
    DetokState,
    IncrementalDetokenizer,
    find_stop,
    held_back,
)
from mixq.engine.engine_config import (  # also the engine's public names (mixq.engine.engine.EngineConfig, ...)
    EngineConfig,
    kv_cache_blocks,
    load_plan,
    resolve_device,
    resolve_dtype,
    resolve_kv_dtype,
    tokenizer_path,
    usable_cpus,
)
from mixq.engine.grammar import Grammar, GrammarBackend, TokenMask, TokenMasks, advance_matchers
from mixq.engine.model_runner import ModelRunner
from mixq.engine.outputs import CompletionOutput, RequestOutput  # also the engine's public names
from mixq.engine.overlap import LaunchedStep, pending_ids, step_chunks
from mixq.engine.sampler import Sampler, SampleRow
from mixq.engine.sampling_params import SamplingParams
from mixq.engine.scheduler import Scheduler, SchedulerConfig
from mixq.engine.sequence import SeqStatus, Sequence
from mixq.errors import ConfigError
from mixq.layers.rotary import rope_max_position

log = logging.getLogger("mixq.engine")


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
    inline: bool = True  # detokenized here; else out.text_ids says how far a text stage should go
    unsent: str = ""  # the end of out.text not sent as a delta yet (held back: it may begin a stop string)
    tail: str = ""  # the last (longest stop string - 1) characters of out.text: where a stop can begin
    tail_len: int = 0
    tokens_sent: int = 0
    generator: torch.Generator | None = None
    matcher: object = None  # xgrammar.GrammarMatcher of a structured output (mixq.engine.grammar)
    row: SampleRow | None = None  # its row of the sampler's input (the lists are the sequence's own)
    dead_end: bool = False  # its grammar allowed no token: ended with the EOS it was given instead


class LLMEngine:
    def __init__(self, cfg: EngineConfig):
        self.dist = None  # rank 0 of a tensor-parallel group (mixq.distributed.workers.Driver)
        try:
            self._init(cfg)
        except BaseException:
            self.close()  # other ranks already started must not be left waiting
            raise

    def _init(self, cfg: EngineConfig) -> None:
        from mixq.formats import iter_weights
        from mixq.formats.gguf_file import load_tokenizer
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
        if self.device.type == "cpu" and torch.get_num_threads() > (cores := usable_cpus()):
            torch.set_num_threads(cores)  # a CPU quota below the affinity mask: more threads only spin
        if self.device.type == "cpu":
            log.info("CPU: %d threads, %s", torch.get_num_threads(), str(self.dtype).removeprefix("torch."))
        self.kv_dtype = resolve_kv_dtype(cfg.kv_cache_dtype, self.dtype)
        limit = rope_max_position(hf_cfg)  # positions the model serves (YaRN: original x factor)
        max_len = min(max_len or limit, limit)
        t0 = time.perf_counter()
        dummy = cfg.load_format == "dummy"
        if dummy and parallel.distributed:
            raise ConfigError("--load-format dummy runs in one process: tensor and expert parallel ranks read "
                              "shards of real checkpoints")
        if parallel.distributed:
            from mixq.distributed.workers import Driver

            # checks the layout against the plan before any process starts or weight is read
            self.dist = Driver.start(cfg, parallel, self.plan, self.dtype, max_len, self.kv_dtype)
            self.device, self.model = self.dist.device, self.dist.model
        else:
            self.model = build_model(hf_cfg, self.device)
            if dummy:  # random weights in the mapped formats (mixq.models.dummy)
                from mixq.models.dummy import dummy_weights, model_tensors, read_mapping

                weights = dummy_weights(self.model, read_mapping(cfg.mixed_precision_config), self.dtype,
                                        self.device, source=cfg.mixed_precision_config or "<dummy>")
                total = len(model_tensors(self.model))
            else:
                weights, total = iter_weights(self.plan, device=self.device), len(self.plan.tensors)
            if cfg.show_progress:
                from tqdm import tqdm

                weights = tqdm(weights, total=total, desc="loading weights", unit="tensor")
            load_model_weights(self.model, weights, self.dtype, cfg.merge_projections)
            if not dummy:
                load_kv_scales(self.model, self.plan)
        self.weights = held_weights(self.model)  # this process's weights (its shard under TP)
        register_loaded_weights(self.weights)
        self.load_seconds = time.perf_counter() - t0
        self.model_config = self.model.config

        # a directory's tokenizer files, or the vocabulary inside a GGUF file
        self.tokenizer = load_tokenizer(tokenizer_path(cfg, self.plan))
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
        self.kv_cache_tokens = num_blocks * cfg.page_size
        self.kv_cache_bytes = num_blocks * ModelRunner.kv_bytes_per_block(self.model, cfg.page_size, self.kv_dtype)
        log.info("KV cache: %d tokens (%d blocks of %d), %.1f MiB of %s on %s", self.kv_cache_tokens, num_blocks,
                 cfg.page_size, self.kv_cache_bytes / 2**20, str(self.kv_dtype).removeprefix("torch."), self.device)
        self.scheduler = Scheduler(SchedulerConfig(
            num_blocks=num_blocks, block_size=cfg.page_size, max_running_requests=cfg.max_running_requests,
            max_model_len=self.max_model_len, chunked_prefill_size=cfg.chunked_prefill_size,
            eos_token_ids=self.eos_token_ids, enable_prefix_caching=not cfg.disable_radix_cache))
        self.sampler = Sampler(self.eos_token_ids)
        self.grammar = GrammarBackend(self.tokenizer, self.model_config.vocab_size, self.eos_token_ids)
        self._masks: TokenMasks | None = None
        # the ranks of a TP group take a step's chunks as host data: a placeholder for a
        # token on rank 0's device cannot cross, so TP runs without the overlap schedule
        self.overlap = not cfg.disable_overlap_schedule and self.dist is None
        if not self.overlap:
            log.info("overlap schedule off: %s", "--disable-overlap-schedule" if cfg.disable_overlap_schedule
                     else "tensor parallelism")
        self._in_flight: LaunchedStep | None = None  # the step queued and not recorded yet
        # requests added while set, without stop strings, get token ids and no text from
        # step(): their consumer detokenizes off this loop (mixq.engine.detokenizer.TextStage)
        self.defer_text = False
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
        from mixq.engine.cuda_graph import graph_plan

        return graph_plan(self.cfg, self.device, self.runner.attention_backend)

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

    def set_defer_text(self, on: bool) -> None:
        """Set `defer_text` (a call, so a DP replica's owner can make it across the pipe)."""
        self.defer_text = bool(on)

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

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    grammar: Grammar | None = None) -> None:
        """Queue a request (n sequences), all or nothing: ValueError (nothing queued, no other
        request touched) when it can never be served. A structured-output constraint is
        compiled here (cached) unless `grammar` brings it compiled (the server compiles off
        this thread: `self.grammar.compile(params)`)."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if not isinstance(params, SamplingParams):
            raise TypeError(f"request {request_id}: params must be SamplingParams, got {type(params).__name__}")
        params.validate()  # fields may have been changed since construction
        if grammar is None:
            grammar = self.grammar.compile(params)
        elif grammar.key != params.constraint:
            raise ValueError(f"request {request_id}: the grammar given was compiled for another constraint")
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
            matcher = self.grammar.matcher(grammar) if grammar else None
            inline = not self.defer_text or bool(params.stop)  # whether a stop string ends it needs its text
            s.engine_state = _SeqState(DetokState(), CompletionOutput(s.index, text_ids=None if inline else 0),
                                       inline=inline, tail_len=max(map(len, params.stop), default=1) - 1,
                                       generator=gen, matcher=matcher,
                                       row=SampleRow(params, s.prompt_token_ids, s.output_token_ids, gen,
                                                     constrained=matcher is not None))
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

    def step(self, finished_only: bool = False) -> list[RequestOutput]:
        """Run one scheduled batch; return an update for every request that progressed
        (finished_only: for every request that finished, whose deltas then hold all it did
        not return before). With the overlap schedule the update is one step behind: the
        batch is queued on the device, then the step before it is recorded while it runs."""
        prev, self._in_flight = self._in_flight, None
        early: list[RequestOutput] = []
        if prev is not None and prev.mask is not None:
            # a grammar's next mask needs the token in flight: record that step first (a step
            # with structured outputs runs without the overlap)
            early, prev = self._record(prev, finished_only), None
        batch = self.scheduler.schedule()
        if not batch and prev is None and not early and self.scheduler.has_unfinished():  # would spin forever
            raise RuntimeError(f"the scheduler found nothing to run: running {self.scheduler.running}, "
                               f"waiting {list(self.scheduler.waiting)}")
        launched = self._launch(batch, prev) if batch else None
        if self.overlap:
            self._in_flight, launched = launched, prev
        return early + (self._record(launched, finished_only) if launched is not None else [])

    def _launch(self, batch, prev: LaunchedStep | None) -> LaunchedStep:
        """Queue a committed batch on the device: forward, then sampling (no host sync)."""
        for h in self.step_hooks:
            h(batch)
        chunks, placeholders = step_chunks(batch, prev)
        logits = self.runner.forward(chunks, prev.tokens) if placeholders else self.runner.forward(chunks)
        sampling = [i.seq for i in batch.items if i.samples]
        step = LaunchedStep(batch, sampling)
        if sampling:
            matchers = [s.engine_state.matcher for s in sampling]
            # filled on the host while the forward runs; a constrained row's previous token is
            # always recorded by now (step() records such a step before scheduling the next)
            constrained = matchers.count(None) != len(matchers)
            step.mask = self._token_masks().fill(matchers) if constrained else None
            rows = []
            for s in sampling:  # each sequence's row lives as long as it does
                row = s.engine_state.row
                row.pending = s.num_pending > 1  # the token it sampled last is still in flight
                rows.append(row)
            # the ids of those tokens, for the penalties (a tensor op and a copy saved without them)
            pend = pending_ids(sampling, prev, logits.device) if any(r.penalized for r in rows) else None
            res = self.sampler.sample(logits, rows, pend, step.mask)
            step.tokens, step.result = res.token_ids, res.to_host()
            step.rows = {s.seq_id: k for k, s in enumerate(sampling)}
        return step

    def _record(self, step: LaunchedStep, finished_only: bool = False) -> list[RequestOutput]:
        """A step's results into the sequences and requests (stop checks, detokenization);
        a sequence that ended while the step ran (stop, abort) drops its token.
        finished_only: return outputs of the requests that finished only (`LLM.generate`)."""
        out = step.result.output() if step.result is not None else None
        tokens = out.token_ids if out else []
        sampling = step.sampling
        live = [not s.is_finished for s in sampling]
        self.scheduler.postprocess(step.batch, tokens)
        if step.mask is not None:
            self._advance_grammars(sampling, tokens, step.mask, live)
        touched: dict[str, _Request] = {}
        recorded: list[Sequence] = []
        done = SeqStatus.FINISHED
        now = time.monotonic()
        requests = self.requests
        lps = out.logprobs if out is not None else None
        tops = out.top_logprobs if out is not None else None
        for k, seq in enumerate(sampling):
            if not live[k]:
                continue
            req = requests.get(seq.request_id)
            if req is None:
                continue
            if req.first_token_time is None:
                req.first_token_time = now
            o = seq.engine_state.out
            o._ids.append(tokens[k])
            if lps is not None and seq.params.logprobs is not None:  # (the batch has them when any row asked)
                o._lps.append(lps[k])
                if tops is not None:
                    o._tops.append(tops[k])
            recorded.append(seq)
            touched[req.request_id] = req
        self.stats["generation_tokens_total"] += sum(live)
        self._update_texts(recorded)
        if finished_only:  # a request finishes with the step that finishes one of its sequences
            ended = dict.fromkeys(s.request_id for s in recorded if s.status is done)
            return [self._emit(touched[r]) for r in ended if all(s.status is done for s in touched[r].seqs)]
        return [self._emit(r) for r in touched.values()]

    def _token_masks(self) -> TokenMasks:
        if self._masks is None:
            self._masks = TokenMasks(self.model_config.vocab_size, self.eos_token_ids, self.device)
        return self._masks

    def _advance_grammars(self, sampling: list[Sequence], tokens: list[int], mask: TokenMask,
                          live: list[bool]) -> None:
        for k, reason in advance_matchers([s.engine_state.matcher for s in sampling], tokens, mask).items():
            seq = sampling[k]
            if not live[k]:  # ended (aborted) while the step ran: its token is dropped
                continue
            if reason == "abort":
                log.warning("request %s: its grammar allows no token of this vocabulary after %d tokens; ended "
                            "with finish_reason 'abort'", seq.request_id, len(seq.output_token_ids) - 1)
                seq.engine_state.dead_end = True
            self._end(seq, reason)

    def _end(self, seq: Sequence, reason: str) -> None:
        """Finish `seq` with `reason`, or give it that reason if this step already finished it."""
        if seq.is_finished:
            seq.finish_reason = reason  # e.g. "length" on the very token that ended the grammar
        else:
            self.scheduler.finish(seq, reason)

    def _update_texts(self, seqs: list[Sequence]) -> None:
        """Detokenize the sequences that recorded a token this step, together (one batch
        decode per skip_special_tokens setting), then check their stop strings. A sequence
        whose text is deferred only says how many of its ids the text covers."""
        groups: dict[bool, list[Sequence]] = {}
        eos = self.eos_token_ids
        for seq in seqs:
            st: _SeqState = seq.engine_state
            ids = seq.output_token_ids
            n = len(ids) - st.dead_end  # the EOS a grammar's dead end was given is no output
            if n and seq.finish_reason == "stop" and (ids[n - 1] in eos or ids[n - 1] in seq.params.stop_token_ids):
                n -= 1  # the EOS or stop token that ended it has no text
            elif n and st.inline:
                groups.setdefault(seq.params.skip_special_tokens, []).append(seq)
                continue
            if not st.inline:
                st.out.text_ids = n
            if seq.status is SeqStatus.FINISHED:
                st.out.finish_reason = seq.finish_reason
        for skip, group in groups.items():
            items = [(s.engine_state.detok, s.output_token_ids) for s in group]
            ends = [len(s.output_token_ids) - s.engine_state.dead_end for s in group]
            for seq, new in zip(group, self.detok.step_many(items, skip, ends)):
                st = seq.engine_state
                o = st.out
                if new:
                    o._append_text(new)
                    st.unsent += new
                if stop := seq.params.stop:
                    window = st.tail + new  # a stop string ending in the new text begins in here
                    if (hit := find_stop(window, len(st.tail), stop)) is not None:
                        cut = len(window) - hit[0]  # characters to drop from the end
                        text = o.text
                        o.text = text[: len(text) - cut]
                        st.unsent = st.unsent[: max(0, len(st.unsent) - cut)]
                        if seq.status is not SeqStatus.FINISHED:
                            self.scheduler.finish(seq, "stop")
                        else:
                            seq.finish_reason = "stop"
                    else:
                        st.tail = window[len(window) - st.tail_len :] if st.tail_len else ""
                if seq.status is SeqStatus.FINISHED:
                    o.finish_reason = seq.finish_reason

    def _emit(self, req: _Request) -> RequestOutput:
        finished = True
        outs = []
        for s in req.seqs:
            st: _SeqState = s.engine_state
            delta, st.unsent = st.unsent, ""
            if s.status is not SeqStatus.FINISHED:
                finished = False
                if delta and s.params.stop:  # while running, hold back a tail that may become a stop string
                    keep = min(held_back(st.tail, s.params.stop), len(delta))
                    if keep:
                        delta, st.unsent = delta[: len(delta) - keep], delta[len(delta) - keep :]
            outs.append(CompletionOutput._snapshot(st.out, st.tokens_sent, delta))
            st.tokens_sent = len(st.out._ids)
        metrics = {"arrival": req.arrival, "first_token_time": req.first_token_time,
                   "cached_tokens": req.seqs[0].num_cached_tokens}
        if finished:
            self.requests.pop(req.request_id, None)
            for f in self.finish_hooks:
                f(req.request_id, len(req.prompt_ids), sum(len(s.output_token_ids) for s in req.seqs))
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


from mixq.engine.llm import LLM  # noqa: E402,F401  (the synchronous API, on top of LLMEngine; also this module's name)
