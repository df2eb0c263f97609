"""Structured outputs: JSON-schema and regex constraints (SamplingParams.json_schema/regex)
through xgrammar, the grammar library SGLang and vLLM use.

Three stages, each where it costs nothing to the others:
- **Compile** (`GrammarBackend.compile`): the schema or regex becomes a `CompiledGrammar`
  for this tokenizer (its token masks precomputed per grammar state). The server runs it on
  a worker thread before it queues the request (mixq.server.async_engine), so neither the
  event loop nor the engine thread waits on it, and a grammar the library refuses is a 400
  naming the field. Compiled grammars are cached by (field, text), as SGLang does: requests
  with the same schema compile it once (a second one waits for the first compile).
- **Match**: every sequence (each of n) has its own `GrammarMatcher`, advanced on the host
  with the ids the sampler already brought back (its one sync per step). A preempted
  sequence keeps its matcher: its output ids are kept and recomputing the prompt never
  samples them again.
- **Mask** (`TokenMasks.fill`, `apply_token_mask`): after the step's forward is queued the
  bitmask rows of the constrained sequences are filled on the host (xgrammar's batch fill,
  several threads) while the device computes, copied to the device from pinned memory
  without a sync, and applied to the logits in the sampler (xgrammar's Triton kernel on
  CUDA, its C++ kernel on the CPU): outside any CUDA graph, on the sampler's own copy.

When the grammar is complete the matcher allows only the stop (EOS) tokens; a sequence
whose matcher accepted one has reached the grammar's end and finishes with "stop", whatever
`ignore_eos` or `min_new_tokens` say. JSON is generated compact (no free whitespace: a
model cannot loop on blanks), with `, ` and `: ` separators.
"""

from __future__ import annotations

import logging
import re
import threading
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np
import torch

from mixq.engine.sampling_params import SamplingParamError, SamplingParams

log = logging.getLogger("mixq.engine")

# compiled grammars kept for reuse (their precomputed masks; ~50 KiB to a few MiB each)
MAX_CACHED_BYTES = 256 * 2**20
_WHAT = {"json_schema": "a JSON schema", "regex": "a regular expression"}
# xgrammar's C++ errors begin "[12:59:29] /project/cpp/json_schema_converter.cc:5082: "
_CPP_PREFIX = re.compile(r"^\s*\[[0-9:]+\]\s+\S+:\d+:\s*")


def xgrammar(field: str | None = None):
    """The xgrammar module (a runtime dependency of mixq). Missing, a request that asks for a
    constraint gets a SamplingParamError naming its field (a 400), never a traceback."""
    try:
        import xgrammar as xgr
    except ImportError as e:
        msg = f"structured outputs need the xgrammar package, which is not installed ({e}): pip install xgrammar"
        if field is None:
            raise RuntimeError(msg) from None
        raise SamplingParamError(field, f"{field}: {msg}") from None
    return xgr


def _library_message(e: Exception) -> str:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    msg = _CPP_PREFIX.sub("", lines[0]) if lines else type(e).__name__
    return msg if len(msg) <= 300 else msg[:297] + "..."


@dataclass(frozen=True)
class Grammar:
    """A compiled constraint: `key` is the request's (field, text) (`SamplingParams.constraint`)."""

    key: tuple[str, str]
    compiled: object  # xgrammar.CompiledGrammar


class GrammarBackend:
    """Compiles constraints for one tokenizer and hands out matchers. Thread-safe: the
    server compiles on worker threads while the engine thread makes matchers.

    tokenizer: the HF tokenizer; vocab_size: the model's (the logits' width, which may pad
    the tokenizer's; ids past the tokenizer's are never allowed); stop_token_ids: the
    engine's EOS ids, the only tokens a complete grammar allows.
    """

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: tuple[int, ...]):
        self.tokenizer, self.vocab_size, self.stop_token_ids = tokenizer, vocab_size, tuple(stop_token_ids)
        self._lock = threading.Lock()
        self._compiler = None  # built on first use: importing xgrammar and reading the vocabulary cost ~1 s
        self._cache: OrderedDict[tuple[str, str], Future] = OrderedDict()
        self._bytes: dict[tuple[str, str], int] = {}

    def _xgr_compiler(self, field: str):
        with self._lock:
            if self._compiler is None:
                xgr = xgrammar(field)

                info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size,
                                                          stop_token_ids=list(self.stop_token_ids))
                # our cache, not xgrammar's: it is bounded and shares one compile between waiters
                self._compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)
            return self._compiler

    @property
    def cached_bytes(self) -> int:
        return sum(self._bytes.values())

    def compile(self, params: SamplingParams) -> Grammar | None:
        """The compiled constraint of `params` (None when it has none), from the cache or
        compiled now (blocking: call it off the event loop and the engine thread). Raises
        SamplingParamError naming the field when the library refuses the schema or regex, or
        when no token of this vocabulary can begin the output it allows."""
        key = params.constraint
        if key is None:
            return None
        with self._lock:
            fut = self._cache.get(key)
            owner = fut is None
            if owner:
                fut = self._cache[key] = Future()
            else:
                self._cache.move_to_end(key)
        if owner:
            try:
                grammar = self._compile(key)
            except BaseException as e:
                with self._lock:  # a refusal is not kept: bad requests cost no memory
                    if self._cache.get(key) is fut:
                        del self._cache[key]
                fut.set_exception(e)
                raise
            fut.set_result(grammar)
            self._account(key, grammar)
        return fut.result()

    def _compile(self, key: tuple[str, str]) -> Grammar:
        field, text = key
        compiler = self._xgr_compiler(field)
        try:
            if field == "json_schema":
                compiled = compiler.compile_json_schema(text, any_whitespace=False)
            else:
                compiled = compiler.compile_regex(text)
        except (RuntimeError, ValueError) as e:  # the library's refusal of the request's text
            raise SamplingParamError(field, f"{field} is not {_WHAT[field]} the grammar library (xgrammar) "
                                     f"accepts: {_library_message(e)}") from None
        grammar = Grammar(key, compiled)
        # a vocabulary may lack what the output must start with (a word-level one has no "{"):
        # refused here rather than left to a first step that could pick nothing
        mask = TokenMasks.empty_rows(self.vocab_size, 1)
        self.matcher(grammar).fill_next_token_bitmask(mask, 0)
        if not mask.numpy().any():
            raise SamplingParamError(field, f"{field}: no token of this model's vocabulary can begin the output "
                                     "it allows")
        return grammar

    def _account(self, key, grammar: Grammar) -> None:
        with self._lock:
            if self._cache.get(key) is None:
                return
            self._bytes[key] = grammar.compiled.memory_size_bytes
            while sum(self._bytes.values()) > MAX_CACHED_BYTES and len(self._bytes) > 1:
                old = next(k for k in self._cache if k in self._bytes and k != key)  # least recently used
                del self._cache[old], self._bytes[old]

    def matcher(self, grammar: Grammar):
        """A fresh matcher (one per sequence) at the grammar's start."""
        xgr = xgrammar()

        return xgr.GrammarMatcher(grammar.compiled)


@dataclass
class TokenMask:
    """The allowed tokens of a step's constrained rows, on the logits' device.

    bitmask: [rows, ceil(vocab / 32)] int32, bit j of word w allows token 32 w + j (xgrammar's
    layout), rows aligned with the sampler's; indices: [C] int32, the constrained rows;
    dead: rows whose grammar allows no token of this vocabulary (given the EOS ids instead)."""

    bitmask: torch.Tensor
    indices: torch.Tensor
    rows: list[int]
    dead: list[int]


class TokenMasks:
    """Fills a step's token mask on the host and moves it to the device without a sync.

    The host buffers are pinned on CUDA and reused every step: the copy of step t is queued
    before the sampler's read of step t's ids, which waits for it, so step t+1 never
    overwrites a buffer still being copied."""

    def __init__(self, vocab_size: int, eos_ids: tuple[int, ...], device: torch.device):
        self.vocab_size, self.device = vocab_size, torch.device(device)
        self.words = -(-vocab_size // 32)
        self.eos_ids = [t for t in eos_ids if t < vocab_size]
        self._host = self._index = None
        self._batch = None

    @staticmethod
    def empty_rows(vocab_size: int, rows: int, pin: bool = False) -> torch.Tensor:
        return torch.zeros((rows, -(-vocab_size // 32)), dtype=torch.int32, pin_memory=pin)

    def _buffers(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._host is None or self._host.shape[0] < rows:
            pin = self.device.type == "cuda"
            size = max(rows, 2 * (0 if self._host is None else self._host.shape[0]), 8)
            self._host = self.empty_rows(self.vocab_size, size, pin)
            self._index = torch.zeros(size, dtype=torch.int32, pin_memory=pin)
        return self._host, self._index

    def fill(self, matchers: list) -> TokenMask | None:
        """The mask of one step: `matchers` has one entry per sampling row, a GrammarMatcher
        or None (unconstrained). None when no row is constrained."""
        rows = [i for i, m in enumerate(matchers) if m is not None]
        if not rows:
            return None
        xgr = xgrammar()

        if self._batch is None:
            self._batch = xgr.BatchGrammarMatcher(max_threads=2)
        host, index = self._buffers(rows[-1] + 1)
        self._batch.batch_fill_next_token_bitmask([matchers[i] for i in rows], host, rows)
        # the host copy is read with numpy: no torch host read, which on CUDA would be a sync
        words = host.numpy()
        dead = [i for i in rows if not words[i].any()]
        for i in dead:  # nothing can follow: only EOS, and the engine ends the sequence
            for t in self.eos_ids:
                words.view(np.uint32)[i, t // 32] |= np.uint32(1 << (t % 32))
        index.numpy()[: len(rows)] = rows
        n = rows[-1] + 1
        if self.device.type == "cpu":  # the sampler applies it before the next fill: no copy needed
            return TokenMask(host[:n], index[: len(rows)], rows, dead)
        return TokenMask(host[:n].to(self.device, non_blocking=True),
                         index[: len(rows)].to(self.device, non_blocking=True), rows, dead)


def advance_matchers(matchers: list, tokens: list[int], mask: TokenMask) -> dict[int, str]:
    """Advance the matchers of a step's constrained rows with their sampled ids. Returns the
    rows that must finish: "stop" where the grammar reached its end (accepted a stop token),
    "abort" where it had allowed nothing (the row was given EOS, not the grammar's)."""
    ends = {}
    for k in mask.rows:
        if k in mask.dead:
            ends[k] = "abort"
        elif not matchers[k].accept_token(tokens[k]):  # the mask allowed it: a bug, not the request's fault
            raise RuntimeError(f"sampled token {tokens[k]} is outside the grammar's mask of row {k}")
        elif matchers[k].is_terminated():
            ends[k] = "stop"
    return ends


def apply_token_mask(logits: torch.Tensor, mask: TokenMask) -> None:
    """Set the logits of disallowed tokens to -inf, in place, on the logits' device (no host
    sync): logits [R, V] float32 contiguous, R >= the mask's rows."""
    xgr = xgrammar()

    if logits.dtype != torch.float32 or not logits.is_contiguous():
        raise ValueError(f"token mask: logits must be contiguous float32, got {logits.dtype}")
    # on the CPU the row list as it is (xgrammar's C++ kernel would read a tensor back to a list)
    indices = mask.rows if logits.device.type == "cpu" else mask.indices
    xgr.apply_token_bitmask_inplace(logits, mask.bitmask, vocab_size=logits.shape[1], indices=indices)
