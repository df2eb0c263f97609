"""OpenAI-compatible and SGLang-native HTTP API on FastAPI.

A request is checked whole before the engine sees it: its shape by pydantic
(mixq.server.protocol), its sampling values by `SamplingParams` (the same checks the
Python API and `mixq generate` run), its prompt against the context length (tokenized on
a worker thread, never on the event loop). Request ids are the server's own. A client
that goes away, streaming or not, has its request aborted and its KV blocks freed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from mixq.engine.engine import RequestOutput
from mixq.engine.sampling_params import SamplingParamError, SamplingParams
from mixq.server.async_engine import AsyncEngine, EngineStopped
from mixq.server.errors import APIError, error_body, error_response, validation_message
from mixq.server.metrics import ServerMetrics
from mixq.server.middleware import RequestGuard, ServerState
from mixq.server.protocol import ChatCompletionRequest, CompletionRequest, GenerateRequest

log = logging.getLogger("mixq.server")


@dataclass
class ServerLimits:
    """What one request (and all of them together) may ask; flags in mixq.server.args."""

    max_request_body_bytes: int = 16 * 2**20
    max_n: int = 16
    max_in_flight: int | None = None  # requests admitted and unfinished; None: no limit


def build_app(aengine: AsyncEngine, metrics: ServerMetrics, served_model_name: str, server_info: dict,
              api_key: str | None = None, allow_auto_truncate: bool = False,
              expert_stats_dir: str | None = None, limits: ServerLimits | None = None,
              state: ServerState | None = None) -> FastAPI:
    engine = aengine.engine
    tok = engine.tokenizer
    limits = limits or ServerLimits()
    state = state or ServerState()
    app = FastAPI(title="mixq", version="0.1.0")
    app.state.mixq = state
    app.add_middleware(RequestGuard, api_key=api_key, max_body_bytes=limits.max_request_body_bytes, state=state)
    # one worker: tokenizer calls never run concurrently with each other (HF tokenizers are
    # not safe to share across threads), and never on the event loop
    tokenize_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mixq-tokenize")
    limit = engine.max_model_len
    # no token covers more characters than the longest vocabulary entry (x4 for what a
    # normalizer may fold): a longer text cannot fit the context, and is not tokenized
    max_token_chars = max(1, max((len(t) for t in tok.get_vocab()), default=1))
    max_prompt_chars = 4 * max_token_chars * limit
    # each route's body model, whose field descriptions word the 400s (expert routes add theirs)
    app.state.body_models = {"/v1/completions": CompletionRequest, "/v1/chat/completions": ChatCompletionRequest,
                             "/generate": GenerateRequest}

    @app.exception_handler(APIError)
    async def _api_error(_, e: APIError):
        return error_response(e.status, e.message, e.type, e.param, e.code)

    @app.exception_handler(SamplingParamError)
    async def _param_error(_, e: SamplingParamError):
        return error_response(400, str(e), param=e.param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_, e: StarletteHTTPException):  # unknown route, wrong method, body too large
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(e.status_code)
        return error_response(e.status_code, str(e.detail), code=code)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError):
        message, param = validation_message(list(e.errors()), request.app.state.body_models.get(request.url.path),
                                            request.scope.get("route"))
        return error_response(400, message, param=param)

    @app.exception_handler(Exception)
    async def _unexpected(_, e: Exception):  # a bug: answered as JSON (Starlette logs its traceback)
        return error_response(500, f"internal error: {type(e).__name__}", "server_error")

    def check_model(name: str | None) -> None:
        if name is not None and name != served_model_name:
            raise APIError(404, f"The model '{name}' does not exist; this server serves '{served_model_name}'",
                           code="model_not_found", param="model")

    def too_long(n_tokens: int) -> APIError:
        return APIError(400, f"This model's maximum context length is {limit} tokens; the prompt has {n_tokens} "
                             f"tokens (at most {limit - 1}, to leave room for output)", param="prompt",
                        code="context_length_exceeded")

    async def on_tokenizer(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(tokenize_pool, fn, *args)

    async def prompt_ids(prompt: str | list[int], params: SamplingParams, explicit_max: bool = False) -> list[int]:
        """The prompt's ids, checked against the context. A max_tokens the request set
        must fit beside the prompt (vLLM's rule; left unset, generation stops at the context
        with finish_reason "length"). With --allow-auto-truncate (SGLang's meaning) a long
        prompt keeps its last context - 1 tokens and max_tokens is clipped to what is left."""
        if isinstance(prompt, str):
            if len(prompt) > max_prompt_chars:
                if not allow_auto_truncate:
                    raise APIError(400, f"This model's maximum context length is {limit} tokens; a prompt of "
                                        f"{len(prompt)} characters cannot fit", param="prompt",
                                   code="context_length_exceeded")
                prompt = prompt[-max_prompt_chars:]  # only the tail can be kept: tokenize only it
            ids = await on_tokenizer(engine.encode, prompt)
        else:
            ids = list(prompt)
        if not ids:
            raise APIError(400, "the prompt is empty: give at least one token", param="prompt")
        if len(ids) + 1 > limit:
            if not allow_auto_truncate:
                raise too_long(len(ids))
            ids = ids[-(limit - 1):]
        if explicit_max and len(ids) + params.max_new_tokens > limit:
            if not allow_auto_truncate:
                raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you "
                                    f"requested {len(ids) + params.max_new_tokens} tokens ({len(ids)} in the prompt, "
                                    f"{params.max_new_tokens} in the completion). Reduce the length of the prompt "
                                    "or of max_tokens.", param="max_tokens", code="context_length_exceeded")
            params.max_new_tokens = limit - len(ids)
            params.min_new_tokens = min(params.min_new_tokens, params.max_new_tokens)
        return ids

    async def run(rid: str, ids: list[int], params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Admit a request; returns its outputs once the engine has queued it (the
        engine's refusal is a 400 before anything is sent)."""
        if not aengine.alive:
            raise APIError(503, "the engine is not running", "server_error")
        if limits.max_in_flight is not None and aengine.num_in_flight >= limits.max_in_flight:
            raise APIError(503, "The request queue is full.", "server_error", code="queue_full")
        gen = aengine.generate(rid, ids, params)
        try:
            first = await gen.__anext__()
        except SamplingParamError as e:  # the grammar compiler's refusal: named as the request named it
            raise params.renamed(e) from None
        except ValueError as e:
            raise APIError(400, str(e)) from None
        except EngineStopped as e:
            raise APIError(503, str(e), "server_error") from None

        async def rest():
            try:
                yield first
                async for o in gen:
                    yield o
            finally:
                await gen.aclose()

        return rest()

    async def until_disconnected(request: Request) -> None:
        """Returns when the client goes away (the body was read: only http.disconnect remains)."""
        while (await request.receive())["type"] != "http.disconnect":
            pass

    async def final_output(stream, request: Request) -> RequestOutput:
        """The last output of a non-streaming request; abort it if the client goes away."""
        async def consume():
            last = None
            async for o in stream:
                last = o
            return last

        work = asyncio.ensure_future(consume())
        gone = asyncio.ensure_future(until_disconnected(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not work.done():  # the client left: cancelling the consumer aborts the request
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
            raise APIError(499, "the client closed the connection", code="client_closed_request")
        try:
            return work.result()
        except EngineStopped as e:
            raise APIError(503, str(e), "server_error") from None

    def usage(o: RequestOutput) -> dict:
        c = sum(len(x.token_ids) for x in o.outputs)
        return {"prompt_tokens": len(o.prompt_token_ids), "completion_tokens": c,
                "total_tokens": len(o.prompt_token_ids) + c}

    def completion_logprobs(c) -> dict | None:
        if not c.logprobs:
            return None
        toks = [tok.decode([t]) for t in c.token_ids]
        tops = [{tok.decode([t]): lp for t, lp in top} for top in c.top_logprobs] if c.top_logprobs else None
        offsets, pos = [], 0
        for t in toks:
            offsets.append(pos)
            pos += len(t)
        return {"tokens": toks, "token_logprobs": c.logprobs, "top_logprobs": tops, "text_offset": offsets}

    def chat_logprobs(c) -> dict | None:
        if not c.logprobs:
            return None
        content = []
        for i, t in enumerate(c.token_ids):
            s = tok.decode([t])
            top = c.top_logprobs[i] if c.top_logprobs else []
            content.append({"token": s, "logprob": c.logprobs[i], "bytes": list(s.encode()),
                            "top_logprobs": [{"token": tok.decode([a]), "logprob": b,
                                              "bytes": list(tok.decode([a]).encode())} for a, b in top]})
        return {"content": content}

    def sse(obj) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    async def stream_sse(stream, make_chunks, final_usage):
        """Server-sent events; a request the engine cannot finish (shutdown, failure) ends
        with an error event, and every stream ends with [DONE]."""
        last = None
        try:
            async for o in stream:
                last = o
                for chunk in make_chunks(o):
                    yield sse(chunk)
            if final_usage and last is not None:
                yield sse(final_usage(last))
        except EngineStopped as e:
            yield sse(error_body(503, str(e), code="engine_stopped"))
        finally:
            await stream.aclose()
        yield "data: [DONE]\n\n"

    def streaming(gen) -> StreamingResponse:
        return StreamingResponse(gen, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    def include_usage(req) -> bool:
        return bool(req.stream_options and req.stream_options.include_usage)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        check_model(req.model)
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            if len(prompt) != 1:
                raise APIError(400, "batched prompts are not supported; send one prompt per request", param="prompt")
            prompt = prompt[0]
        params = req.sampling_params(limits.max_n)
        ids = await prompt_ids(prompt, params, req.explicit_max_tokens)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        stream = await run(rid, ids, params)
        base = {"id": rid, "object": "text_completion", "created": created, "model": served_model_name}
        if req.stream:
            def chunks(o):
                for c in o.outputs:
                    if c.delta_text or c.finish_reason:
                        yield {**base, "choices": [{"index": c.index, "text": c.delta_text, "logprobs": None,
                                                    "finish_reason": c.finish_reason}]}
            final = (lambda o: {**base, "choices": [], "usage": usage(o)}) if include_usage(req) else None
            return streaming(stream_sse(stream, chunks, final))
        final = await final_output(stream, request)
        echo = await on_tokenizer(tok.decode, ids) if req.echo else ""
        return {**base, "choices": [{"index": c.index, "text": echo + c.text, "logprobs": completion_logprobs(c),
                                     "finish_reason": c.finish_reason} for c in final.outputs],
                "usage": usage(final)}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest, request: Request):
        check_model(req.model)
        params = req.sampling_params(limits.max_n)
        messages = []
        for m in req.messages:
            content = m.content
            if isinstance(content, list):
                content = "".join(p.text or "" for p in content if p.type == "text")
            messages.append({"role": m.role, "content": content or ""})
        excess = sum(len(m["content"]) for m in messages) - max_prompt_chars
        if excess > 0:
            if not allow_auto_truncate:
                raise APIError(400, f"This model's maximum context length is {limit} tokens; messages of "
                                    f"{excess + max_prompt_chars} characters cannot fit", param="messages",
                               code="context_length_exceeded")
            for m in messages:  # only the tail can be kept: drop text from the oldest messages
                cut = min(excess, len(m["content"]))
                m["content"], excess = m["content"][cut:], excess - cut

        def render(msgs) -> list[int]:
            text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=req.add_generation_prompt)
            return tok.encode(text, add_special_tokens=False)

        try:
            chat_ids = await on_tokenizer(render, messages)
        except Exception as e:  # jinja errors: the request's messages do not fit the template
            raise APIError(400, f"cannot apply the chat template to messages: {e}", param="messages") from None
        ids = await prompt_ids(chat_ids, params, req.explicit_max_tokens)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        stream = await run(rid, ids, params)
        base = {"id": rid, "created": created, "model": served_model_name}
        if req.stream:
            started: set[int] = set()

            def chunks(o):
                for c in o.outputs:
                    delta = {}
                    if c.index not in started:
                        started.add(c.index)
                        delta["role"] = "assistant"
                    if c.delta_text:
                        delta["content"] = c.delta_text
                    if delta or c.finish_reason:
                        yield {**base, "object": "chat.completion.chunk", "choices": [
                            {"index": c.index, "delta": delta, "logprobs": None, "finish_reason": c.finish_reason}]}
            final = ((lambda o: {**base, "object": "chat.completion.chunk", "choices": [], "usage": usage(o)})
                     if include_usage(req) else None)
            return streaming(stream_sse(stream, chunks, final))
        final = await final_output(stream, request)
        return {**base, "object": "chat.completion", "choices": [
            {"index": c.index, "message": {"role": "assistant", "content": c.text}, "logprobs": chat_logprobs(c),
             "finish_reason": c.finish_reason} for c in final.outputs], "usage": usage(final)}

    @app.post("/generate")
    async def generate(req: GenerateRequest, request: Request):
        if (req.text is None) == (req.input_ids is None):
            raise APIError(400, "give exactly one of 'text' or 'input_ids'", param="text")
        params = req.params(limits.max_n)
        ids = await prompt_ids(req.text if req.text is not None else req.input_ids, params)
        rid = uuid.uuid4().hex  # the server's id; the client's rid is only echoed back
        shown = req.rid if req.rid is not None else rid
        stream = await run(rid, ids, params)

        def body(o: RequestOutput, c) -> dict:
            return {"text": c.text, "output_ids": c.token_ids, "index": c.index, "meta_info": {
                "id": shown, "prompt_tokens": len(o.prompt_token_ids), "completion_tokens": len(c.token_ids),
                "finish_reason": {"type": c.finish_reason} if c.finish_reason else None}}

        if req.stream:  # one event per choice that progressed, each with its index
            def chunks(o):
                return [body(o, c) for c in o.outputs if c.delta_token_ids or c.finish_reason]
            return streaming(stream_sse(stream, chunks, None))
        final = await final_output(stream, request)
        bodies = [body(final, c) for c in final.outputs]
        return bodies[0] if params.n == 1 else bodies  # SGLang: a list, one per sample, when n > 1

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served_model_name, "object": "model", "created": 0,
                                            "owned_by": "mixq", "max_model_len": engine.max_model_len}]}

    @app.get("/health")
    async def health():
        return Response(status_code=200 if aengine.alive else 503)

    @app.get("/get_model_info")
    async def model_info():
        return {"model_path": str(engine.plan.base.path), "tokenizer_path": engine.tokenizer.name_or_path,
                "is_generation": True, "served_model_name": served_model_name,
                "architecture": engine.model_config.architecture}

    @app.get("/get_server_info")
    async def server_info_route():
        blocks = engine.scheduler.blocks
        return {**server_info, "max_model_len": engine.max_model_len, "kv_blocks": blocks.num_blocks,
                "page_size": blocks.block_size, "device": str(engine.device),
                "dtype": str(engine.dtype).removeprefix("torch."),
                # the load right now: idle means kv_blocks_used 0 and no request anywhere
                "kv_blocks_used": blocks.num_used, "num_running_requests": len(engine.scheduler.running),
                "num_waiting_requests": len(engine.scheduler.waiting),
                "num_requests_in_flight": aengine.num_in_flight, "num_engine_requests": len(engine.requests)}

    @app.get("/metrics")
    async def prom():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/memory_stats")
    async def memory_stats():
        from mixq.tracking.memory import MemoryStats

        return {**MemoryStats.from_weights(engine.weights).as_dict(), "kv_cache": engine.kv_cache_stats()}

    from mixq.server.expert_routes import add_expert_routes

    add_expert_routes(app, aengine, expert_stats_dir)  # /expert_stats*, SGLang's expert distribution record
    return app
