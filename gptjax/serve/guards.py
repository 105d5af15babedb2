"""What every route checks before it works: the API key, the server's readiness, a bounded body; and who sent a
request (the per-client queue share). Each failure is a RequestError: an OpenAI error object, never a traceback."""

from __future__ import annotations

import hashlib
import secrets
from typing import TYPE_CHECKING

from fastapi import Request
from starlette.requests import ClientDisconnect

from gptjax.serve.protocol import RequestError

if TYPE_CHECKING:
    from gptjax.serve.state import ServerState


def authorize(request: Request, api_key: str | None) -> None:
    """A 401 unless the request carries "Authorization: Bearer <api_key>" (when the server has a key)."""
    if api_key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
        raise RequestError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key")


def client_of(request: Request, api_key: str | None) -> str:
    """Who sent a request, for the per-client queue share: its API key when the server checks one (every holder
    of that key is one client), else its address (the API key a keyless server is sent would name whoever
    invents one)."""
    if api_key is not None:
        return "key:" + hashlib.sha256(api_key.encode()).hexdigest()[:16]
    return "address:" + (request.client.host if request.client else "unknown")


def check_ready(state: ServerState) -> None:
    """A 503 (retry after 1 s) unless the server is ready: still loading, failed to warm up, or draining."""
    if state.phase != "ready":
        message = {"loading": "the model is still loading", "failed": "the model failed to warm up (see the "
                   "server log)"}.get(state.phase, "the server is shutting down")
        raise RequestError(503, message, type="server_error", code="unavailable", headers={"Retry-After": "1"})


async def read_body(request: Request, limit: int) -> bytes:
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
