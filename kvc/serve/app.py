"""The ASGI app: OpenAI's chat and text completions (plain and streamed), models, health and metrics.

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /v1/models/{id},
GET /health, GET /metrics, and with a save folder POST /slots/save and /slots/restore (a
conversation's KV cache to a session file and back into the prefix cache; POST /slots/{id}?action=
save|restore, llama.cpp's route, is the same). Every response is JSON, server-sent events (streams) or, for /metrics,
Prometheus text; errors are OpenAI's error object. Requests go to an `Engine` (BatchEngine: continuous
batching on a paged KV cache): beyond its running sequences they wait in its queue, and beyond the
queue's size get 503. A client that disconnects, streaming or not, cancels its request: a waiting
one leaves the queue, a running one stops before its next step and frees its KV blocks.
"""
from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from sse_starlette import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..pool import PoolFull
from . import metrics, protocol
from .engine import (ChoiceFinished, Engine, EngineClosed, GenerationRequest, QueueFull, RequestFailed,
                     RequestFinished, RequestHandle, SlotResult, TextDelta)
from .protocol import APIError, ParsedRequest
from .responses import Reply, usage

log = logging.getLogger("kvc.serve")  # a line per finished request, at INFO
MAX_BODY_BYTES = 16 * 2**20  # a request body beyond this gets 413
PING_SECONDS = 15  # an SSE comment line this often keeps idle streams (a long queue wait) open


def create_app(engine: Engine, *, max_body_bytes: int = MAX_BODY_BYTES, slot_save_path: str | None = None) -> FastAPI:
    """The server's ASGI app, answering with engine. The caller owns engine (and closes it).
    slot_save_path: the folder of /slots' session files (None: those routes answer 501)."""
    app = FastAPI(title="kvc", summary="An OpenAI-compatible server for kvc models", docs_url="/docs",
                  redoc_url=None)
    app.state.engine = engine
    started = int(time.time())

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed"}
        message = (f"unknown route {request.method} {request.url.path}" if exc.status_code in codes
                   else str(exc.detail))
        err = APIError(exc.status_code, message, code=codes.get(exc.status_code))
        return JSONResponse(err.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        err = APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error")
        return JSONResponse(err.body(), status_code=500)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        m = engine.metrics()
        return {"status": "ok", "parallel": m.parallel, "requests_running": m.requests_running,
                "requests_waiting": m.requests_waiting}

    def model_card() -> dict[str, Any]:
        return {"id": engine.model_name, "object": "model", "created": started, "owned_by": "kvc",
                "context_length": engine.context_length}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        if model_id != engine.model_name:
            raise APIError(404, f"The model {model_id!r} does not exist (this server has {engine.model_name!r})",
                           param="model", code="model_not_found")
        return model_card()

    @app.get("/metrics")
    async def get_metrics() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(engine.metrics()), media_type=metrics.CONTENT_TYPE)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = protocol.parse_json(await _read_body(request, max_body_bytes))
        return await _answer(request, engine, protocol.parse_chat(body), chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = protocol.parse_json(await _read_body(request, max_body_bytes))
        return await _answer(request, engine, protocol.parse_completion(body), chat=False)

    async def slot(request: Request, action: str) -> dict[str, Any]:
        if slot_save_path is None:
            raise APIError(501, "saving is off: this server was started without --slot-save-path",
                           type="not_supported_error", code="slots_disabled")
        body = protocol.parse_json(await _read_body(request, max_body_bytes))
        return await _slot(engine, body, action, slot_save_path)

    @app.post("/slots/save")
    async def slot_save(request: Request) -> dict[str, Any]:
        return await slot(request, "save")

    @app.post("/slots/restore")
    async def slot_restore(request: Request) -> dict[str, Any]:
        return await slot(request, "restore")

    @app.post("/slots/{slot_id}")
    async def slot_action(request: Request, slot_id: str, action: str | None = None) -> dict[str, Any]:
        """llama.cpp's route: the id names no slot here (there are none), it only has to be an integer."""
        if not re.fullmatch(r"[0-9]+", slot_id):
            raise protocol.bad(f"the slot id must be an integer, got {slot_id!r}", param="id_slot")
        if action not in ("save", "restore"):
            raise protocol.bad(f"action must be save or restore, got {action!r}", param="action",
                               code="unsupported_value")
        return {"id_slot": int(slot_id), **await slot(request, action)}

    return app


async def _prompt_tokens(engine: Engine, generation: GenerationRequest, param: str) -> list[int]:
    """The prompt's tokens as the engine runs them; 400 when it cannot run them."""
    try:
        tokens = await anyio.to_thread.run_sync(engine.prompt_tokens, generation)
    except ValueError as e:  # e.g. a model without a chat template
        raise protocol.bad(str(e), param=param) from None
    protocol.check_prompt_length(len(tokens), engine.context_length, param)
    return tokens


async def _slot(engine: Engine, body: dict[str, Any], action: str, folder: str) -> dict[str, Any]:
    """Save a conversation's cache to folder/filename, or restore one into the prefix cache, on the
    engine's thread; llama.cpp's answer."""
    filename = protocol.slot_filename(body, saving=action == "save")
    path = os.path.join(folder, filename)
    param = "filename"  # what a ValueError blames: the file, or (saving) the conversation
    try:
        if action == "save":
            generation, param = protocol.parse_slot_save(body)
            future = engine.save_slot(await _prompt_tokens(engine, generation, param), path)
        else:
            future = engine.restore_slot(path)
        result: SlotResult = await asyncio.wrap_future(future)
    except FileNotFoundError:
        raise APIError(404, f"there is no saved file {filename!r}", param="filename", code="file_not_found") from None
    except ValueError as e:  # it can never fit, or the file is not one this server reads
        raise protocol.bad(str(e).replace(path, filename), param=param) from None
    except PoolFull as e:
        raise APIError(503, f"the KV cache has too few free blocks now: {e}", type="server_error",
                       code="kv_cache_full") from None
    except EngineClosed as e:
        raise APIError(503, str(e), type="server_error", code="shutting_down") from None
    except OSError as e:
        raise APIError(500, str(e).replace(path, filename), type="server_error") from None
    if action == "save":
        return {"filename": filename, "n_saved": result.tokens, "n_written": result.bytes,
                "timings": {"save_ms": result.seconds * 1e3}}
    return {"filename": filename, "n_restored": result.tokens, "n_read": result.bytes,
            "timings": {"restore_ms": result.seconds * 1e3}}


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 past limit bytes (before reading it all)."""
    too_big = APIError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


async def _answer(request: Request, engine: Engine, parsed: ParsedRequest, chat: bool) -> Response:
    """Check the prompt's length, queue the request, and answer: streamed or whole."""
    tokens = await _prompt_tokens(engine, parsed.generation, "messages" if chat else "prompt")
    try:
        handle = engine.submit(parsed.generation, tokens)
    except QueueFull as e:
        raise APIError(503, str(e), type="server_error", code="queue_full") from None
    except EngineClosed as e:
        raise APIError(503, str(e), type="server_error", code="shutting_down") from None
    reply = Reply(chat=chat, model=engine.model_name)
    if parsed.stream:
        return _EventStream(handle, _stream(handle, reply, parsed.include_usage), sep="\n", ping=PING_SECONDS)
    try:
        return await _whole(request, handle, reply)
    finally:
        handle.cancel()  # a no-op once the request finished


async def _whole(request: Request, handle: RequestHandle, reply: Reply) -> Response:
    """The complete response, once every choice ended. A disconnect meanwhile cancels the request."""
    n = handle.request.n
    texts: list[list[str]] = [[] for _ in range(n)]
    finishes: list[str] = ["length"] * n
    result: dict[str, Any] | None = None
    failure: RequestFailed | None = None

    async def watch_disconnect(scope: anyio.CancelScope) -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        handle.cancel()
        scope.cancel()

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(watch_disconnect, tasks.cancel_scope)
        async for event in handle.events():
            if isinstance(event, TextDelta):
                texts[event.index].append(event.text)
            elif isinstance(event, ChoiceFinished):
                finishes[event.index] = event.finish_reason
            elif isinstance(event, RequestFinished):
                _log_finished(reply, event, finishes)
                result = reply.complete([("".join(t), f) for t, f in zip(texts, finishes)],
                                        usage(event.prompt_tokens, event.completion_tokens, event.cached_tokens))
            elif isinstance(event, RequestFailed):
                failure = event
        tasks.cancel_scope.cancel()
    if failure is not None:
        raise _failure(failure)
    if result is None:  # the client went away: nobody reads this
        return Response(status_code=499)
    return JSONResponse(result)


class _EventStream(EventSourceResponse):
    """Server-sent events that cancel their request however the response ends, even one whose
    stream never started (the client was gone before the headers went out)."""

    def __init__(self, handle: RequestHandle, content: AsyncIterator[str], **kw: Any):
        super().__init__(content, **kw)
        self._handle = handle

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._handle.cancel()


def _log_finished(reply: Reply, event: RequestFinished, finishes: list[str]) -> None:
    """One line per request: tokens, time and speed, as llama-server prints them."""
    if not log.isEnabledFor(logging.INFO):
        return
    speed = event.completion_tokens / event.decode_seconds if event.decode_seconds > 0 else 0.0
    log.info("%s: prompt %d tokens (%d cached) in %.3f s, %d generated in %.3f s (%.1f tok/s), finish %s",
             reply.id, event.prompt_tokens, event.cached_tokens, event.prefill_seconds, event.completion_tokens,
             event.decode_seconds, speed, ",".join(finishes))


def _failure(event: RequestFailed) -> APIError:
    if event.bad_request:
        return protocol.bad(event.message)
    return APIError(500, event.message, type="server_error")


async def _stream(handle: RequestHandle, reply: Reply, include_usage: bool) -> AsyncIterator[str]:
    """The response as server-sent events' data, as OpenAI sends it: per choice (one after another) a
    first chunk with the role (chat), content chunks, a chunk with the finish_reason; with
    include_usage a last chunk with the usage; then [DONE]. An error after the start is sent as an
    event holding OpenAI's error object, which ends the stream. Leaving early (the client went away)
    cancels the request."""
    dumps = protocol.dumps
    begun = -1  # the last choice whose first chunk was sent
    finishes: list[str] = []

    def begin(index: int) -> list[str]:
        nonlocal begun
        out = []
        while begun < index:
            begun += 1
            if reply.chat:  # the role chunk, as OpenAI's first chunk of each choice
                out.append(dumps(reply.chunk(begun, "", role=True, usage_field=include_usage)))
        return out

    try:
        for data in begin(0):
            yield data
        async for event in handle.events():
            if isinstance(event, TextDelta):
                for data in begin(event.index):
                    yield data
                yield dumps(reply.chunk(event.index, event.text, usage_field=include_usage))
            elif isinstance(event, ChoiceFinished):
                for data in begin(event.index):
                    yield data
                text = None if reply.chat else ""
                finishes.append(event.finish_reason)
                yield dumps(reply.chunk(event.index, text, event.finish_reason, usage_field=include_usage))
            elif isinstance(event, RequestFinished):
                _log_finished(reply, event, finishes)
                if include_usage:
                    yield dumps(reply.usage_chunk(usage(event.prompt_tokens, event.completion_tokens,
                                                        event.cached_tokens)))
            elif isinstance(event, RequestFailed):
                yield dumps(_failure(event).body())
                return
        yield "[DONE]"
    finally:
        handle.cancel()
