"""The FastAPI app: OpenAI-style /v1/completions (JSON or Server-Sent Events), /v1/models, /health, /metrics.

Built by `create_app(model, options)` (no global state). Requests are validated before they are queued,
generation runs in the scheduler's worker thread (never on the event loop), and every error reaches the
client as an OpenAI error object without a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from gptjax.backends.base import Backend
from gptjax.errors import GptjaxError
from gptjax.serve.continuous import SessionRunner
from gptjax.serve.scheduler import Event, Job, QueueFull, Scheduler, ShuttingDown
from gptjax.serve.validation import Completion, Limits, RequestError, parse_completion
from gptjax.tokenizer import Tokenizer
from gptjax.tracing.metrics import Metrics
from gptjax.tracing.spans import record_error, tracer

log = logging.getLogger("gptjax.serve")
access_log = logging.getLogger("gptjax.serve.access")
ACCESS = "gptjax.access"  # ASGI scope key: what a route tells the access-log line (completion tokens)
ROUTES = ("/v1/completions", "/v1/models", "/health", "/metrics")
# /metrics labels take values from fixed sets only (a client must not be able to add series): any other route
# is "other", any other method "other"; the status is one the server itself chose (a bounded set of codes).
METHODS = ("GET", "POST", "HEAD", "OPTIONS", "PUT", "DELETE", "PATCH")


@dataclass(frozen=True)
class ServeOptions:
    """Server settings (the CLI flags of `gptjax serve`)."""

    model_id: str = "gptjax"
    api_key: str | None = None  # required as "Authorization: Bearer KEY" on /v1/* when set
    max_batch: int = 16  # rows per batch
    max_queue: int = 64  # requests waiting for a batch; more → 429
    max_tokens_cap: int | None = None  # largest max_tokens accepted (None: the context)
    request_timeout: float = 60.0  # seconds from arrival to the last token; then 504 / a timeout error event
    max_body_bytes: int = 1 << 20
    chunk_size: int = 4  # decode steps between hand-overs (streaming granularity, cancellation latency)
    batch_wait: float = 0.02  # seconds a new batch may wait for the clients of the last one to come back
    batching: str = "continuous"  # or "dynamic"; continuous needs the jax backend without a mesh
    warmup: bool = True  # compile a batch-1 generation before /health says ready


@dataclass
class ServedModel:
    """What the server runs: a backend, its prepared weights, the tokenizer (or None) and the metrics registry
    the backend reports to."""

    backend: Backend
    weights: Any
    tokenizer: Tokenizer | None
    metrics: Metrics


class ServerState:
    """Per-app state: readiness phase, the scheduler, requests in flight and the HTTP metrics."""

    def __init__(self, model: ServedModel, options: ServeOptions) -> None:
        self.model, self.options = model, options
        self.phase = "loading"  # → ready → draining
        self.address: str | None = None  # where the server listens (set by whoever runs the app; for the log)
        self.on_failed: Callable[[], None] | None = None  # called if warm-up fails (whoever runs the app: exit)
        self.inflight = 0
        self.limits = Limits(model.backend.config, options.model_id,
                             options.max_tokens_cap or model.backend.config.n_positions)
        r = model.metrics.registry
        self.http = Counter("gptjax_http_requests", "HTTP requests by route, method and status",
                            ["route", "method", "status"], registry=r)
        self.queue_depth = Gauge("gptjax_serve_queue_depth", "Requests waiting for a batch", registry=r)
        self.batch_size = Histogram("gptjax_serve_batch_size", "Requests per batch", buckets=(1, 2, 4, 8, 16, 32, 64),
                                    registry=r)
        self.cancelled = Counter("gptjax_serve_cancelled", "Requests whose work was cancelled, by reason",
                                 ["reason"], registry=r)
        self.decode_rows = Histogram("gptjax_serve_decode_rows", "Rows decoding per decode chunk (batch occupancy)",
                                     buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        on_cancel = lambda reason: self.cancelled.labels(reason=reason).inc()  # noqa: E731
        self.batching = _batching(model, options)
        session = None
        if self.batching == "continuous":
            session = SessionRunner(model.backend, model.weights, chunk_size=options.chunk_size,
                                    max_batch=options.max_batch,
                                    on_cancel=on_cancel, on_chunk=self.decode_rows.observe)
        self.scheduler = Scheduler(self._stream, max_batch=options.max_batch, max_queue=options.max_queue,
                                   batch_wait=options.batch_wait, on_batch=self.batch_size.observe,
                                   on_cancel=on_cancel, on_chunk=self.decode_rows.observe, session=session)
        self.queue_depth.set_function(lambda: self.scheduler.depth)

    def _stream(self, requests: Any) -> Any:
        m = self.model
        return m.backend.stream_joined(m.weights, requests, chunk_size=self.options.chunk_size)

    def start(self) -> None:
        """Warm up (compile) in a thread, then start the worker and turn ready."""
        def run() -> None:
            try:
                if self.options.warmup:
                    m = self.model
                    m.backend.generate(m.weights, [[0]], 2, seed=0)
            except Exception:
                log.exception("warm-up failed: the server cannot serve this model")
                self.phase = "failed"
                if self.on_failed is not None:
                    self.on_failed()
                return
            self.scheduler.start()
            if self.phase == "loading":
                self.phase = "ready"
                log.info("ready: %s on %s", self.options.model_id, self.address or "(address unknown)",
                         extra={"fields": {"model": self.options.model_id, "address": self.address}})

        threading.Thread(target=run, name="gptjax-serve-warmup", daemon=True).start()

    def drained(self) -> bool:
        """No request in flight and no job queued or running."""
        return self.inflight == 0 and self.scheduler.idle()

    def wait_drained(self, timeout: float) -> bool:
        """Block until drained() or timeout; whether it drained."""
        end = time.monotonic() + timeout
        while not self.drained():
            if time.monotonic() >= end:
                return False
            time.sleep(0.05)
        return True


def _batching(model: ServedModel, options: ServeOptions) -> str:
    """The batching mode to use: continuous where the backend has decode sessions (jax without a mesh), else
    dynamic."""
    if options.batching not in ("continuous", "dynamic"):
        raise GptjaxError(f"batching={options.batching!r}; allowed: continuous, dynamic")
    return options.batching if model.backend.supports_sessions else "dynamic"


def create_app(model: ServedModel, options: ServeOptions) -> FastAPI:
    """The app for a loaded model; its state is in app.state.gptjax."""
    state = ServerState(model, options)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.start()
        yield
        state.phase = "draining"
        await asyncio.to_thread(state.scheduler.close)

    app = FastAPI(title="gptjax", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.gptjax = state
    app.add_middleware(_CountRequests, counter=state.http)
    app.add_exception_handler(RequestError, _request_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)

    @app.get("/health")
    async def health() -> Response:
        return JSONResponse({"status": state.phase}, status_code=200 if state.phase == "ready" else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(model.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        _authorize(request, options.api_key)
        return JSONResponse({"object": "list", "data": [{"id": options.model_id, "object": "model", "created": 0,
                                                         "owned_by": "gptjax"}]})

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _completions(request, state)

    return app


# ---- /v1/completions ---------------------------------------------------------------------------------------
async def _completions(request: Request, state: ServerState) -> Response:
    """Authorize, check readiness, read and validate the body, queue the job, answer (JSON or SSE)."""
    span = _server_span(request)
    state.inflight += 1
    handed_over = False
    try:
        _authorize(request, state.options.api_key)
        _check_ready(state)
        completion = parse_completion(await _read_body(request, state.options.max_body_bytes), state.limits,
                                      state.model.tokenizer)
        job = Job(completion.request, asyncio.get_running_loop(), span)
        _submit(state, job)
        head = {"id": f"cmpl-{secrets.token_hex(12)}", "object": "text_completion", "created": int(time.time()),
                "model": state.options.model_id}
        if completion.stream:
            handed_over = True  # the stream ends the span and the in-flight count
            access = request.scope.setdefault(ACCESS, {})
            return StreamingResponse(_sse(state, job, completion, head, span, access), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        response = await _collect(request, state, job, completion, head)
        _end(span, response.status_code)
        return response
    except BaseException as e:
        status = e.status if isinstance(e, RequestError) else 500
        if status >= 500:
            record_error(span, e)
        _end(span, status)
        raise
    finally:
        if not handed_over:
            state.inflight -= 1


def _server_span(request: Request) -> Any:
    """The request's span: a SERVER span continuing the W3C traceparent of the request, or, where FastAPI's own
    telemetry already opened that span (FastAPI >= 0.16x with an SDK), a child of it."""
    attributes = {"http.request.method": "POST", "http.route": "/v1/completions"}
    if trace.get_current_span().get_span_context().is_valid:
        return tracer().start_span("gptjax.serve.completion", attributes=attributes)
    parent = TraceContextTextMapPropagator().extract(dict(request.headers))
    return tracer().start_span("POST /v1/completions", context=parent, kind=trace.SpanKind.SERVER,
                               attributes=attributes)


def _end(span: Any, status: int) -> None:
    span.set_attribute("http.response.status_code", status)
    if status >= 500:
        span.set_status(trace.Status(trace.StatusCode.ERROR))
    span.end()


def _authorize(request: Request, api_key: str | None) -> None:
    if api_key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
        raise RequestError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key")


def _check_ready(state: ServerState) -> None:
    if state.phase != "ready":
        message = {"loading": "the model is still loading", "failed": "the model failed to warm up (see the "
                   "server log)"}.get(state.phase, "the server is shutting down")
        raise RequestError(503, message, type="server_error", code="unavailable", headers={"Retry-After": "1"})


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, or 413 as soon as it is known to exceed limit bytes."""
    length = request.headers.get("content-length")
    too_big = RequestError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
    if length is not None and (not length.isdigit() or int(length) > limit):
        raise too_big
    parts, size = [], 0
    try:
        async for part in request.stream():
            size += len(part)
            if size > limit:
                raise too_big
            parts.append(part)
    except ClientDisconnect:  # the client's doing, not a server fault: 499 (nginx's "client closed request")
        raise RequestError(499, "the client closed the connection before sending the whole body",
                           code="client_closed") from None
    return b"".join(parts)


def _submit(state: ServerState, job: Job) -> None:
    try:
        state.scheduler.submit(job)
    except QueueFull as e:
        raise RequestError(429, f"{e}; retry later", type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": "1"}) from None
    except ShuttingDown as e:
        raise RequestError(503, str(e), type="server_error", code="unavailable") from None


DISCONNECT_CHECK_S = 0.5  # how often a waiting request asks whether its client is still there


async def _next_event(request: Request | None, job: Job, deadline: float, checked: list[float] | None = None
                      ) -> Event:
    """The job's next event; on the deadline cancel it (504); a vanished client cancels it too. The client is
    asked at least every DISCONNECT_CHECK_S, also while events keep coming (`checked` holds the last time)."""
    loop = asyncio.get_running_loop()
    checked = checked if checked is not None else [loop.time()]
    while True:
        now = loop.time()
        remaining = deadline - now
        if remaining <= 0:
            job.cancel("timeout")
            raise RequestError(504, "the request timed out; its work was cancelled", type="timeout_error",
                               code="timeout")
        if request is not None and now - checked[0] >= DISCONNECT_CHECK_S:
            checked[0] = now
            if await request.is_disconnected():
                job.cancel("disconnect")
                raise RequestError(499, "the client closed the connection")
        try:
            return await asyncio.wait_for(job.events.get(), min(remaining, DISCONNECT_CHECK_S))
        except TimeoutError:
            continue


def _generation_error(error: BaseException) -> RequestError:
    """A job's failure as what the client may see (the details stay in the server log)."""
    if isinstance(error, ShuttingDown):
        return RequestError(503, str(error), type="server_error", code="unavailable")
    if isinstance(error, GptjaxError):  # a request the checks let through but the backend refused
        return RequestError(400, str(error))
    log.error("generation failed", exc_info=error)
    return RequestError(500, f"generation failed ({type(error).__name__}); the request was not completed",
                        type="server_error")


async def _collect(request: Request, state: ServerState, job: Job, completion: Completion, head: dict[str, Any]
                   ) -> Response:
    """The whole completion as one JSON body."""
    deadline = asyncio.get_running_loop().time() + state.options.request_timeout
    tokens: list[int] = []
    reason, checked = None, [asyncio.get_running_loop().time()]
    while reason is None:
        event = await _next_event(request, job, deadline, checked)
        if event.error is not None:
            raise _generation_error(event.error)
        tokens += event.tokens
        reason = event.finish_reason
    request.scope.setdefault(ACCESS, {})["tokens"] = len(tokens)
    choice = {"text": _decode(state, tokens), "index": 0, "logprobs": None, "finish_reason": reason,
              "token_ids": tokens}
    return JSONResponse(head | {"choices": [choice], "usage": _usage(completion, len(tokens))})


async def _sse(state: ServerState, job: Job, completion: Completion, head: dict[str, Any], span: Any,
               access: dict[str, Any]) -> AsyncIterator[str]:
    """Server-Sent Events in OpenAI's chunk format, ending with `data: [DONE]` (access gets the token count)."""
    deadline = asyncio.get_running_loop().time() + state.options.request_timeout
    text, n, status = _TextStream(state.model.tokenizer), 0, 200
    try:
        while True:
            try:
                event = await _next_event(None, job, deadline)
            except RequestError as e:
                status = e.status
                yield _data(e.body())
                break
            if event.error is not None:
                error = _generation_error(event.error)
                status = error.status
                yield _data(error.body())
                break
            n += len(event.tokens)
            delta = text.add(event.tokens) + (text.flush() if event.finish_reason else "")
            choice = {"text": delta, "index": 0, "logprobs": None, "finish_reason": event.finish_reason,
                      "token_ids": event.tokens}
            yield _data(head | {"choices": [choice]})
            if event.finish_reason:
                if completion.include_usage:
                    yield _data(head | {"choices": [], "usage": _usage(completion, n)})
                break
        yield "data: [DONE]\n\n"
    finally:
        job.cancel("disconnect")  # a no-op unless the client left before the end
        access["tokens"] = n
        span.set_attribute("gptjax.stream", True)
        _end(span, status)
        state.inflight -= 1


def _data(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def _usage(completion: Completion, generated: int) -> dict[str, int]:
    prompt = len(completion.prompt)
    return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}


def _decode(state: ServerState, tokens: list[int]) -> str:
    tokenizer = state.model.tokenizer
    return tokenizer.decode(tokens) if tokenizer is not None else ""


class _TextStream:
    """Text deltas of a growing token list; a partial character is held back until its last byte arrives."""

    def __init__(self, tokenizer: Tokenizer | None) -> None:
        self.tokenizer, self.ids, self.shown = tokenizer, [], ""

    def add(self, ids: list[int]) -> str:
        """The new stable text after appending ids."""
        if self.tokenizer is None:
            return ""
        self.ids += ids
        stable = self.tokenizer.decode(self.ids).rstrip("\ufffd")
        delta, self.shown = stable[len(self.shown):], stable
        return delta

    def flush(self) -> str:
        """Whatever is held back (at the end of the stream)."""
        if self.tokenizer is None:
            return ""
        text = self.tokenizer.decode(self.ids)
        delta, self.shown = text[len(self.shown):], text
        return delta


# ---- errors and HTTP metrics ------------------------------------------------------------------------------
async def _request_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, RequestError)
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


async def _http_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, HTTPException)
    return JSONResponse(RequestError(error.status_code, str(error.detail)).body(), status_code=error.status_code)


async def _internal_error(request: Request, error: Exception) -> Response:
    log.error("unhandled error on %s", request.url.path, exc_info=error)
    return JSONResponse(RequestError(500, "internal server error", type="server_error").body(), status_code=500)


class _CountRequests:
    """ASGI middleware counting HTTP requests by route and method (each known, else "other") and status, and
    writing one access-log line per request (the same label values, the duration, completion tokens)."""

    def __init__(self, app: Any, counter: Counter) -> None:
        self.app, self.counter = app, counter

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), [500]

        async def send_status(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope["path"] if scope["path"] in ROUTES else "other"
            method = scope["method"] if scope["method"] in METHODS else "other"
            self.counter.labels(route=route, method=method, status=str(status[0])).inc()
            _log_access(method, route, status[0], time.perf_counter() - start, scope.get(ACCESS, {}).get("tokens"))


def _log_access(method: str, route: str, status: int, seconds: float, tokens: int | None) -> None:
    """The access-log line; in JSON logs its values are also fields of their own."""
    ms = round(seconds * 1e3, 3)
    access_log.info("%s %s %d %.1f ms tokens=%s", method, route, status, ms, "-" if tokens is None else tokens,
                    extra={"fields": {"method": method, "route": route, "status": status, "duration_ms": ms,
                                      "tokens": tokens}})
