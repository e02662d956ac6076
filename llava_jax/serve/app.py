"""The FastAPI application: OpenAI-compatible routes over an `Engine`, and the chat page.

    GET  /                      the web chat page (static/index.html; no CDN, works offline)
    GET  /health                status, slots in use, queue length, counters
    GET  /v1/models             the one model served
    POST /v1/chat/completions   OpenAI chat completions; `stream: true` answers with
                                server-sent events (chat.completion.chunk ... data: [DONE])

Errors are OpenAI's body (`{"error": {"message", "type", "param", "code"}}`) with a 4xx
status for anything the client sent (protocol.py), 503 when the queue is full, 404 / 405 for
unknown routes and methods. A streaming client that disconnects cancels its request (its
slot is free before the next decode step); so does a non-streaming one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from llava_jax.inference.engine import (Engine, EngineRequest, Failed, Finished,
                                        QueueFullError, TextDelta)
from llava_jax.serve.protocol import APIError, ServerLimits, parse_chat_request

PAGE = Path(__file__).resolve().parent / "static" / "index.html"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _error_response(error: APIError) -> JSONResponse:
    headers = {"Retry-After": "1"} if error.status == 503 else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def _usage(event: Finished) -> dict:
    return {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens,
            "total_tokens": event.prompt_tokens + event.completion_tokens}


def create_app(engine: Engine, limits: ServerLimits, tokenizer, *, manage_engine: bool = True
               ) -> FastAPI:
    """The app. With `manage_engine`, the engine thread starts and stops with the app."""
    config = engine.model.config
    started = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        if manage_engine:
            engine.start()
        try:
            yield
        finally:
            if manage_engine:
                engine.stop()

    app = FastAPI(title="llava_jax", lifespan=lifespan, docs_url=None, redoc_url=None)

    @app.exception_handler(APIError)
    async def api_error(_request, error: APIError):
        return _error_response(error)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, error: StarletteHTTPException):
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return _error_response(APIError(error.status_code, str(error.detail), type=kind))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request, error: RequestValidationError):
        return _error_response(APIError(400, str(error)))

    @app.exception_handler(Exception)
    async def server_error(_request, error: Exception):
        return _error_response(APIError(500, f"internal error: {type(error).__name__}: {error}"))

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": limits.model_id, "active": engine.active,
                "queued": engine.queued, "max_batch": engine.max_batch,
                "max_queue": engine.max_queue, "context": limits.context,
                "max_tokens": limits.max_tokens, "max_images": limits.max_images,
                "template": limits.template, "stats": dict(engine.stats)}

    def model_card() -> dict:
        return {"id": limits.model_id, "object": "model", "created": started,
                "owned_by": "llava_jax"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != limits.model_id:
            raise APIError(404, f"the model {model_id!r} does not exist.", param="model",
                           code="model_not_found", type="not_found_error")
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise APIError(400, f"the request body is not valid JSON: {error}") from None
        # Tokenizing and decoding images take milliseconds to seconds: off the event loop.
        chat = await run_in_threadpool(parse_chat_request, body, limits, tokenizer, config)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job = EngineRequest(chat.prompt_ids, chat.pixel_values, max_new_tokens=chat.max_tokens,
                            temperature=chat.temperature, top_p=chat.top_p, seed=chat.seed,
                            stop=chat.stop, ignore_eos=chat.ignore_eos,
                            on_event=lambda event: loop.call_soon_threadsafe(
                                events.put_nowait, event))
        try:
            engine.submit(job)
        except QueueFullError as error:
            raise APIError(503, str(error), code="queue_full", type="server_error") from None
        except ValueError as error:
            raise APIError(400, str(error), param="messages") from None
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if chat.stream:
            stream = _sse(job, events, completion_id, created, limits.model_id,
                          chat.include_usage)
            return StreamingResponse(stream, media_type="text/event-stream", headers=SSE_HEADERS)
        return await _complete(request, job, events, completion_id, created, limits.model_id)

    return app


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _complete(request, job, events, completion_id, created, model_id):
    async def finished():
        while True:
            event = await events.get()
            if isinstance(event, (Finished, Failed)):
                return event

    answer = asyncio.ensure_future(finished())
    gone = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not answer.done():
            answer.cancel()
            job.cancel()
    if not answer.done() or answer.cancelled():
        return JSONResponse({}, status_code=499)  # nobody is listening any more
    event = answer.result()
    if isinstance(event, Failed):
        raise APIError(500, event.message)
    return {"id": completion_id, "object": "chat.completion", "created": created,
            "model": model_id, "system_fingerprint": None,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": event.text},
                         "logprobs": None, "finish_reason": event.reason}],
            "usage": _usage(event)}


def _chunk(completion_id, created, model_id, delta, finish_reason=None) -> str:
    body = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
            "model": model_id, "system_fingerprint": None,
            "choices": [{"index": 0, "delta": delta, "logprobs": None,
                         "finish_reason": finish_reason}]}
    return f"data: {json.dumps(body)}\n\n"


async def _sse(job, events, completion_id, created, model_id, include_usage):
    """The event stream of one request; closing it (client gone) cancels the request."""
    try:
        yield _chunk(completion_id, created, model_id, {"role": "assistant", "content": ""})
        while True:
            event = await events.get()
            if isinstance(event, TextDelta):
                yield _chunk(completion_id, created, model_id, {"content": event.text})
            elif isinstance(event, Finished):
                yield _chunk(completion_id, created, model_id, {}, event.reason)
                if include_usage:
                    usage = {"id": completion_id, "object": "chat.completion.chunk",
                             "created": created, "model": model_id, "choices": [],
                             "usage": _usage(event)}
                    yield f"data: {json.dumps(usage)}\n\n"
                yield "data: [DONE]\n\n"
                return
            else:  # Failed: the status line has gone out already, so the error goes in-band
                yield f"data: {json.dumps(APIError(500, event.message).body())}\n\n"
                yield "data: [DONE]\n\n"
                return
    finally:
        job.cancel()  # a no-op once finished
