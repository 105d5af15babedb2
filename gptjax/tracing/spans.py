"""OpenTelemetry spans around gptjax's forward passes, built on `opentelemetry-api` only.

With no SDK configured the API hands out non-recording spans: each costs a context switch and nothing else
(attributes are computed only for recording spans). Span names are mirrored into
`jax.profiler.TraceAnnotation`, so the same names appear in profiler traces.

Time is honest by default: a span that produced device arrays ends only after `block_until_ready` on them
(`gptjax.synced=true`); `synced=False` skips that for throughput runs and says so on the span.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from functools import lru_cache
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace

SYSTEM = "gptjax"


@lru_cache(maxsize=1)
def tracer() -> trace.Tracer:
    """gptjax's tracer (a proxy until an SDK provider is installed, so configuring later still works)."""
    from gptjax.version import __version__  # not the package: gptjax/__init__ imports the backends, which import this

    return trace.get_tracer("gptjax", __version__)


class SpanHandle:
    """The span of a forward pass, plus what it must wait for before it may end, and (once the block ended) how
    long it took, device sync included."""

    def __init__(self, span: trace.Span, synced: bool) -> None:
        self.span, self.synced = span, synced
        self._pending: list[Any] = []
        self.seconds = 0.0

    @property
    def recording(self) -> bool:
        """Whether attributes/events are kept (False without an SDK: skip computing them)."""
        return self.span.is_recording()

    def wait_for(self, result: Any) -> Any:
        """Register device arrays this span produced; with syncing on they are awaited before the span ends."""
        self._pending.append(result)
        return result

    def set(self, attributes: dict[str, Any] | Callable[[], dict[str, Any]]) -> None:
        """Set attributes (a callable is only called when the span records)."""
        if self.recording:
            self.span.set_attributes(attributes() if callable(attributes) else attributes)

    def event(self, name: str, attributes: dict[str, Any] | None = None) -> None:
        """Add an event (e.g. one per generated token) when recording."""
        if self.recording:
            self.span.add_event(name, attributes or {})

    def _finish(self) -> None:
        if self.synced and self._pending:
            import jax

            jax.block_until_ready(self._pending)
        if self.recording:
            self.span.set_attribute("gptjax.synced", self.synced)


@contextlib.contextmanager
def forward_span(name: str, attributes: dict[str, Any] | Callable[[], dict[str, Any]], *, synced: bool = True,
                 parent: trace.Span | None = None, links: Sequence[trace.Span] = ()) -> Iterator[SpanHandle]:
    """A span (current while the block runs) around one forward pass or step; errors are recorded on it with
    status ERROR and `error.type`; the same name is pushed as a jax.profiler.TraceAnnotation. The handle's
    `seconds` is the block's duration once it ended. links: spans this one also works for (e.g. the other
    requests of a shared decode chunk), as span links."""
    import jax

    ctx = trace.set_span_in_context(parent) if parent is not None else None
    span = tracer().start_span(name, context=ctx, links=[trace.Link(s.get_span_context()) for s in links] or None)
    handle, t0 = SpanHandle(span, synced), time.perf_counter()
    handle.set(attributes)
    token = otel_context.attach(trace.set_span_in_context(span))
    try:
        with jax.profiler.TraceAnnotation(name):
            yield handle
            handle._finish()
    except BaseException as e:
        record_error(span, e)
        raise
    finally:
        handle.seconds = time.perf_counter() - t0
        otel_context.detach(token)
        span.end()


def record_error(span: trace.Span, error: BaseException) -> None:
    """Mark a span failed: the exception event, status ERROR, and `error.type` (the exception class)."""
    if span.is_recording():
        span.record_exception(error)
        span.set_status(trace.Status(trace.StatusCode.ERROR, str(error)[:200]))
        span.set_attribute("error.type", type(error).__qualname__)


def start_parent(name: str, attributes: dict[str, Any] | Callable[[], dict[str, Any]], *,
                 context: otel_context.Context | None = None, start_time: int | None = None,
                 links: Sequence[trace.Span] = ()) -> trace.Span:
    """A parent span (e.g. one generate call, or a training run's logging interval) started but not made current:
    the caller passes it to forward_span(parent=...) and ends it, which works across generator yields. context
    and start_time (ns) let a lazily started generator place the span where and when the call was made; links
    point at related spans in other traces."""
    span = tracer().start_span(name, context=context, start_time=start_time,
                               links=[trace.Link(s.get_span_context()) for s in links] or None)
    if span.is_recording():
        span.set_attributes(attributes() if callable(attributes) else attributes)
    return span
