"""OpenAI-compatible and SGLang-native HTTP API on FastAPI."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from mixq.engine.engine import RequestOutput
from mixq.engine.sampling_params import SamplingParams
from mixq.server.async_engine import AsyncEngine
from mixq.server.metrics import ServerMetrics
from mixq.server.protocol import ChatCompletionRequest, CompletionRequest, GenerateRequest


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def _error(status: int, message: str, type_: str = "invalid_request_error", param=None, code=None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status)


def build_app(aengine: AsyncEngine, metrics: ServerMetrics, served_model_name: str, server_info: dict,
              api_key: str | None = None, allow_auto_truncate: bool = False,
              expert_stats_dir: str | None = None) -> FastAPI:
    engine = aengine.engine
    tok = engine.tokenizer
    app = FastAPI(title="mixq", version="0.1.0")
    open_paths = {"/health", "/metrics"}

    @app.middleware("http")
    async def auth(request: Request, call_next):
        if api_key and request.url.path not in open_paths:
            if request.headers.get("authorization", "") != f"Bearer {api_key}":
                return _error(401, "invalid or missing API key", "authentication_error", code="invalid_api_key")
        return await call_next(request)

    @app.exception_handler(APIError)
    async def _api_error(_, e: APIError):
        return _error(e.status, e.message, e.type, e.param, e.code)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_, e: StarletteHTTPException):  # unknown route, wrong method: OpenAI's error JSON
        return _error(e.status_code, str(e.detail), "invalid_request_error" if e.status_code < 500 else "server_error",
                      code="not_found" if e.status_code == 404 else None)

    @app.exception_handler(RequestValidationError)
    async def _validation(_, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        if first.get("type") == "json_invalid":
            return _error(400, f"malformed JSON body: {first.get('msg')}")
        loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return _error(400, f"{loc}: {first.get('msg')}" if loc else str(first.get("msg")), param=loc or None)

    def check_model(name: str | None) -> None:
        if name is not None and name != served_model_name:
            raise APIError(404, f"The model '{name}' does not exist; this server serves '{served_model_name}'",
                           code="model_not_found", param="model")

    def to_params(req, logprobs: int | None) -> SamplingParams:
        d = {"max_new_tokens": req.max_completion_tokens or req.max_tokens or 16,
             "temperature": 1.0 if req.temperature is None else req.temperature,
             "top_p": req.top_p, "top_k": req.top_k, "min_p": req.min_p, "n": req.n, "stop": req.stop,
             "stop_token_ids": req.stop_token_ids, "seed": req.seed, "presence_penalty": req.presence_penalty,
             "frequency_penalty": req.frequency_penalty, "repetition_penalty": req.repetition_penalty,
             "ignore_eos": req.ignore_eos, "logprobs": logprobs}
        try:
            return SamplingParams.from_dict(d)
        except ValueError as e:
            raise APIError(400, str(e)) from None

    def prompt_ids(prompt: str | list[int], params: SamplingParams, explicit_max: bool = False) -> list[int]:
        """The prompt's ids, checked against the context. A max_tokens the request set
        must fit beside the prompt (vLLM's rule; left unset, generation stops at the context
        with finish_reason "length"). With --allow-auto-truncate (SGLang's meaning) a long
        prompt keeps its last context - 1 tokens and max_tokens is clipped to what is left."""
        ids = engine.encode(prompt)
        limit = engine.max_model_len
        if len(ids) + 1 > limit:
            if not allow_auto_truncate:
                raise APIError(400, f"This model's maximum context length is {limit} tokens; the prompt has "
                                    f"{len(ids)} tokens", param="prompt", code="context_length_exceeded")
            ids = ids[-(limit - 1):]
        if explicit_max and len(ids) + params.max_new_tokens > limit:
            if not allow_auto_truncate:
                raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you "
                                    f"requested {len(ids) + params.max_new_tokens} tokens ({len(ids)} in the prompt, "
                                    f"{params.max_new_tokens} in the completion). Reduce the length of the prompt "
                                    "or of max_tokens.", param="max_tokens", code="context_length_exceeded")
            params.max_new_tokens = limit - len(ids)
        return ids

    async def run(rid: str, ids: list[int], params: SamplingParams) -> AsyncIterator[RequestOutput]:
        if not aengine.alive:
            raise APIError(503, "the engine is not running", "server_error")
        gen = aengine.generate(rid, ids, params)
        try:
            first = await gen.__anext__()
        except ValueError as e:
            raise APIError(400, str(e)) from None

        async def rest():
            try:
                yield first
                async for o in gen:
                    yield o
            finally:
                await gen.aclose()

        return rest()

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
        last = None
        try:
            async for o in stream:
                last = o
                for chunk in make_chunks(o):
                    yield sse(chunk)
            if final_usage and last is not None:
                yield sse(final_usage(last))
            yield "data: [DONE]\n\n"
        finally:
            await stream.aclose()

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        check_model(req.model)
        if isinstance(req.prompt, list) and req.prompt and not isinstance(req.prompt[0], int):
            if len(req.prompt) != 1:
                raise APIError(400, "batched prompts are not supported; send one prompt per request", param="prompt")
            req.prompt = req.prompt[0]
        params = to_params(req, req.logprobs)
        ids = prompt_ids(req.prompt, params, (req.max_completion_tokens or req.max_tokens) is not None)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        stream = await run(rid, ids, params)
        echo = tok.decode(ids) if req.echo else ""
        base = {"id": rid, "object": "text_completion", "created": created, "model": served_model_name}
        if req.stream:
            def chunks(o):
                for c in o.outputs:
                    if c.delta_text or c.finish_reason:
                        yield {**base, "choices": [{"index": c.index, "text": c.delta_text, "logprobs": None,
                                                    "finish_reason": c.finish_reason}]}
            inc = (req.stream_options or {}).get("include_usage")
            final = (lambda o: {**base, "choices": [], "usage": usage(o)}) if inc else None
            return StreamingResponse(stream_sse(stream, chunks, final), media_type="text/event-stream")
        final = None
        async for o in stream:
            final = o
        return {**base, "choices": [{"index": c.index, "text": echo + c.text, "logprobs": completion_logprobs(c),
                                     "finish_reason": c.finish_reason} for c in final.outputs],
                "usage": usage(final)}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest):
        check_model(req.model)
        messages = [m.model_dump(exclude_none=True) for m in req.messages]
        for m in messages:
            if isinstance(m.get("content"), list):
                m["content"] = "".join(p.get("text", "") for p in m["content"] if p.get("type") == "text")
        try:
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=req.add_generation_prompt)
        except Exception as e:  # jinja errors: the request's messages do not fit the template
            raise APIError(400, f"cannot apply the chat template: {e}", param="messages") from None
        params = to_params(req, (req.top_logprobs or 0) if req.logprobs else None)
        ids = prompt_ids(tok.encode(text, add_special_tokens=False), params,
                         (req.max_completion_tokens or req.max_tokens) is not None)
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
            inc = (req.stream_options or {}).get("include_usage")
            final = (lambda o: {**base, "object": "chat.completion.chunk", "choices": [], "usage": usage(o)}) if inc else None
            return StreamingResponse(stream_sse(stream, chunks, final), media_type="text/event-stream")
        final = None
        async for o in stream:
            final = o
        return {**base, "object": "chat.completion", "choices": [
            {"index": c.index, "message": {"role": "assistant", "content": c.text}, "logprobs": chat_logprobs(c),
             "finish_reason": c.finish_reason} for c in final.outputs], "usage": usage(final)}

    @app.post("/generate")
    async def generate(req: GenerateRequest):
        if (req.text is None) == (req.input_ids is None):
            raise APIError(400, "give exactly one of 'text' or 'input_ids'")
        try:
            params = SamplingParams.from_dict(req.sampling_params)
        except (ValueError, TypeError) as e:
            raise APIError(400, str(e), param="sampling_params") from None
        ids = prompt_ids(req.text if req.text is not None else req.input_ids, params)
        rid = req.rid or uuid.uuid4().hex
        stream = await run(rid, ids, params)

        def body(o: RequestOutput) -> dict:
            c = o.outputs[0]
            return {"text": c.text, "output_ids": c.token_ids, "meta_info": {
                "id": rid, "prompt_tokens": len(o.prompt_token_ids), "completion_tokens": len(c.token_ids),
                "finish_reason": {"type": c.finish_reason} if c.finish_reason else None}}

        if req.stream:
            return StreamingResponse(stream_sse(stream, lambda o: [body(o)], None), media_type="text/event-stream")
        final = None
        async for o in stream:
            final = o
        return body(final)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served_model_name, "object": "model", "created": 0,
                                            "owned_by": "mixq", "max_model_len": engine.max_model_len}]}

    @app.get("/health")
    async def health():
        if not aengine.alive:
            return Response(status_code=503)
        return Response(status_code=200)

    @app.get("/get_model_info")
    async def model_info():
        return {"model_path": str(engine.plan.base.path), "tokenizer_path": engine.tokenizer.name_or_path,
                "is_generation": True, "served_model_name": served_model_name,
                "architecture": engine.model_config.architecture}

    @app.get("/get_server_info")
    async def server_info_route():
        return {**server_info, "max_model_len": engine.max_model_len, "kv_blocks": engine.scheduler.blocks.num_blocks,
                "page_size": engine.scheduler.blocks.block_size, "device": str(engine.device),
                "dtype": str(engine.dtype).removeprefix("torch.")}

    @app.get("/metrics")
    async def prom():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/memory_stats")
    async def memory_stats():
        from mixq.tracking.memory import MemoryStats

        return {**MemoryStats.from_weights(engine.weights).as_dict(), "kv_cache": engine.kv_cache_stats()}

    @app.exception_handler(ValidationError)
    async def _pyd(_, e: ValidationError):
        return _error(400, str(e))

    from mixq.server.expert_routes import add_expert_routes

    add_expert_routes(app, aengine, expert_stats_dir)  # /expert_stats*, SGLang's expert distribution record
    return app
