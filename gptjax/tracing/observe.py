"""The wrapper that puts spans and metrics around any backend's calls, built-in or plug-in.

A `Backend` (gptjax.backends.base) hands its work to its `Observer`: a forward or scoring pass runs inside
`batch_pass`, a generation's chunks go through `stream`, which opens one `text_completion <model>` span per call
(started when the call is made, in the trace current then) and one `gptjax.prefill` / `gptjax.decode` /
`gptjax.speculate` span per chunk, and reports each chunk to the Prometheus metrics. The server's decode sessions
(gptjax.serve.continuous) report through the same methods. A backend inherits none of this: the observer only
reads its name, config, precision, compile count and placement. Without an OpenTelemetry SDK every span is a
no-op; without a gptjax.tracing.Metrics every report returns at once.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from opentelemetry import context as otel_context
from opentelemetry import trace

from gptjax.config import GPTConfig
from gptjax.precision import storage
from gptjax.tracing.metrics import Metrics
from gptjax.tracing.spans import SpanHandle, forward_span, record_error, start_parent

if TYPE_CHECKING:
    from gptjax.generate import GenerationRequest, StreamChunk
    from gptjax.speculative import Speculation


class Observed(Protocol):
    """What the observer reads of a backend (gptjax.backends.Backend has all of it)."""

    name: str
    config: GPTConfig

    @property
    def precision(self) -> str: ...

    def compile_count(self) -> int: ...

    def placement(self) -> tuple[int, str]: ...


# Why the calls in this context run: "request" (a user's, the default) or "warmup" (compiling before serving).
# Warm-up calls get their own spans (gptjax.purpose=warmup) and count only as compilations, not as requests.
PURPOSE: contextvars.ContextVar[str] = contextvars.ContextVar("gptjax_purpose", default="request")


class Observer:
    """Spans and metrics around one backend's calls. metrics: a gptjax.tracing.Metrics, or None for none;
    synced=False: spans do not wait for device results (and say so: gptjax.synced=false)."""

    def __init__(self, backend: Observed, metrics: Metrics | None = None, synced: bool = True) -> None:
        self.backend, self.metrics, self.synced = backend, metrics, synced
        if metrics is not None:
            metrics.compiled_programs.labels(backend=backend.name).set_function(backend.compile_count)

    @staticmethod
    @contextlib.contextmanager
    def warmup() -> Iterator[None]:
        """Calls made inside are warm-up, not requests: traced with gptjax.purpose=warmup, their compilations
        counted as purpose="warmup", and none of the request metrics (latency, tokens, outcomes) recorded."""
        token = PURPOSE.set("warmup")
        try:
            yield
        finally:
            PURPOSE.reset(token)

    @property
    def warming_up(self) -> bool:
        """Whether calls in the current context are warm-up."""
        return PURPOSE.get() == "warmup"

    # ---- spans ---------------------------------------------------------------------------------------------
    @property
    def model_name(self) -> str:
        """A name for gen_ai.request.model: the shape of the model."""
        c = self.backend.config
        return f"gpt-{c.n_layer}L-{c.n_embd}d-{c.vocab_size}v"

    def span_attributes(self, phase: str, batch: int, seq_len: int) -> dict[str, Any]:
        """The attributes of a span around one forward pass (phase prefill/decode/score/generate) of `batch` rows
        at sequence length `seq_len`: model, backend, precision, devices, mesh (OpenTelemetry GenAI names)."""
        b = self.backend
        devices, mesh = b.placement()
        return {"gen_ai.provider.name": "gptjax", "gen_ai.request.model": self.model_name, "gptjax.backend": b.name,
                "gptjax.precision": b.precision, "gptjax.batch_size": batch, "gptjax.seq_len": seq_len,
                "gptjax.devices": devices, "gptjax.mesh": mesh, "gptjax.phase": phase,
                "gptjax.purpose": PURPOSE.get()}

    def request_span(self, batch: int, longest: int, attributes: Callable[[], dict[str, Any]], *,
                     context: otel_context.Context | None = None, start_time: int | None = None) -> trace.Span:
        """A started, not current, `text_completion <model>` span over a batch whose longest prompt has `longest`
        tokens, with the request's `attributes` (computed only when it records); the caller ends it."""
        return start_parent(f"text_completion {self.model_name}",
                            lambda: self.span_attributes("generate", batch, longest) | attributes(),
                            context=context, start_time=start_time)

    @contextlib.contextmanager
    def forward_pass(self, name: str, phase: str, batch: int, seq_len: int, parent: trace.Span | None = None,
                     links: Sequence[trace.Span] = ()) -> Iterator[SpanHandle]:
        """A `gptjax.<name>` span around one forward pass or chunk at sequence length `seq_len` (the tokens each
        row's sequence holds when the pass starts, padding not counted), saying whether it compiled; its handle's
        `seconds` is the pass's duration once the block ended. links: the other requests it works for."""
        before = self.backend.compile_count()
        with forward_span(f"gptjax.{name}", lambda: self.span_attributes(phase, batch, seq_len), parent=parent,
                          synced=self.synced, links=links) as span:
            yield span
            compiled = self.backend.compile_count() - before
            span.set({"gptjax.compiled": compiled > 0})
        if compiled > 0 and self.metrics is not None:
            self.metrics.compiles.labels(phase=name, purpose=PURPOSE.get()).inc(compiled)

    @contextlib.contextmanager
    def batch_pass(self, name: str, phase: str, batch: int, seq_len: int) -> Iterator[SpanHandle]:
        """forward_pass over whole sequences [batch, seq_len] (forward, score), reported as a prefill's forward time."""
        with self.forward_pass(name, phase, batch, seq_len) as span:
            yield span
        self.report_forward("prefill", span.seconds, batch * seq_len)

    def stream(self, chunks: Iterator[StreamChunk], request: GenerationRequest, spec: Speculation | None = None
               ) -> Iterator[StreamChunk]:
        """The chunks of a generation (a backend's _generate, or _speculate's with a drafter; not started yet),
        each in its span under the call's text_completion span, each reported to the metrics."""
        return _Call(self, request, spec).run(chunks)

    # ---- metrics: generate() and the server's decode sessions alike --------------------------------------------
    def _reported(self) -> Metrics | None:
        """The metrics a request's reports go to: none during warm-up (it counts only as compilations)."""
        return None if self.warming_up else self.metrics

    def report_forward(self, phase: str, seconds: float, tokens: int) -> None:
        """A forward pass (phase prefill/decode) over `tokens` tokens took `seconds`."""
        if (m := self._reported()) is not None:
            m.observe_forward(phase, self.backend.name, seconds, tokens)

    def report_prefill(self, seconds: float, prompt_lengths: Sequence[int]) -> None:
        """A prefill of prompts of these lengths took `seconds`: forward time, tokens/s, MFU, bandwidth use."""
        m, c = self._reported(), self.backend.config
        if m is None:
            return
        m.observe_forward("prefill", self.backend.name, seconds, sum(prompt_lengths))
        flops = sum(c.forward_flops(1, n, last_only=True) for n in prompt_lengths)
        m.observe_utilization("prefill", seconds, flops, c.weight_bytes(storage(self.backend.precision)))

    def report_decode(self, seconds: float, steps: int, tokens: int, position: int) -> None:
        """`steps` decode steps from sequence position `position` gave `tokens` tokens (all rows) in `seconds`:
        forward time, tokens/s, time per output token, MFU and bandwidth use."""
        m, c = self._reported(), self.backend.config
        if m is None:
            return
        m.observe_forward("decode", self.backend.name, seconds, tokens)
        if steps:
            m.tpot.labels(backend=self.backend.name).observe(seconds / steps)
            per_token = c.forward_flops(1, position + steps) - c.forward_flops(1, position + steps - 1)
            m.observe_utilization("decode", seconds, per_token * tokens,
                                  c.weight_bytes(storage(self.backend.precision)) * steps)

    def report_first_token(self, seconds: float) -> None:
        """A request's first token came `seconds` after it arrived."""
        if (m := self._reported()) is not None:
            m.ttft.labels(backend=self.backend.name).observe(seconds)

    def report_request(self, seconds: float, prompt_tokens: int, generated: int, outcome: str,
                       error: BaseException | None = None) -> None:
        """A request finished: latency, token counts, outcome (ok, error, cancelled) and error type."""
        if (m := self._reported()) is not None:
            m.observe_request(self.backend.name, seconds, prompt_tokens, generated, outcome, error)

    def report_speculation(self, draft: str, proposed: int, accepted: int) -> None:
        """Speculative rounds (drafter kind `draft`) proposed `proposed` draft tokens, of which `accepted` were kept."""
        if (m := self._reported()) is not None:
            m.observe_speculation(self.backend.name, draft, proposed, accepted)


class _Call:
    """One generate/stream call's telemetry: its text_completion span, where its stream is, and how it ended."""

    def __init__(self, observer: Observer, request: GenerationRequest, spec: Speculation | None) -> None:
        self.observer, self.request, self.spec = observer, request, spec
        self.context, self.start_ns, self.t_start = otel_context.get_current(), time.time_ns(), time.perf_counter()
        self.longest = max(len(p) for p in request.prompts)
        self.position, self.generated = self.longest, 0
        self.reasons: list[str | None] = [None]
        self.outcome, self.error = "ok", None

    def run(self, chunks: Iterator[StreamChunk]) -> Iterator[StreamChunk]:
        """Yield the chunks; the span ends, and the request is reported, when the stream ends, fails or is
        closed early (a consumer that stops reading: outcome cancelled)."""
        r = self.request
        self.parent = self.observer.request_span(r.batch, self.longest, lambda: request_attributes(r),
                                                 context=self.context, start_time=self.start_ns)
        try:
            while not all(self.reasons):
                yield self._next(chunks)
        except GeneratorExit:
            if not all(self.reasons):  # closed before its last chunk
                self.outcome = "cancelled"
                self.parent.set_attribute("gptjax.cancelled", True)
            raise
        except BaseException as e:
            self.outcome, self.error = "error", e
            record_error(self.parent, e)
            raise
        finally:
            chunks.close()
            self.parent.end()
            self.observer.report_request(time.perf_counter() - self.t_start, sum(len(p) for p in r.prompts),
                                         self.generated, self.outcome, self.error)

    def _next(self, chunks: Iterator[StreamChunk]) -> StreamChunk:
        """The next chunk, computed inside its span, reported, and counted."""
        phase = "prefill" if self.generated == 0 and self.position == self.longest else "decode"
        name = "speculate" if self.spec is not None and phase == "decode" else phase
        with self.observer.forward_pass(name, phase, self.request.batch, self.position, self.parent) as span:
            chunk = next(chunks)
            steps = max((len(t) for t in chunk.tokens), default=0)
            span.set({"gptjax.steps": steps} | speculation_attributes(self.spec, chunk))
            if phase == "decode":
                token_events(span, self.position, steps)
        self._report(phase, span.seconds, steps, chunk)
        self.generated += sum(len(t) for t in chunk.tokens)
        self.position += max(1, steps)
        self.reasons = chunk.finish_reasons
        if all(self.reasons):  # said before the last yield: a consumer may stop reading right after it
            self._finished()
        return chunk

    def _finished(self) -> None:
        """The call's output tokens and finish reasons on its span."""
        set_finished(self.parent, self.generated, self.reasons)

    def _report(self, phase: str, seconds: float, steps: int, chunk: StreamChunk) -> None:
        """A chunk's metrics: a prefill's (and the time to first token), or a decode chunk's (and its drafts)."""
        o = self.observer
        if phase == "prefill":
            o.report_prefill(seconds, [len(p) for p in self.request.prompts])
            o.report_first_token(time.perf_counter() - self.t_start)
            return
        o.report_decode(seconds, steps, sum(len(t) for t in chunk.tokens), self.position)
        if self.spec is not None:
            o.report_speculation(self.spec.draft.kind, chunk.proposed, chunk.accepted)


def request_attributes(request: GenerationRequest) -> dict[str, Any]:
    """A generate call's GenAI request attributes: its token budget, sampling settings and input tokens."""
    sp = request.sampling
    attributes = {"gen_ai.operation.name": "text_completion", "gen_ai.request.max_tokens": request.max_new_tokens,
                  "gen_ai.request.temperature": 0.0 if sp.is_greedy else sp.temperature,
                  "gen_ai.request.seed": sp.seed, "gen_ai.usage.input_tokens": sum(len(p) for p in request.prompts)}
    for name in ("top_p", "top_k"):
        if getattr(sp, name) is not None:
            attributes[f"gen_ai.request.{name}"] = getattr(sp, name)
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(sp, name):
            attributes[f"gen_ai.request.{name}"] = getattr(sp, name)
    return attributes


def token_events(span: SpanHandle, position: int, steps: int) -> None:
    """A `gptjax.token` event per decode step of a recording chunk span, at sequence positions `position`..."""
    if span.recording:
        for i in range(steps):
            span.event("gptjax.token", {"gptjax.position": position + i})


def set_finished(span: trace.Span, generated: int, reasons: Sequence[str | None]) -> None:
    """A finished request's GenAI response attributes: its output tokens and each row's finish reason (none
    given: a cancelled request's)."""
    if span.is_recording():
        span.set_attribute("gen_ai.usage.output_tokens", generated)
        if reasons:
            span.set_attribute("gen_ai.response.finish_reasons", [str(r) for r in reasons])


def speculation_attributes(spec: Speculation | None, chunk: StreamChunk) -> dict[str, Any]:
    """A speculative chunk's span attributes: the drafter, k, and its draft tokens proposed and accepted (the
    draft and verify passes of a round run inside one jitted loop, so they are counted, not timed apart)."""
    if spec is None or chunk.phase != "decode":
        return {}
    return {"gptjax.draft": spec.draft.kind, "gptjax.spec.k": spec.k, "gptjax.spec.proposed": chunk.proposed,
            "gptjax.spec.accepted": chunk.accepted}
