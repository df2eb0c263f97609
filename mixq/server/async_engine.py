"""The engine on its own thread, so the HTTP event loop never blocks on the model.

Requests and aborts cross into the engine thread through a queue. Each step's outputs go
to a second thread, the detokenizer (`mixq-detok`, SGLang's detokenizer process and vLLM's
output processor split the work the same way), which turns the token ids of requests
without stop strings into text (`mixq.engine.detokenizer.TextStage`, one batch decode per
step; the Rust decode releases the GIL) and hands the outputs to the event loop through
`call_soon_threadsafe` into per-request asyncio queues, in the order the engine made them.
The engine thread only samples, checks stop tokens and lengths, and moves on; a request
with stop strings is detokenized on the engine thread, which must see the text to stop
it. A request whose client is gone is aborted, which frees its KV blocks at once.

A bad request can never stop the thread: `add_request` checks everything before it queues
anything, and any exception it raises goes back to that request's caller only. A
structured-output grammar is compiled before the request is handed over, on a worker
thread of its own (`mixq-grammar`), so neither the event loop nor the steps of the other
requests wait for it; a grammar the library refuses is raised to the caller (a 400). Only an
exception inside a step (a bug or a device failure) ends the thread; then every waiting
request fails with `EngineStopped` (after the outputs made before it) and `/health`
answers 503; so does an exception in the detokenizer thread. The detokenizer thread ends
after the engine thread, once it has delivered what the engine made.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import Future, ThreadPoolExecutor

from mixq.engine.detokenizer import IncrementalDetokenizer, TextStage
from mixq.engine.engine import LLMEngine, RequestOutput
from mixq.engine.sampling_params import SamplingParams

log = logging.getLogger("mixq.server")


class EngineStopped(RuntimeError):
    """The request could not finish: the engine failed or the server is shutting down."""


class AsyncEngine:
    def __init__(self, engine: LLMEngine, metrics=None):
        self.engine = engine
        # engine-thread hooks: metrics.on_step(outputs, seconds), metrics.on_abort(request_id, n_ended)
        self.metrics = metrics
        self._cmds: queue.Queue = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mixq-engine", daemon=True)
        # the engine's outputs, in order, with ("open"|"close"|"fail", ...) between them; None ends it
        self._texts: queue.Queue = queue.Queue()
        self._detok_thread = threading.Thread(target=self._detokenize, name="mixq-detok", daemon=True)
        self.stage: TextStage | None = None
        if hasattr(engine, "set_defer_text"):  # a local engine or a DP replica: text is made here
            engine.set_defer_text(True)
            self.stage = TextStage(engine.detok if hasattr(engine, "detok") else IncrementalDetokenizer(engine.tokenizer))
        self.error: BaseException | None = None
        # compiles share the CPU with the steps: two at a time (xgrammar uses 2 threads in each)
        self._grammar_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="mixq-grammar")

    def start(self) -> None:
        self._detok_thread.start()
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Abort what is in flight and stop both threads (the engine thread ends the
        detokenizer's when it exits)."""
        self._stop.set()
        self._cmds.put(("wake",))
        t0 = time.monotonic()
        self._thread.join(timeout)
        if self._detok_thread.ident is not None:  # started
            self._detok_thread.join(max(0.1, timeout - (time.monotonic() - t0)))
        self._grammar_pool.shutdown(wait=False)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self._detok_thread.is_alive() and self.error is None

    @property
    def num_in_flight(self) -> int:
        """Requests admitted and not yet finished (running, queued or being added)."""
        return len(self._streams)

    # -- event-loop side --------------------------------------------------------------

    async def generate(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs as they come; abort it if the consumer goes away.
        The engine's refusal (ValueError: a bad request; other exceptions: an add that
        failed; SamplingParamError: a grammar the library refuses) is raised before the first
        output, with nothing queued; EngineStopped when the engine stops before the request
        ends."""
        if request_id in self._streams:  # never touch the request that holds the id
            raise ValueError(f"request id {request_id!r} is already in use")
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        done: Future = Future()
        self._streams[request_id] = (loop, q)  # in flight from here: counted by the server's limits
        added = finished = False
        try:
            grammar = None
            if params.constraint is not None:  # compiled (or found in the cache) off the loop and the engine
                grammar = await loop.run_in_executor(self._grammar_pool, self.engine.grammar.compile, params)
                if not self.alive:  # it stopped while the grammar compiled: nobody would take the add
                    raise EngineStopped("the engine is not running")
            self._cmds.put(("add", request_id, prompt, params, grammar, done))
            await asyncio.wrap_future(done)  # raises the engine's refusal, if any
            added = True
            while not finished:
                item = await q.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            self._streams.pop(request_id, None)
            # client gone, cancelled or failed: free its blocks now. Cancelled while being
            # added: the add is skipped, or (already taken by the engine thread) aborted after it
            if (added and not finished) or (not added and not done.cancel()):
                self._cmds.put(("abort", request_id))

    def abort(self, request_id: str) -> None:
        self._cmds.put(("abort", request_id))

    def fail_all(self, message: str) -> int:
        """End every request in flight with EngineStopped(message) and abort it in the
        engine (event-loop side; used when the server stops). Returns how many."""
        n = 0
        for rid, (loop, q) in list(self._streams.items()):
            loop.call_soon_threadsafe(q.put_nowait, EngineStopped(message))
            self._cmds.put(("abort", rid))
            n += 1
        return n

    async def call(self, fn):
        """Run `fn()` on the engine thread between two steps and return its result (or
        raise its exception): for state the engine thread owns, e.g. device counters."""
        if not self.alive:
            raise RuntimeError("the engine is not running")
        done: Future = Future()
        self._cmds.put(("call", fn, done))
        return await asyncio.wrap_future(done)

    # -- detokenizer-thread side ------------------------------------------------------

    def _deliver(self, request_id: str, item) -> None:
        entry = self._streams.get(request_id)
        if entry is not None:
            loop, q = entry
            loop.call_soon_threadsafe(q.put_nowait, item)

    def _detokenize(self) -> None:
        """Text for each step's outputs, then hand them to their streams, in order."""
        try:
            while (item := self._texts.get()) is not None:
                if isinstance(item, list):  # one step's outputs
                    if self.stage is not None:
                        self.stage.fill(item)
                    for o in item:
                        self._deliver(o.request_id, o)
                elif item[0] == "open":
                    self.stage.open(item[1], item[2])
                elif item[0] == "close":
                    self.stage.close(item[1])
                elif item[0] == "fail":  # the engine thread crashed: after what it made, fail the rest
                    for rid in list(self._streams):
                        self._deliver(rid, EngineStopped(item[1]))
        except BaseException as e:  # like an engine crash: fail every waiting request, loudly
            log.exception("detokenizer thread crashed")
            self.error = e
            for rid in list(self._streams):
                self._deliver(rid, EngineStopped(f"detokenizer failed: {type(e).__name__}: {e}"))
            self._cmds.put(("wake",))  # the engine thread sees the error and stops

    # -- engine-thread side -----------------------------------------------------------

    def _handle(self, cmd) -> None:
        if cmd[0] == "add":
            _, rid, prompt, params, grammar, done = cmd
            if not done.set_running_or_notify_cancel():
                return  # its caller went away before it was added
            try:
                self.engine.add_request(rid, prompt, params, grammar)
            except ValueError as e:
                done.set_exception(e)
            except Exception as e:  # not the request's fault, but only this request fails
                log.exception("adding request %s failed", rid)
                done.set_exception(e)
            else:
                if self.stage is not None:  # before its first output
                    self._texts.put(("open", rid, params.skip_special_tokens))
                done.set_result(None)
        elif cmd[0] == "abort":
            ended = self.engine.abort(cmd[1])
            if self.stage is not None:
                self._texts.put(("close", cmd[1]))
            if ended and self.metrics is not None:
                self.metrics.on_abort(cmd[1], int(ended))
        elif cmd[0] == "call":
            _, fn, done = cmd
            if not done.set_running_or_notify_cancel():
                return
            try:
                done.set_result(fn())
            except Exception as e:  # handed to the caller; the engine keeps serving
                done.set_exception(e)

    def _run(self) -> None:
        try:
            while not self._stop.is_set() and self.error is None:
                block = not self.engine.has_unfinished()
                try:
                    cmd = self._cmds.get(timeout=0.5) if block else self._cmds.get_nowait()
                    self._handle(cmd)
                    while True:  # drain whatever else arrived
                        self._handle(self._cmds.get_nowait())
                except queue.Empty:
                    pass
                if not self.engine.has_unfinished():
                    continue
                t0 = time.perf_counter()
                outputs = self.engine.step()
                if self.metrics is not None:
                    self.metrics.on_step(outputs, time.perf_counter() - t0)
                if outputs:
                    self._texts.put(outputs)
        except BaseException as e:  # a crashed engine must fail every waiting request, loudly
            log.exception("engine thread crashed")
            self.error = e
            self._texts.put(("fail", f"engine failed: {type(e).__name__}: {e}"))
        finally:
            self._texts.put(None)  # the detokenizer thread ends once it has delivered the rest
            for rid in list(self.engine.requests):
                self.engine.abort(rid)
            while True:  # nobody will run what is still queued: fail its waiters
                try:
                    cmd = self._cmds.get_nowait()
                except queue.Empty:
                    break
                if cmd[0] in ("add", "call") and not cmd[-1].done():
                    cmd[-1].set_exception(EngineStopped("the engine stopped"))
