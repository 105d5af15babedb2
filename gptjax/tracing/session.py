"""The spans of a decode session (continuous batching, gptjax.serve.continuous), where requests join and leave a
running batch, so one forward pass serves several requests.

Each request gets its own `text_completion <model>` span (under the span its caller gives: the server's batch or
request span) with the attributes a generate call's span has: model, sampling settings, input and output tokens,
finish reason, purpose, plus `gptjax.continuous=true`. Each prefill or decode chunk is a span under the oldest
live request's span, linked from the other requests it served (OpenTelemetry span links), so every request's
trace leads to every pass that worked for it; `gptjax.seq_len` is the longest row's sequence length, as in
generate's spans (padding not counted).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from opentelemetry import trace

from gptjax.tracing.observe import Observer, request_attributes, set_finished
from gptjax.tracing.spans import SpanHandle, record_error

if TYPE_CHECKING:
    from gptjax.generate import GenerationRequest

CONTINUOUS = {"gptjax.continuous": True}  # a session request's span says so


class SessionSpans:
    """The open `text_completion` span of each request (row owner) of one session, oldest first."""

    def __init__(self, observer: Observer) -> None:
        self.observer = observer
        self.rows: dict[Any, trace.Span] = {}  # owner -> its request span; insertion order is age

    def start(self, owner: Any, request: GenerationRequest, parent: trace.Span | None) -> None:
        """Open the span of owner's one-row request, under parent (None: the current context)."""
        context = trace.set_span_in_context(parent) if parent is not None else None
        self.rows[owner] = self.observer.request_span(1, len(request.prompts[0]),
                                                      lambda: request_attributes(request) | CONTINUOUS,
                                                      context=context)

    @contextlib.contextmanager
    def forward_pass(self, name: str, phase: str, owners: Sequence[Any], seq_len: int) -> Iterator[SpanHandle]:
        """observer.forward_pass for these rows: under the oldest one's request span, linked from the others'."""
        wanted = set(owners)
        spans = [span for owner, span in self.rows.items() if owner in wanted]
        with self.observer.forward_pass(name, phase, len(owners), seq_len, spans[0] if spans else None,
                                        spans[1:]) as span:
            if phase == "prefill":
                span.set({"gptjax.steps": 1})  # a prefill hands each row its first token, as generate's says
            yield span

    def end(self, owner: Any, generated: int, reason: str | None = None, error: BaseException | None = None) -> None:
        """Close owner's span: its output tokens, and its finish reason, or that it was cancelled (no reason) or
        failed (error)."""
        span = self.rows.pop(owner, None)
        if span is None:
            return
        if error is not None:
            record_error(span, error)
        elif reason is None:
            span.set_attribute("gptjax.cancelled", True)
        set_finished(span, generated, [reason] if reason else [])
        span.end()

    def close(self, error: BaseException | None = None) -> None:
        """Close every span still open (the session ended or failed: error)."""
        for owner in list(self.rows):
            span = self.rows.pop(owner)
            if error is not None:
                record_error(span, error)
            span.end()
