"""The OpenAI-compatible HTTP server's routes: the Starlette app over one `Server` (serve/scheduler.py).

    POST /v1/chat/completions   answer (JSON, or SSE chunks with "stream": true)
    GET  /v1/models             the one served model
    GET  /health                the process is up (always 200)
    GET  /ready                 200 once the model is loaded, else 503
    GET  /metrics               Prometheus text format (see serve/metrics.py)
    GET  /, /static/*, /v1/media  the chat page and its media listing (see serve/page.py)

A request is admitted (`Server.admit`) before its body is read, so only admitted requests hold a body (and its
upload) in memory; a body must arrive within the read timeouts (408 otherwise). A request waits for its first token
(or its error) before any byte is sent, so a bad video still gets a proper 4xx JSON error when streaming. A client
that disconnects — while queued, before its first token or mid-stream — sets its cancel flag, and its generation
stops at the next token.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import time
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .metrics import CONTENT_TYPE, Metrics
from .page import page_routes
from .protocol import ApiError, ChatRequest, bad, chunk_body, completion_body, completion_id, parse_chat_request, usage
from .scheduler import Job, ServeOptions, Server

log = logging.getLogger(__name__)

ROUTES = ("/v1/chat/completions", "/v1/models", "/health", "/ready", "/metrics", "/", "/v1/media")


# ---- HTTP helpers ----------------------------------------------------------------------------------------------
def error_response(err: ApiError) -> Response:
    # json.dumps' ASCII escapes: a message quoting client text (a lone surrogate included) always encodes
    return Response(json.dumps(err.body()), status_code=err.status, headers=err.headers, media_type="application/json")


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def _too_big(limit: int) -> ApiError:
    return ApiError(413, f"The request body is over this server's limit of {limit / 2**20:.1f} MiB "
                         "(--max-upload-mb, base64 included)", None, "request_too_large")


def _declared_size(request: Request) -> int | None:
    declared = request.headers.get("content-length")
    return int(declared) if declared is not None and declared.isdigit() else None


async def _drain(request: Request, size: int | None, limit: int, opts: ServeOptions) -> None:
    """Read and drop a refused request's body (up to 4x `limit`, within the read timeouts), so the client reads the
    error instead of a reset connection; nothing is stored."""
    if size is None or size > 4 * limit:
        return
    try:
        async for _ in _timed_stream(request, opts):
            pass
    except (ApiError, ClientDisconnect):
        pass


async def _timed_stream(request: Request, opts: ServeOptions):
    """The body's pieces; 408 when one takes over `read_timeout` s or the whole body over `body_timeout` s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + opts.body_timeout
    pieces = request.stream().__aiter__()
    while True:
        wait = min(opts.read_timeout, deadline - loop.time())
        try:
            piece = await asyncio.wait_for(pieces.__anext__(), timeout=max(wait, 0.001))
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:
            what = "the body" if wait < opts.read_timeout else "a piece of the body"
            raise ApiError(408, f"The request timed out: {what} did not arrive in time (--read-timeout {opts.read_timeout:g} s "
                                f"between pieces, --body-timeout {opts.body_timeout:g} s in all)", None, "request_timeout",
                           headers={"Connection": "close"}) from None
        yield piece


async def _read_body(request: Request, limit: int, opts: ServeOptions) -> bytearray:
    """The body, or 413 when it is over `limit` (checked while reading), or 408 (`_timed_stream`)."""
    body = bytearray()
    async for piece in _timed_stream(request, opts):
        if len(body) + len(piece) > limit:
            raise _too_big(limit)
        body += piece
    return body


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _next_event(job: Job, disconnected: asyncio.Task) -> tuple | None:
    """The job's next event, or None when the client disconnected first."""
    getter = asyncio.ensure_future(job.events.get())
    done, _ = await asyncio.wait({getter, disconnected}, return_when=asyncio.FIRST_COMPLETED)
    if getter in done:
        return getter.result()
    getter.cancel()
    return None


def create_app(server: Server) -> Starlette:
    opts = server.opts
    metrics = server.metrics

    def check_auth(request: Request) -> None:
        if opts.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), opts.api_key.encode()):
            raise ApiError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'", None, "invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    def check_ready() -> None:
        if server.pipe is None:
            msg = "the model could not be loaded (see the server log)" if server.load_error else "the model is still loading"
            raise ApiError(503, msg, None, "model_not_ready", headers={"Retry-After": "5"})

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(request: Request) -> Response:
        if server.pipe is not None:
            return JSONResponse({"status": "ready", "model": server.model_id})
        if server.load_error is not None:  # the reason is in the server's log, not for unauthenticated clients
            return JSONResponse({"status": "failed", "error": "the model could not be loaded (see the server log)"}, status_code=503)
        return JSONResponse({"status": "loading"}, status_code=503)

    async def metrics_endpoint(request: Request) -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    async def models(request: Request) -> Response:
        try:
            check_auth(request)
        except ApiError as err:
            return error_response(err)
        return JSONResponse({"object": "list", "data": [{"id": server.model_id, "object": "model", "created": server.created, "owned_by": "ppllava-edge"}]})

    def prepare(body: bytearray) -> tuple[ChatRequest, int]:
        try:
            text = body.decode("utf-8")
            body.clear()  # one copy of the body at a time
            data = json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise bad(None, f"the request body is not valid JSON ({exc})", "invalid_json") from None
        except RecursionError:
            raise bad(None, "the request body is nested too deeply", "invalid_json") from None
        del text
        fmin, fmax = server.pipe.frame_range()
        req = parse_chat_request(data, server.model_id, max_images=min(opts.max_images, fmax))  # images go through the tower as frames
        frames = req.frames if req.frames is not None else opts.frames
        if not fmin <= frames <= fmax:
            raise bad("frames", f"'frames' {frames} is outside this model's frame range {fmin}..{fmax}")
        return req, frames

    async def chat_completions(request: Request) -> Response:
        job: Job | None = None
        size: int | None = None
        read = False
        try:
            size = _declared_size(request)
            check_auth(request)
            check_ready()
            if size is not None and size > opts.max_body_bytes:
                raise _too_big(opts.max_body_bytes)
            job = Job(asyncio.get_running_loop())
            server.admit(job)  # before the body is read: a refused request costs no memory
            try:
                body = await _read_body(request, opts.max_body_bytes, opts)
                read = True
                req, frames = await asyncio.to_thread(prepare, body)
                del body
                media = await asyncio.to_thread(server.policy.resolve_all, req.media)
                req.media = [dataclasses.replace(m, url="") for m in req.media]  # the payloads are in the files now: drop them
            except BaseException:
                server.release(job, started=False)
                raise
            server.executor.submit(server.run_job, job, req, media, frames)
        except ApiError as err:
            if not read and err.status != 408:
                await _drain(request, size, opts.max_body_bytes, opts)
            return error_response(err)
        except ClientDisconnect:
            client = request.client
            log.warning("client %s disconnected before its request body arrived", f"{client.host}:{client.port}" if client else "?")
            return Response(status_code=499)

        disconnected = asyncio.ensure_future(_wait_disconnect(request))
        cid, created = completion_id(), int(time.time())
        event = await _next_event(job, disconnected)
        while event is not None and event[0] == "token" and not req.stream:
            event = await _next_event(job, disconnected)
        if event is None:  # the client went away: stop the work, nobody reads the answer
            job.cancel.set()
            return Response(status_code=499)
        if event[0] == "error":
            disconnected.cancel()
            return error_response(event[1])
        if event[0] == "cancelled":
            disconnected.cancel()
            return Response(status_code=499)
        if not req.stream:
            disconnected.cancel()
            _, result, text, _, finish, warnings, fields = event
            return JSONResponse({**completion_body(cid, server.model_id, text, finish, result.context_len, result.ids, req.return_token_ids,
                                                   result.timings.as_dict(), warnings), **fields})
        disconnected.cancel()  # from here Starlette's StreamingResponse watches for the disconnect
        return StreamingResponse(_stream(job, req, cid, created, event), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _stream(job: Job, req: ChatRequest, cid: str, created: int, event: tuple):
        model = server.model_id
        try:
            yield _sse(chunk_body(cid, model, created, {"role": "assistant", "content": ""}))
            while True:
                kind = event[0]
                if kind == "token":
                    _, token, delta = event
                    if delta or req.return_token_ids:
                        extra = {"token_ids": [token]} if req.return_token_ids else {}
                        yield _sse(chunk_body(cid, model, created, {"content": delta}, **extra))
                elif kind == "done":
                    _, result, _, tail, finish, warnings, fields = event
                    if tail:
                        yield _sse(chunk_body(cid, model, created, {"content": tail}))
                    yield _sse(chunk_body(cid, model, created, {}, finish, timings=result.timings.as_dict(), warnings=warnings, **fields))
                    if req.include_usage:
                        yield _sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [],
                                    "usage": usage(result.context_len, len(result.ids))})
                    yield b"data: [DONE]\n\n"
                    return
                elif kind == "error":
                    yield _sse(event[1].body())
                    yield b"data: [DONE]\n\n"
                    return
                else:  # cancelled
                    return
                event = await job.events.get()
        finally:
            job.cancel.set()  # a no-op after the last token; stops the generation when the client went away

    async def not_found(request: Request, exc: HTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", None, code))

    routes = [
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/ready", ready, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
        *page_routes(server, check_auth, check_ready, error_response),  # the chat page (serve/page.py)
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: not_found})
    return _CountRequests(app, metrics)


class _CountRequests:
    """ASGI middleware: counts every HTTP request by route and final status (ppllava_http_requests_total)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def counting_send(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            path = scope.get("path", "")
            self.metrics.http_requests.labels(path=path if path in ROUTES else "other", status=str(status)).inc()
