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
from gptjax.sampling import SamplingParams
from gptjax.serve.completions import Choice, TokenText, logprobs_block, usage
from gptjax.serve.continuous import SessionRunner
from gptjax.serve.scheduler import STOPPED, DeviceLock, Event, Job, QueueFull, Scheduler, ShuttingDown
from gptjax.serve.validation import (
    MAX_CHOICES,
    Completion,
    Limits,
    RequestError,
    parse_completion,
    parse_detokenize,
    parse_tokenize,
)
from gptjax.speculative import ModelDraft, Speculation
from gptjax.tokenizer import Tokenizer
from gptjax.tracing.metrics import Metrics
from gptjax.tracing.spans import record_error, tracer

log = logging.getLogger("gptjax.serve")
access_log = logging.getLogger("gptjax.serve.access")
ACCESS = "gptjax.access"  # ASGI scope key: what a route tells the access-log line (completion tokens)
ROUTES = ("/v1/completions", "/v1/models", "/v1/chat/completions", "/tokenize", "/detokenize", "/tokenizer_info",
          "/health", "/metrics")
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
    speculation: Speculation | None = None  # a drafter (`--draft`): decode speculatively (continuous batching)


class ServerState:
    """Per-app state: readiness phase, the scheduler, requests in flight and the HTTP metrics."""

    def __init__(self, model: ServedModel, options: ServeOptions) -> None:
        self.model, self.options = model, options
        self.phase = "loading"  # → ready → draining
        self.address: str | None = None  # where the server listens (set by whoever runs the app; for the log)
        self.on_failed: Callable[[], None] | None = None  # called if warm-up fails (whoever runs the app: exit)
        self.inflight = 0
        self.limits = Limits(model.backend.config, options.model_id,
                             options.max_tokens_cap or model.backend.config.n_positions,
                             min(MAX_CHOICES, options.max_queue))
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
        device, session = DeviceLock(), None  # the worker's chunks and scoring calls take turns on the backend
        if self.batching == "continuous":
            session = SessionRunner(model.backend, model.weights, chunk_size=options.chunk_size,
                                    max_batch=options.max_batch, on_cancel=on_cancel,
                                    on_chunk=self.decode_rows.observe, device=device, speculation=model.speculation)
        self.scheduler = Scheduler(self._stream, max_batch=options.max_batch, max_queue=options.max_queue,
                                   batch_wait=options.batch_wait, on_batch=self.batch_size.observe,
                                   on_cancel=on_cancel, on_chunk=self.decode_rows.observe, session=session,
                                   device=device)
        self.queue_depth.set_function(lambda: self.scheduler.depth)

    def _stream(self, requests: Any) -> Any:
        """A batch's chunks (dynamic batching; with a drafter only a job re-run alone after its batch failed:
        its tokens are then its solo speculative run's)."""
        m, spec = self.model, self.model.speculation
        if spec is None:
            return m.backend.stream_joined(m.weights, requests, chunk_size=self.options.chunk_size)
        [r] = requests
        return m.backend.stream(m.weights, r.prompts, r.max_new_tokens, chunk_size=self.options.chunk_size,
                                sampling=r.sampling, draft=spec.draft, num_speculative_tokens=spec.k)

    def start(self) -> None:
        """Warm up (compile) in a thread, then start the worker and turn ready."""
        def run() -> None:
            try:
                if self.options.warmup:
                    m = self.model
                    m.backend.generate(m.weights, [[0]], 2, sampling=SamplingParams(seed=0))
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
    batching = options.batching if model.backend.supports_sessions else "dynamic"
    if model.speculation is not None and batching != "continuous":
        raise GptjaxError("a drafter (--draft) needs continuous batching: the jax backend without --mesh and "
                          "--batching continuous")
    return batching


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

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        _authorize(request, options.api_key)
        raise RequestError(400, f"the model {options.model_id!r} has no chat template (gptjax checkpoints carry "
                           "none), so /v1/chat/completions cannot format messages; send a prompt to /v1/completions",
                           "messages", code="chat_template_missing")

    @app.post("/tokenize")
    async def tokenize(request: Request) -> Response:
        _authorize(request, options.api_key)
        body = await _read_body(request, options.max_body_bytes)
        ids, strings = parse_tokenize(body, state.limits, model.tokenizer)
        pieces = [TokenText(model.tokenizer)(t) for t in ids] if strings else None
        return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": model.backend.config.n_positions,
                             "token_strs": pieces})

    @app.post("/detokenize")
    async def detokenize(request: Request) -> Response:
        _authorize(request, options.api_key)
        body = await _read_body(request, options.max_body_bytes)
        ids = parse_detokenize(body, state.limits, model.tokenizer)
        return JSONResponse({"prompt": model.tokenizer.decode(ids)})

    @app.get("/tokenizer_info")
    async def tokenizer_info(request: Request) -> Response:
        _authorize(request, options.api_key)
        return JSONResponse(_tokenizer_info(model.tokenizer, model.backend.config.n_positions))

    return app


EOS = "<|endoftext|>"  # GPT-2's end-of-text token, when the checkpoint's tokenizer has it


def _tokenizer_info(tokenizer: Tokenizer | None, context: int) -> dict[str, Any]:
    """What vLLM's /tokenizer_info tells (lm-evaluation-harness's remote tokenizer reads the special tokens)."""
    if tokenizer is None:
        raise RequestError(400, "this model has no tokenizer: it takes token ids only", code="no_tokenizer")
    eos = EOS if len(tokenizer.encode(EOS)) == 1 else None
    return {"tokenizer_class": type(tokenizer).__name__, "model_max_length": context,
            "vocab_size": tokenizer.vocab_size, "eos_token": eos, "bos_token": None, "pad_token": None,
            "chat_template": None}


# ---- /v1/completions ---------------------------------------------------------------------------------------
async def _completions(request: Request, state: ServerState) -> Response:
    """Authorize, check readiness, read and validate the body, queue the job, answer (JSON or SSE)."""
    span = _server_span(request)
    state.inflight += 1
    handed_over, jobs = False, None
    try:
        _authorize(request, state.options.api_key)
        _check_ready(state)
        completion = parse_completion(await _read_body(request, state.options.max_body_bytes), state.limits,
                                      state.model.tokenizer)
        _check_speculative(completion, state.model.speculation)
        jobs = _Jobs(completion, asyncio.get_running_loop(), span)
        _submit(state, jobs.jobs)
        head = {"id": f"cmpl-{secrets.token_hex(12)}", "object": "text_completion", "created": int(time.time()),
                "model": state.options.model_id}
        if completion.stream:
            handed_over = True  # the stream ends the span and the in-flight count
            access = request.scope.setdefault(ACCESS, {})
            return StreamingResponse(_sse(state, jobs, completion, head, span, access), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        response = await _collect(request, state, jobs, completion, head)
        _end(span, response.status_code)
        return response
    except BaseException as e:
        if jobs is not None:  # one choice failed, or the scoring: the other choices' work is wasted
            jobs.cancel("error")
        status = e.status if isinstance(e, RequestError) else 500
        if status >= 500:
            record_error(span, e)
        _end(span, status)
        raise
    finally:
        if not handed_over:
            state.inflight -= 1


def _check_speculative(completion: Completion, spec: Speculation | None) -> None:
    """A 400 for what a speculative server cannot serve exactly: penalties and logit bias (the verify step scores
    the target's raw distribution) and, with a draft model, a prompt plus max_tokens beyond its context."""
    if spec is None:
        return
    for r in completion.requests:
        sp = r.sampling
        for name, used in (("presence_penalty", sp.presence_penalty), ("frequency_penalty", sp.frequency_penalty),
                           ("logit_bias", sp.logit_bias)):
            if used:
                raise RequestError(400, f"{name} is not supported by this server: it decodes speculatively (--draft "
                                   f"{spec.draft.kind}), whose verify step scores the model's raw distribution, so "
                                   f"{name} would not change the output exactly; drop {name}", name,
                                   code="unsupported_with_draft")
        room = spec.draft.config.n_positions if isinstance(spec.draft, ModelDraft) else None
        if room is not None and len(r.prompts[0]) + r.max_new_tokens > room:
            raise RequestError(400, f"prompt length {len(r.prompts[0])} + max_tokens {r.max_new_tokens} exceeds the "
                               f"draft model's context ({room} tokens) of this speculative server", "max_tokens")


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


def _submit(state: ServerState, jobs: list[Job]) -> None:
    if not jobs:  # echo only: nothing to generate
        return
    try:
        state.scheduler.submit_all(jobs)
    except QueueFull as e:
        raise RequestError(429, f"{e}; retry later", type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": "1"}) from None
    except ShuttingDown as e:
        raise RequestError(503, str(e), type="server_error", code="unavailable") from None


DISCONNECT_CHECK_S = 0.5  # how often a waiting request asks whether its client is still there


async def _next_event(request: Request | None, job: Job | _Jobs, deadline: float,
                      checked: list[float] | None = None) -> Event:
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


class _Jobs:
    """A request's jobs (one per choice) sharing one event queue; cancel() cancels them all."""

    def __init__(self, completion: Completion, loop: asyncio.AbstractEventLoop, span: Any) -> None:
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.jobs = [Job(r, loop, span, index=c, events=self.events) for c, r in enumerate(completion.requests)]

    def cancel(self, reason: str) -> None:
        """Stop working for every choice still running."""
        for job in self.jobs:
            job.cancel(reason)


def _choices(state: ServerState, completion: Completion, text: TokenText) -> list[Choice]:
    """The response's choices in order (choice p * n + j is prompt p's j-th sample); with max_tokens 0 each is
    finished already (echo only)."""
    choices = [Choice(c, completion.prompts[c // completion.n], completion.stops, text, completion.echo)
               for c in range(completion.choices)]
    if not completion.requests:
        for choice in choices:
            choice.finish = "length"
    return choices


def _apply(event: Event, choices: list[Choice], jobs: _Jobs) -> str:
    """An event's tokens into its choice; the new text. A stop string found stops that row's generation."""
    choice = choices[event.index]
    delta = choice.add(event.tokens, event.finish_reason)
    if choice.finish == "stop" and event.finish_reason is None:
        jobs.jobs[event.index].cancel(STOPPED)
    return delta


async def _score(state: ServerState, sequences: list[list[int]], k: int) -> list[Any]:
    """backend.score of sequences (top-k alternatives) in a thread, between two of the worker's chunks."""
    def run() -> list[Any]:
        with state.scheduler.device:
            return state.model.backend.score(state.model.weights, sequences, top_k=k)
    try:
        return await asyncio.to_thread(run)
    except Exception as e:
        raise _generation_error(e) from None


def _block(choice: Choice, scores: Any, first: int, k: int, text: TokenText) -> dict[str, Any]:
    """The logprobs object of the choice's tokens from sequence position `first` on (the echoed prompt's from
    0), continuing the choice's text offsets."""
    block = logprobs_block(scores, range(first, len(choice.sequence())), k, text, choice.offset)
    if block["tokens"]:
        choice.offset = block["text_offset"][-1] + len(block["tokens"][-1])
    return block


async def _collect(request: Request, state: ServerState, jobs: _Jobs, completion: Completion,
                   head: dict[str, Any]) -> Response:
    """The whole completion as one JSON body."""
    loop = asyncio.get_running_loop()
    deadline, checked = loop.time() + state.options.request_timeout, [loop.time()]
    text = TokenText(state.model.tokenizer)
    choices = _choices(state, completion, text)
    while any(c.finish is None for c in choices):
        event = await _next_event(request, jobs, deadline, checked)
        if event.error is not None:
            raise _generation_error(event.error)
        if choices[event.index].finish is None:
            _apply(event, choices, jobs)
    blocks: list[Any] = [None] * len(choices)
    if completion.logprobs is not None:
        k = completion.logprobs
        scores = await _score(state, [c.sequence() for c in choices], k)
        blocks = [_block(c, s, 0 if completion.echo else len(c.prompt), k, text) for c, s in zip(choices, scores)]
    out = []
    for c, block in zip(choices, blocks):
        prefix = text.decode(c.prompt) if completion.echo else ""
        out.append({"text": prefix + c.stop.text, "index": c.index, "logprobs": block, "finish_reason": c.finish,
                    "token_ids": c.tokens})
    used = usage(completion.prompts, choices)
    request.scope.setdefault(ACCESS, {})["tokens"] = used["completion_tokens"]
    return JSONResponse(head | {"choices": out, "usage": used})


async def _sse(state: ServerState, jobs: _Jobs, completion: Completion, head: dict[str, Any], span: Any,
               access: dict[str, Any]) -> AsyncIterator[str]:
    """Server-Sent Events in OpenAI's chunk format, ending with `data: [DONE]` (access gets the token count).
    With logprobs, all events already waiting are answered together, so one scoring call covers them."""
    deadline = asyncio.get_running_loop().time() + state.options.request_timeout
    text = TokenText(state.model.tokenizer)
    choices, status = _choices(state, completion, text), 200
    try:
        if not completion.requests:  # echo only
            for chunk in await _stream_chunks(state, completion, choices, set(range(len(choices))), {}, text):
                yield _data(head | {"choices": [chunk]})
        while any(c.finish is None for c in choices):
            try:
                events = [await _next_event(None, jobs, deadline)]
            except RequestError as e:
                status = e.status
                yield _data(e.body())
                break
            while completion.logprobs is not None and not jobs.events.empty():
                events.append(jobs.events.get_nowait())
            error = next((e.error for e in events if e.error is not None), None)
            if error is not None:
                failure = _generation_error(error)
                status = failure.status
                yield _data(failure.body())
                break
            deltas: dict[int, str] = {}
            for event in events:
                if choices[event.index].finish is None:  # a stopped row's last tokens are dropped
                    deltas[event.index] = deltas.get(event.index, "") + _apply(event, choices, jobs)
            for chunk in await _stream_chunks(state, completion, choices, set(deltas), deltas, text):
                yield _data(head | {"choices": [chunk]})
        else:
            if completion.include_usage:
                yield _data(head | {"choices": [], "usage": usage(completion.prompts, choices)})
        yield "data: [DONE]\n\n"
    finally:
        jobs.cancel("disconnect" if status == 200 else "error")  # a no-op unless the client left or one failed
        access["tokens"] = sum(len(c.tokens) for c in choices)
        span.set_attribute("gptjax.stream", True)
        _end(span, status)
        state.inflight -= 1


async def _stream_chunks(state: ServerState, completion: Completion, choices: list[Choice], changed: set[int],
                         deltas: dict[int, str], text: TokenText) -> list[dict[str, Any]]:
    """One chunk choice per changed choice: its new text (after the echoed prompt in its first chunk), its new
    tokens, their log-probabilities when asked (one scoring call for all), its finish reason once known."""
    order = sorted(changed)
    firsts = {c: (0 if completion.echo and not choices[c].started else
                  len(choices[c].prompt) + choices[c].sent_tokens) for c in order}
    scores: dict[int, Any] = {}
    if completion.logprobs is not None:
        wanted = [c for c in order if firsts[c] < len(choices[c].sequence())]
        if wanted:
            scored = await _score(state, [choices[c].sequence() for c in wanted], completion.logprobs)
            scores = dict(zip(wanted, scored))
    out = []
    for c in order:
        choice = choices[c]
        new = choice.tokens[choice.sent_tokens:]
        prefix = text.decode(choice.prompt) if completion.echo and not choice.started else ""
        block = None
        if completion.logprobs is not None:
            block = (_block(choice, scores[c], firsts[c], completion.logprobs, text) if c in scores else
                     {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []})
        choice.started, choice.sent_tokens = True, len(choice.tokens)
        out.append({"text": prefix + deltas.get(c, ""), "index": c, "logprobs": block,
                    "finish_reason": choice.finish, "token_ids": new})
    return out


def _data(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


# ---- errors and HTTP metrics ------------------------------------------------------------------------------
async def _request_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, RequestError)
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


async def _http_error(request: Request, error: Exception) -> Response:
    """Routing errors as OpenAI error objects: 404 names the route and lists the served ones, 405 the method."""
    assert isinstance(error, HTTPException)
    where = f"{request.method} {request.url.path[:100]}"
    if error.status_code == 404:
        message, code = f"no route {where}; routes: {', '.join(ROUTES)}", "not_found"
    elif error.status_code == 405:
        message, code = f"method not allowed: {where} (allowed: {error.headers.get('Allow', '?')})", \
            "method_not_allowed"
    else:
        message, code = str(error.detail), None
    body = RequestError(error.status_code, message, code=code).body()
    return JSONResponse(body, status_code=error.status_code, headers=error.headers)


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
