"""Connection limits for the HTTP server: a header timeout and a cap on open connections.

uvicorn (checked on 0.54, h11) closes a keep-alive connection that stays idle `timeout_keep_alive` seconds after
a response, but nothing closes a connection that never completes a request: a client that connects and sends
nothing (or a header a byte at a time) holds a socket for ever, and enough of them exhaust the process's file
descriptors. uvicorn's `limit_concurrency` does not fit either: it decides only once a request's headers
arrive, counts the asking connection itself (so it serves limit - 1) and tasks too, logs every refusal and
counts none. Hence this protocol: uvicorn's h11 one, plus
  - a header timeout: a connection must complete a request's headers within `header_timeout` seconds of
    opening (or of its previous response ending), else it is closed without an answer (as nginx does);
  - a cap: a connection opened while `max_connections` are already open gets 503 (and is closed) for its
    request, counted in /metrics and logged (one line, at most every `log_every` seconds).
The server therefore always speaks h11 (pure Python), even where httptools is installed.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import time
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

from gptjax.serve.protocol import RequestError
from gptjax.tracing.metrics import ServeMetrics

log = logging.getLogger("gptjax.serve")


class ConnectionLimits:
    """The policy every connection shares, with its instruments: header timeout, cap, refusal log and metrics."""

    def __init__(self, metrics: ServeMetrics, *, header_timeout: float, max_connections: int,
                 log_every: float = 10.0) -> None:
        """metrics: the server's instruments (gptjax.tracing.metrics: connections open, refused, timed out)."""
        self.header_timeout, self.max_connections, self.log_every = header_timeout, max_connections, log_every
        self.refused, self.timed_out = metrics.connections_refused, metrics.header_timeouts
        self.open = 0  # connections open now (refused ones until they close)
        metrics.connections_open.set_function(lambda: self.open)
        self._last_log, self._unlogged = -math.inf, 0
        body = RequestError(503, "too many connections: retry later", type="server_error", code="overloaded")
        self._refusal = json.dumps(body.body()).encode()

    def protocol(self) -> Any:
        """The protocol class (a factory) to give uvicorn.Config(http=...)."""
        return functools.partial(LimitedH11Protocol, limits=self)

    async def refuse(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """The ASGI app an over-cap connection gets: 503, Retry-After: 1, Connection: close."""
        self.refused.inc()
        self._log_refusal()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(self._refusal)).encode()),
                   (b"retry-after", b"1"), (b"connection", b"close")]
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": self._refusal})

    def _log_refusal(self) -> None:
        """One warning line, then at most one per log_every seconds (saying how many were refused meanwhile):
        a flood must not flood the log. /metrics has the exact count."""
        self._unlogged += 1
        now = time.monotonic()
        if now - self._last_log < self.log_every:
            return
        log.warning("connection cap hit: %d connections open (--max-connections %d); refused %d with 503 since "
                    "the last such line", self.open, self.max_connections, self._unlogged,
                    extra={"fields": {"max_connections": self.max_connections, "refused": self._unlogged}})
        self._last_log, self._unlogged = now, 0


class LimitedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with ConnectionLimits' header timeout and connection cap."""

    def __init__(self, *args: Any, limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        over = self.limits.open >= self.limits.max_connections  # counted before this one joins
        super().connection_made(transport)
        self.limits.open += 1
        if over:
            self.app = self.limits.refuse  # its request gets 503; reading it first lets the client see the answer
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        self.limits.open -= 1
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():  # keep-alive: the next request's headers are due in time too
            self._arm_header_timer()

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        # A request whose headers complete starts a new cycle; the timer closes only if none has.
        self._header_timer = self.loop.call_later(self.limits.header_timeout, self._header_timeout, self.cycle)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self, cycle_when_armed: Any) -> None:
        self._header_timer = None
        if self.cycle is cycle_when_armed and not self.transport.is_closing():
            self.limits.timed_out.inc()
            self.transport.close()
