"""The FastAPI app: the routes (OpenAI-style /v1/completions, JSON or Server-Sent Events; /v1/models, /tokenize,
/detokenize, /tokenizer_info, /health, /metrics), the error handlers and the middleware counting requests.

Built by `create_app(model, options)`; its state (gptjax.serve.state) is in app.state.gptjax, no global state. The
completion pipeline is gptjax.serve.serving's, the request parsing gptjax.serve.protocol's. Every error reaches the
client as an OpenAI error object without a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, Counter
from starlette.exceptions import HTTPException

from gptjax.serve.completions import TokenText
from gptjax.serve.guards import authorize, read_body
from gptjax.serve.protocol import RequestError, parse_detokenize, parse_tokenize
from gptjax.serve.serving import ACCESS, completions
from gptjax.serve.state import ServedModel, ServeOptions, ServerState
from gptjax.tokenizer import Tokenizer

log = logging.getLogger("gptjax.serve")
access_log = logging.getLogger("gptjax.serve.access")
ROUTES = ("/v1/completions", "/v1/models", "/v1/chat/completions", "/tokenize", "/detokenize", "/tokenizer_info",
          "/health", "/metrics")
# /metrics labels take values from fixed sets only (a client must not be able to add series): any other route
# is "other", any other method "other"; the status is one the server itself chose (a bounded set of codes).
METHODS = ("GET", "POST", "HEAD", "OPTIONS", "PUT", "DELETE", "PATCH")
EOS = "<|endoftext|>"  # GPT-2's end-of-text token, when the checkpoint's tokenizer has it
router = APIRouter()


def create_app(model: ServedModel, options: ServeOptions) -> FastAPI:
    """The app for a loaded model; its state is in app.state.gptjax."""
    state = ServerState(model, options)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.start()
        yield
        state.phase = "draining"
        await asyncio.to_thread(state.scheduler.close)
        state.parser.shutdown(wait=False)

    app = FastAPI(title="gptjax", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None, **_telemetry())
    app.state.gptjax = state
    app.include_router(router)
    app.add_middleware(_CountRequests, counter=state.server_metrics.http)
    app.add_exception_handler(RequestError, _request_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)
    return app


UNTRACED = ("/health", "/metrics")  # probes and scrapes: every few seconds, no trace worth keeping


def _telemetry() -> dict[str, Any]:
    """FastAPI's own OpenTelemetry settings (FastAPI >= 0.16x traces every request once an SDK is installed):
    leave /health and /metrics untraced. Older FastAPI traces nothing itself."""
    if "telemetry" not in inspect.signature(FastAPI.__init__).parameters:
        return {}
    return {"telemetry": {"exclude": lambda scope: scope.get("path") in UNTRACED}}


def _state(request: Request) -> ServerState:
    return request.app.state.gptjax


# ---- routes ---------------------------------------------------------------------------------------------------
@router.get("/health")
async def health(request: Request) -> Response:
    """200 {"status": "ready"} once the model is warm, else 503 with the phase (loading, failed, draining)."""
    phase = _state(request).phase
    return JSONResponse({"status": phase}, status_code=200 if phase == "ready" else 503)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    """The Prometheus exposition of the model's registry (the backend's metrics and the server's)."""
    return Response(_state(request).model.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models")
async def models(request: Request) -> Response:
    """The one model this server serves."""
    options = _state(request).options
    authorize(request, options.api_key)
    return JSONResponse({"object": "list", "data": [{"id": options.model_id, "object": "model", "created": 0,
                                                     "owned_by": "gptjax"}]})


@router.post("/v1/completions")
async def create_completion(request: Request) -> Response:
    """A completion (gptjax.serve.serving)."""
    return await completions(request, _state(request))


@router.post("/v1/chat/completions")
async def chat(request: Request) -> Response:
    """Always a 400: gptjax checkpoints carry no chat template."""
    options = _state(request).options
    authorize(request, options.api_key)
    raise RequestError(400, f"the model {options.model_id!r} has no chat template (gptjax checkpoints carry "
                       "none), so /v1/chat/completions cannot format messages; send a prompt to /v1/completions",
                       "messages", code="chat_template_missing")


@router.post("/tokenize")
async def tokenize(request: Request) -> Response:
    """vLLM's /tokenize: a prompt's token ids (and each token's text with return_token_strs). Parsed, encoded and
    rendered on the state's one parser thread, off the event loop: a 1 MiB body of "é" took 5.7 s on the loop, and
    /health waited that long (one thread: concurrent floods queue there, not for the interpreter's lock)."""
    state = _state(request)
    authorize(request, state.options.api_key)
    body = await read_body(request, state.options.max_body_bytes)
    return _json(await asyncio.get_running_loop().run_in_executor(state.parser, _tokenized, body, state))


def _tokenized(body: bytes, state: ServerState) -> bytes:
    ids, strings = parse_tokenize(body, state.limits, state.model.tokenizer)  # at most MAX_TOKENIZE ids
    pieces = [TokenText(state.model.tokenizer)(t) for t in ids] if strings else None
    return json.dumps({"tokens": ids, "count": len(ids), "max_model_len": state.limits.config.n_positions,
                       "token_strs": pieces}).encode()


@router.post("/detokenize")
async def detokenize(request: Request) -> Response:
    """vLLM's /detokenize: the text of token ids (decoded in a thread, as /tokenize encodes)."""
    state = _state(request)
    authorize(request, state.options.api_key)
    body = await read_body(request, state.options.max_body_bytes)
    return _json(await asyncio.get_running_loop().run_in_executor(state.parser, _detokenized, body, state))


def _detokenized(body: bytes, state: ServerState) -> bytes:
    ids = parse_detokenize(body, state.limits, state.model.tokenizer)
    return json.dumps({"prompt": state.model.tokenizer.decode(ids)}).encode()


def _json(content: bytes) -> Response:
    return Response(content, media_type="application/json")


@router.get("/tokenizer_info")
async def tokenizer_info(request: Request) -> Response:
    """What vLLM's /tokenizer_info tells (lm-evaluation-harness's remote tokenizer reads the special tokens)."""
    state = _state(request)
    authorize(request, state.options.api_key)
    return JSONResponse(_tokenizer_info(state.model.tokenizer, state.limits.config.n_positions))


def _tokenizer_info(tokenizer: Tokenizer | None, context: int) -> dict[str, Any]:
    if tokenizer is None:
        raise RequestError(400, "this model has no tokenizer: it takes token ids only", code="no_tokenizer")
    eos = EOS if len(tokenizer.encode(EOS)) == 1 else None
    return {"tokenizer_class": type(tokenizer).__name__, "model_max_length": context,
            "vocab_size": tokenizer.vocab_size, "eos_token": eos, "bos_token": None, "pad_token": None,
            "chat_template": None}


# ---- errors and HTTP metrics ----------------------------------------------------------------------------------
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
