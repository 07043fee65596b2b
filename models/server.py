"""``pagemem serve``'s ASGI app (FastAPI): OpenAI's completions and chat completions over one engine.

    POST /v1/completions        POST /v1/chat/completions     (``stream: true``: server-sent events)
    GET  /v1/models             GET  /health                  GET /metrics (Prometheus text format)
    GET  /debug/pool            (only with ``debug=True``: checks the pool's and host swap's integrity)

Handlers parse and validate the body, tokenize (in the thread pool), hand the call to the
EngineLoop and move its Deltas to the client; they never touch the engine. A client that goes
away (a closed stream, or a dropped connection while a plain response is being made) cancels
its call: the engine aborts its requests before its next step and their pages go back to the
pool. Errors are OpenAI's error body: 400 for a bad request, 404 for another model's name, 503
with ``Retry-After`` while the waiting queue is full, 500 if an engine step failed.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from pagemem.models.server_engine import EngineFailure, EngineLoop, Job, QueueFull
from pagemem.models.server_format import SSE_DONE, Reply, sse
from pagemem.models.server_metrics import CONTENT_TYPE
from pagemem.models.server_protocol import (APIError, ChatRequest, CompletionRequest, Limits, chat_specs,
                                            completion_specs, parse, stream_usage)

log = logging.getLogger("pagemem.serve")
RETRY_AFTER_S = 1
_GONE = object()          # put on a call's event queue when its client disconnects


@dataclass(slots=True)
class ServerConfig:
    """What the app serves: the model's name, its limits, a chat template to use instead of
    the model's (None: the model's own), and whether the debug endpoint exists."""

    model_name: str
    limits: Limits
    chat_template: str | None = None
    debug: bool = False


def create_app(engine: EngineLoop, config: ServerConfig) -> FastAPI:
    """The app; it starts ``engine``'s thread on start-up and stops it on shutdown."""
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        await run_in_threadpool(engine.stop)

    app = FastAPI(title="pagemem", lifespan=lifespan)
    app.state.engine, app.state.config = engine, config
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _internal_error)
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/v1/models", models, methods=["GET"])
    app.add_api_route("/metrics", metrics, methods=["GET"])
    app.add_api_route("/v1/completions", completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"])
    if config.debug:
        app.add_api_route("/debug/pool", debug_pool, methods=["GET"])
    return app


# ---- endpoints ------------------------------------------------------------------------------
async def health(request: Request) -> JSONResponse:
    engine: EngineLoop = request.app.state.engine
    if engine.alive:
        return JSONResponse({"status": "ok"})
    return JSONResponse({"status": "engine stopped", "reason": engine.failure}, status_code=503)


async def models(request: Request) -> JSONResponse:
    cfg: ServerConfig = request.app.state.config
    card = {"id": cfg.model_name, "object": "model", "created": int(time.time()), "owned_by": "pagemem",
            "max_model_len": cfg.limits.max_model_len}
    return JSONResponse({"object": "list", "data": [card]})


async def metrics(request: Request) -> Response:
    return Response(request.app.state.engine.metrics.render(), media_type=CONTENT_TYPE)


async def completions(request: Request) -> Response:
    arrival = time.perf_counter()
    engine, cfg = request.app.state.engine, request.app.state.config
    req = parse(CompletionRequest, await _json(request))
    _check_model(req.model, cfg)
    tokenizer = engine.llm.model.tokenizer
    specs, num_prompt = await run_in_threadpool(completion_specs, req, tokenizer, cfg.limits)
    reply = Reply("completion", len(specs), num_prompt, cfg.model_name, tokenizer,
                  return_token_ids=req.return_token_ids, tokens_as_ids=req.return_tokens_as_token_ids)
    return await _serve(request, engine, Job(specs, arrival), reply, req.stream, stream_usage(req))


async def chat_completions(request: Request) -> Response:
    arrival = time.perf_counter()
    engine, cfg = request.app.state.engine, request.app.state.config
    req = parse(ChatRequest, await _json(request))
    _check_model(req.model, cfg)
    specs, num_prompt = await run_in_threadpool(chat_specs, req, engine.llm.model, cfg.limits, cfg.chat_template)
    reply = Reply("chat", len(specs), num_prompt, cfg.model_name, engine.llm.model.tokenizer,
                  return_token_ids=req.return_token_ids, tokens_as_ids=req.return_tokens_as_token_ids)
    return await _serve(request, engine, Job(specs, arrival), reply, req.stream, stream_usage(req))


async def debug_pool(request: Request) -> JSONResponse:
    """Check the pool (and host swap) on the engine thread; their counts, or 500 with the problem."""
    engine: EngineLoop = request.app.state.engine
    try:
        report = await engine.call(lambda llm: _pool_report(llm, engine))
    except RuntimeError as e:
        raise APIError(500, f"integrity check failed: {e}", kind="server_error") from None
    return JSONResponse(report)


def _pool_report(llm, engine: EngineLoop) -> dict:
    if llm.swap is not None:
        llm.swap.reclaim(wait=True)
        llm.swap.check_integrity()
    llm.pool.check_integrity()
    s = llm.pool.stats()
    return {"num_pages": s.num_pages, "num_free": s.num_free, "num_used": s.num_used, "num_cached": s.num_cached,
            "num_running": len(llm.scheduler.running), "num_waiting": len(llm.scheduler.waiting),
            "num_swapped": len(llm.scheduler.swapped), "has_unfinished": llm.has_unfinished(),
            "num_live_choices": engine.num_live, "page_bytes": llm.pool.config.page_bytes,
            "counters": llm.counters()}


# ---- one call -------------------------------------------------------------------------------
async def _serve(request: Request, engine: EngineLoop, job: Job, reply: Reply, stream: bool,
                 include_usage: bool) -> Response:
    engine.submit(job)
    try:
        await job.accepted
    except asyncio.CancelledError:
        engine.cancel(job)
        raise
    except QueueFull as e:
        raise APIError(503, f"the server is busy: {e}; retry later", kind="server_error", code="queue_full",
                       headers={"Retry-After": str(RETRY_AFTER_S)}) from None
    except (ValueError, TypeError) as e:
        raise APIError(400, str(e)) from None
    except EngineFailure as e:
        raise APIError(503, str(e), kind="server_error", code="engine_stopped") from None
    if stream:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return _Stream(_events(job, reply, include_usage), functools.partial(_cancel_open, engine, job, reply),
                       media_type="text/event-stream", headers=headers)
    watcher = asyncio.ensure_future(_watch_disconnect(request, job))
    try:
        while reply.num_open:
            item = await job.events.get()
            if item is _GONE:
                engine.cancel(job)
                return Response(status_code=499)      # nobody is there to read it
            if isinstance(item, EngineFailure):
                raise APIError(500, str(item), kind="server_error")
            reply.add(item)
    except asyncio.CancelledError:
        engine.cancel(job)
        raise
    finally:
        watcher.cancel()
    return JSONResponse(reply.response())


def _cancel_open(engine: EngineLoop, job: Job, reply: Reply) -> None:
    if reply.num_open:
        engine.cancel(job)


class _Stream(StreamingResponse):
    """A StreamingResponse that calls ``on_close`` however it ends: the events ran out, the
    client went away (Starlette cancels the stream), or it went away before the first event."""

    def __init__(self, content, on_close, **kwargs) -> None:
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


async def _events(job: Job, reply: Reply, include_usage: bool):
    """The call's server-sent events, ending with ``data: [DONE]``."""
    for chunk in reply.opening():
        yield sse(chunk)
    while reply.num_open:
        item = await job.events.get()
        if isinstance(item, EngineFailure):
            yield sse(APIError(500, str(item), kind="server_error").body())
            break
        reply.add(item)
        chunk = reply.chunk(item)
        if chunk is not None:
            yield sse(chunk)
    else:
        if include_usage:
            yield sse(reply.usage_chunk())
    yield SSE_DONE


async def _watch_disconnect(request: Request, job: Job) -> None:
    """Wait for the client to go away (the body is already read), then tell the call."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.events.put_nowait(_GONE)
            return


async def _json(request: Request):
    raw = await request.body()
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the body is not valid JSON: {e}") from None


def _check_model(name: str | None, cfg: ServerConfig) -> None:
    if name is not None and name != cfg.model_name:
        raise APIError(404, f"The model '{name}' does not exist; this server serves '{cfg.model_name}'",
                       param="model", code="model_not_found")


# ---- errors ---------------------------------------------------------------------------------
async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return await _api_error(request, APIError(400, str(exc)))


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error serving %s", request.url.path, exc_info=exc)
    return await _api_error(request, APIError(500, f"{type(exc).__name__}: {exc}", kind="server_error"))
