"""The HTTP side of ``blockdiff serve``: a FastAPI app with OpenAI's routes over one ``Engine``.

``GET /health``, ``GET /v1/models``, ``POST /v1/completions`` and ``POST /v1/chat/completions``. A streamed response
(``"stream": true``) is server-sent events, **one finished block per event** (its text for one choice, possibly empty
while a partial character or a possible stop string is held back; on a speculative server one verification step's
committed tokens per event, never a draft), then a last event per choice with its ``finish_reason``, the usage event
when ``stream_options.include_usage`` asks for it, and ``data: [DONE]``. A client that goes away cancels its jobs:
they leave their batch after the current block (a speculative job after the current verification step).

Every error is OpenAI-shaped (``{"error": {"message", "type", "param", "code"}}``), also those FastAPI raises itself
(404 unknown route, 405 wrong method, 422 validation) and a bug's 500. A body over ``max_body_bytes`` is refused
(413) before it is read in full.
"""

from __future__ import annotations

import asyncio
import json
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from blockdiff.serving.deltas import TextDeltas
from blockdiff.serving.engine import Engine, Finished, Job
from blockdiff.serving.protocol import (
    APIError,
    chunk_body,
    completion_body,
    parse_request,
    speculative_usage,
    usage_body,
)

__all__ = ["create_app"]

POLL = 0.25  # seconds between checks that the client is still there
FINISH = {"eos": "stop", "stop_string": "stop", "max_new_tokens": "length", "max_length": "length",
          "cancelled": "stop"}  # generation's stop reason -> finish_reason (max_length: the verifier's context is full)
MAX_BODY_BYTES = 1 << 20  # default request body limit (1 MiB: 64 prompts of 16 KB each)
HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


def create_app(engine: Engine, max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The app over ``engine``; request bodies over ``max_body_bytes`` get a 413."""
    app = FastAPI(title="blockdiff", description="OpenAI-compatible block-diffusion LM server")
    app.state.max_body_bytes = max_body_bytes
    started = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError):
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, err: HTTPException):
        message = f"{request.method} {request.url.path}: {err.detail}"
        return JSONResponse(APIError(err.status_code, message, None, HTTP_CODES.get(err.status_code)).body(),
                            status_code=err.status_code, headers=getattr(err, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {}
        param = ".".join(str(x) for x in first.get("loc", ())[1:]) or None
        return JSONResponse(APIError(422, f"invalid request: {first.get('msg', err)}", param, "invalid_value").body(),
                            status_code=422)

    @app.exception_handler(Exception)
    async def _bug(request: Request, err: Exception):  # a bug answers in the API's shape, never a bare 500 page
        return JSONResponse(APIError(500, f"internal error: {type(err).__name__}", None, "internal_error",
                                     "server_error").body(), status_code=500)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": engine.name, **engine.stats()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": engine.name, "object": "model", "created": started,
                                            "owned_by": "blockdiff"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _generate(engine, request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _generate(engine, request, chat=True)

    return app


async def _body(request: Request) -> bytes:
    """The request body, read no further than the app's ``max_body_bytes`` (413 past it)."""
    limit = request.app.state.max_body_bytes
    too_large = APIError(413, f"the request body is over this server's limit of {limit} bytes (--max-body-bytes): "
                         "send fewer or shorter prompts per request", None, "request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


async def _generate(engine: Engine, request: Request, chat: bool):
    try:
        body = json.loads(await _body(request) or b"null")
    except (ValueError, RecursionError) as err:  # bad JSON or UTF-8, an integer of > 4300 digits, deep nesting
        raise APIError(400, f"the request body is not valid JSON: {type(err).__name__}: {str(err)[:200]}") from None
    req = parse_request(body, chat, engine.name)
    queue: asyncio.Queue = asyncio.Queue()
    jobs = engine.prepare(req, queue, asyncio.get_running_loop())
    engine.submit(jobs)
    deltas = [_deltas(engine, req, job) for job in jobs]
    if req.stream:
        return StreamingResponse(_events(engine, request, req, jobs, queue, deltas), media_type="text/event-stream")
    finished = await _collect(request, jobs, queue)
    if finished is None:  # the client left; nobody reads this
        return JSONResponse({"error": {"message": "client disconnected"}}, status_code=499)
    texts = [d.text(f.tokens) for d, f in zip(deltas, finished)]
    usage = _usage(jobs, finished)
    return JSONResponse(completion_body(req, engine.name, texts, [FINISH[f.reason] for f in finished], usage))


def _deltas(engine: Engine, req, job: Job) -> TextDeltas:
    settings = job.settings  # resolved once, in Engine.prepare
    return TextDeltas(engine.tokenizer, settings.max_new_tokens, req.stop, set(settings.eos_ids),
                      getattr(job.model, "mask_token_id", None))  # None: speculative, the verifier writes every token


def _usage(jobs: list[Job], finished: list[Finished]) -> dict:
    completion = sum(len(f.tokens) for f in finished)
    counts = [f.speculative for f in finished if f.speculative is not None]
    speculative = speculative_usage(counts, completion) if counts else None
    return usage_body(sum(len(j.ids) for j in jobs), completion, sum(f.nfe for f in finished), speculative)


async def _next(request: Request, queue: asyncio.Queue):
    """The next event, or ``None`` once the client has disconnected."""
    while True:
        try:
            return await asyncio.wait_for(queue.get(), POLL)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                return None


async def _collect(request: Request, jobs: list[Job], queue: asyncio.Queue) -> list[Finished] | None:
    done: dict[int, Finished] = {}
    try:
        while len(done) < len(jobs):
            event = await _next(request, queue)
            if event is None:
                return None
            index, kind, payload = event
            if kind == "error":
                raise payload
            if kind == "done":
                done[index] = payload
        return [done[i] for i in range(len(jobs))]
    finally:
        Engine.cancel(jobs)  # no-op for finished jobs; stops the others (client gone, or an error)


def _sse(body) -> str:
    return f"data: {json.dumps(body)}\n\n"


async def _events(engine: Engine, request: Request, req, jobs: list[Job], queue: asyncio.Queue, deltas):
    finished: dict[int, Finished] = {}
    first = [True] * len(jobs)
    try:
        while len(finished) < len(jobs):
            event = await _next(request, queue)
            if event is None:
                return
            index, kind, payload = event
            if kind == "error":
                yield _sse(payload.body())
                return
            if kind == "block":
                text = deltas[index].block(payload)
                yield _sse(chunk_body(req, engine.name, index, text, role=req.chat and first[index]))
            else:
                finished[index] = payload
                text = deltas[index].finish(payload.tokens)
                yield _sse(chunk_body(req, engine.name, index, text, FINISH[payload.reason],
                                      role=req.chat and first[index]))
            first[index] = False
        if req.include_usage:
            yield _sse(chunk_body(req, engine.name, 0, "", usage=_usage(jobs, [finished[i] for i in
                                                                                range(len(jobs))])))
        yield "data: [DONE]\n\n"
    finally:
        Engine.cancel(jobs)
