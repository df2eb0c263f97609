"""The engine on its own thread, so the HTTP event loop never blocks on the model.

Requests and aborts cross into the engine thread through a queue; each step's outputs
come back to the event loop through `call_soon_threadsafe` into per-request asyncio
queues. A request whose client is gone is aborted, which frees its KV blocks at once.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import Future

from mixq.engine.engine import LLMEngine, RequestOutput
from mixq.engine.sampling_params import SamplingParams

log = logging.getLogger("mixq.server")


class AsyncEngine:
    def __init__(self, engine: LLMEngine, on_step=None):
        self.engine = engine
        self.on_step = on_step  # called in the engine thread after every step: (outputs, seconds)
        self._cmds: queue.Queue = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mixq-engine", daemon=True)
        self.error: BaseException | None = None

    def start(self) -> None:
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Abort what is in flight and stop the thread."""
        self._stop.set()
        self._cmds.put(("wake",))
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    # -- event-loop side --------------------------------------------------------------

    async def generate(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs as they come; abort it if the consumer goes away.
        ValueError (bad request) is raised before the first output."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        done: Future = Future()
        self._streams[request_id] = (loop, q)
        self._cmds.put(("add", request_id, prompt, params, done))
        finished = False
        try:
            await asyncio.wrap_future(done)  # raises the engine's ValueError, if any
            while not finished:
                item = await q.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            self._streams.pop(request_id, None)
            if not finished:  # client gone, cancelled or failed: free its blocks now
                self._cmds.put(("abort", request_id))

    def abort(self, request_id: str) -> None:
        self._cmds.put(("abort", request_id))

    async def call(self, fn):
        """Run `fn()` on the engine thread between two steps and return its result (or
        raise its exception): for state the engine thread owns, e.g. device counters."""
        if not self.alive:
            raise RuntimeError("the engine is not running")
        done: Future = Future()
        self._cmds.put(("call", fn, done))
        return await asyncio.wrap_future(done)

    # -- engine-thread side -----------------------------------------------------------

    def _deliver(self, request_id: str, item) -> None:
        entry = self._streams.get(request_id)
        if entry is not None:
            loop, q = entry
            loop.call_soon_threadsafe(q.put_nowait, item)

    def _handle(self, cmd) -> None:
        if cmd[0] == "add":
            _, rid, prompt, params, done = cmd
            try:
                self.engine.add_request(rid, prompt, params)
            except ValueError as e:
                done.set_exception(e)
            else:
                done.set_result(None)
        elif cmd[0] == "abort":
            self.engine.abort(cmd[1])
        elif cmd[0] == "call":
            _, fn, done = cmd
            try:
                done.set_result(fn())
            except Exception as e:  # handed to the caller; the engine keeps serving
                done.set_exception(e)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
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
                if self.on_step is not None:
                    self.on_step(outputs, time.perf_counter() - t0)
                for o in outputs:
                    self._deliver(o.request_id, o)
        except BaseException as e:  # a crashed engine must fail every waiting request, loudly
            log.exception("engine thread crashed")
            self.error = e
            for rid in list(self._streams):
                self._deliver(rid, RuntimeError(f"engine failed: {e}"))
        finally:
            for rid in list(self.engine.requests):
                self.engine.abort(rid)
            while True:  # nobody will run what is still queued: fail its waiters
                try:
                    cmd = self._cmds.get_nowait()
                except queue.Empty:
                    break
                if cmd[0] in ("add", "call") and not cmd[-1].done():
                    cmd[-1].set_exception(RuntimeError("the engine stopped"))
