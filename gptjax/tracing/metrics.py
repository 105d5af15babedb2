"""Prometheus metrics for throughput, latency and errors, in a registry of gptjax's own (no collisions with
other libraries, several models per process): every gptjax metric is declared here. Pass a `Metrics` to a backend
(`get_backend(..., metrics=m)`) or to `train(..., metrics=m)`; expose it with `serve_metrics(port)` or
`m.render()`. `gptjax serve` adds its HTTP metrics (`m.server`) to the same registry.

| metric | type | labels | GenAI semantic-convention equivalent |
|---|---|---|---|
| gptjax_forward_seconds | histogram | phase, backend | — (one forward pass: prefill, decode chunk, train/eval step) |
| gptjax_time_to_first_token_seconds | histogram | backend | gen_ai.server.time_to_first_token |
| gptjax_time_per_output_token_seconds | histogram | backend | gen_ai.server.time_per_output_token |
| gptjax_request_duration_seconds | histogram | backend | gen_ai.client.operation.duration |
| gptjax_prompt_tokens_total | counter | backend | gen_ai.client.token.usage (type=input) |
| gptjax_generated_tokens_total | counter | backend | gen_ai.client.token.usage (type=output) |
| gptjax_requests_total | counter | outcome (ok, error, cancelled) | — |
| gptjax_errors_total | counter | error_type | error.type on gen_ai.client.operation.duration |
| gptjax_tokens_per_second | gauge | phase | — (last window) |
| gptjax_mfu_ratio | gauge | phase | — (model FLOP/s over the peak, last window) |
| gptjax_bandwidth_utilization_ratio | gauge | phase | — (weight bytes/s over the measured bandwidth) |
| gptjax_device_memory_bytes | gauge | device | — (where the platform reports it) |
| gptjax_speculative_proposed_tokens_total | counter | backend, draft | — (draft tokens proposed to the target) |
| gptjax_speculative_accepted_tokens_total | counter | backend, draft | — (of those, accepted into the output) |

Speculative decoding's acceptance rate is rate(accepted) / rate(proposed). The server's own (`ServeMetrics`):

| metric | type | labels | meaning |
|---|---|---|---|
| gptjax_http_requests_total | counter | route, method, status | HTTP requests (each label from a fixed set) |
| gptjax_serve_queue_depth | gauge | — | requests waiting for a batch |
| gptjax_serve_batch_size | histogram | — | requests a batch starts with |
| gptjax_serve_decode_rows | histogram | — | rows decoding per decode chunk (batch occupancy) |
| gptjax_serve_cancelled_total | counter | reason | requests whose work was cancelled (timeout, disconnect, ...) |
| gptjax_http_connections_open | gauge | — | open HTTP connections |
| gptjax_http_connections_refused_total | counter | — | connections answered 503 over --max-connections |
| gptjax_http_header_timeouts_total | counter | — | connections closed for slow headers (--header-timeout) |
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_FORWARD = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_TTFT = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_TPOT = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1)
_E2E = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
_ROWS = (1, 2, 4, 8, 16, 32, 64)


class Metrics:
    """The instruments, registered in their own CollectorRegistry."""

    def __init__(self, registry: CollectorRegistry | None = None, *, peak_flops: float | None = None,
                 peak_bandwidth: float | None = None) -> None:
        """peak_flops (FLOP/s) and peak_bandwidth (bytes/s) are the ceilings MFU and bandwidth use are
        reported against (e.g. measured by the benchmarks); without them those gauges stay unset."""
        self.registry = registry or CollectorRegistry()
        self.peak_flops, self.peak_bandwidth = peak_flops, peak_bandwidth
        r = self.registry
        self.forward_seconds = Histogram("gptjax_forward_seconds", "Duration of one forward pass (synced)",
                                         ["phase", "backend"], buckets=_FORWARD, registry=r)
        self.ttft = Histogram("gptjax_time_to_first_token_seconds", "Time from request to first token",
                              ["backend"], buckets=_TTFT, registry=r)
        self.tpot = Histogram("gptjax_time_per_output_token_seconds", "Decode time per output token",
                              ["backend"], buckets=_TPOT, registry=r)
        self.request_seconds = Histogram("gptjax_request_duration_seconds", "End-to-end generate latency",
                                         ["backend"], buckets=_E2E, registry=r)
        self.prompt_tokens = Counter("gptjax_prompt_tokens", "Prompt tokens processed", ["backend"], registry=r)
        self.generated_tokens = Counter("gptjax_generated_tokens", "Tokens generated", ["backend"], registry=r)
        self.requests = Counter("gptjax_requests", "Generate requests by outcome", ["outcome"], registry=r)
        self.errors = Counter("gptjax_errors", "Errors by exception type", ["error_type"], registry=r)
        self.tokens_per_second = Gauge("gptjax_tokens_per_second", "Tokens/s of the last window", ["phase"],
                                       registry=r)
        self.mfu = Gauge("gptjax_mfu_ratio", "Model FLOP/s over peak FLOP/s, last window", ["phase"], registry=r)
        self.bandwidth = Gauge("gptjax_bandwidth_utilization_ratio", "Weight bytes/s over measured bandwidth",
                               ["phase"], registry=r)
        self.device_memory = Gauge("gptjax_device_memory_bytes", "Device memory in use", ["device"], registry=r)
        self.spec_proposed = Counter("gptjax_speculative_proposed_tokens", "Draft tokens proposed to the target",
                                     ["backend", "draft"], registry=r)
        self.spec_accepted = Counter("gptjax_speculative_accepted_tokens", "Draft tokens accepted by the target",
                                     ["backend", "draft"], registry=r)
        self.compiles = Counter("gptjax_compiles", "Compilations, by the pass that compiled (prefill, decode, "
                                "speculate, score, forward) and purpose (warmup, or request: a user waited)",
                                ["phase", "purpose"], registry=r)
        self.compiled_programs = Gauge("gptjax_compiled_programs", "Compiled programs the backend holds",
                                       ["backend"], registry=r)

    def observe_forward(self, phase: str, backend: str, seconds: float, tokens: int = 0) -> None:
        """One forward pass (or chunk of decode steps) took `seconds` and produced/consumed `tokens`."""
        self.forward_seconds.labels(phase=phase, backend=backend).observe(seconds)
        if tokens and seconds > 0:
            self.tokens_per_second.labels(phase=phase).set(tokens / seconds)

    def observe_request(self, backend: str, seconds: float, prompt_tokens: int, generated: int, outcome: str,
                        error: BaseException | None = None) -> None:
        """A finished generate call: its latency, token counts, outcome (ok/error/cancelled) and error type."""
        self.request_seconds.labels(backend=backend).observe(seconds)
        self.prompt_tokens.labels(backend=backend).inc(prompt_tokens)
        self.generated_tokens.labels(backend=backend).inc(generated)
        self.requests.labels(outcome=outcome).inc()
        if error is not None:
            self.errors.labels(error_type=type(error).__qualname__).inc()

    def observe_speculation(self, backend: str, draft: str, proposed: int, accepted: int) -> None:
        """Speculative rounds proposed `proposed` draft tokens (drafter kind `draft`), of which `accepted` were kept."""
        self.spec_proposed.labels(backend=backend, draft=draft).inc(proposed)
        self.spec_accepted.labels(backend=backend, draft=draft).inc(accepted)

    def observe_utilization(self, phase: str, seconds: float, flops: float, weight_bytes: float) -> None:
        """MFU and bandwidth use of a window that did `flops` and streamed `weight_bytes` in `seconds`."""
        if seconds <= 0:
            return
        if self.peak_flops:
            self.mfu.labels(phase=phase).set(flops / seconds / self.peak_flops)
        if self.peak_bandwidth:
            self.bandwidth.labels(phase=phase).set(weight_bytes / seconds / self.peak_bandwidth)

    @cached_property
    def server(self) -> ServeMetrics:
        """The HTTP server's instruments, registered in this registry on first use (by `gptjax serve`)."""
        return ServeMetrics(self.registry)

    def names(self) -> set[str]:
        """Every sample name this registry exposes (e.g. gptjax_requests_total, *_bucket, *_sum, *_count)."""
        families = list(self.registry.collect())
        return {m.name for m in families if m.type == "gauge"} | {s.name for m in families for s in m.samples} | {
            m.name + suffix for m in families if m.type == "histogram" for suffix in ("_bucket", "_sum", "_count")} | {
            m.name + "_total" for m in families if m.type == "counter"}

    def render(self) -> bytes:
        """The Prometheus text exposition of the registry."""
        return generate_latest(self.registry)

    def record_device_memory(self) -> None:
        """Bytes in use per JAX device, where memory_stats() reports them (GPU/TPU; not XLA:CPU)."""
        import jax

        for device in jax.local_devices():
            stats = device.memory_stats() or {}
            if "bytes_in_use" in stats:
                self.device_memory.labels(device=str(device.id)).set(stats["bytes_in_use"])


CANCEL_REASONS = ("disconnect", "timeout", "error", "shutdown")  # why a served request's work stops early


class ServeMetrics:
    """The HTTP server's instruments (the table above); its gauges read their values through set_function."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.http = Counter("gptjax_http_requests", "HTTP requests by route, method and status",
                            ["route", "method", "status"], registry=r)
        self.queue_depth = Gauge("gptjax_serve_queue_depth", "Requests waiting for a batch", registry=r)
        self.batch_size = Histogram("gptjax_serve_batch_size", "Requests per batch", buckets=_ROWS, registry=r)
        self.cancelled = Counter("gptjax_serve_cancelled", "Requests whose work was cancelled, by reason",
                                 ["reason"], registry=r)
        for reason in CANCEL_REASONS:  # each series exists from the start at 0, so a dashboard's rate() has data
            self.cancelled.labels(reason=reason)
        self.decode_rows = Histogram("gptjax_serve_decode_rows", "Rows decoding per decode chunk (batch occupancy)",
                                     buckets=_ROWS, registry=r)
        self.connections_open = Gauge("gptjax_http_connections_open", "Open HTTP connections", registry=r)
        self.connections_refused = Counter("gptjax_http_connections_refused", "Connections answered 503 because "
                                           "--max-connections were already open", registry=r)
        self.header_timeouts = Counter("gptjax_http_header_timeouts", "Connections closed for not completing a "
                                       "request's headers within --header-timeout", registry=r)


def serve_metrics(port: int, host: str = "127.0.0.1", metrics: Metrics | None = None) -> Any:
    """Serve GET /metrics of a Metrics registry over HTTP in a daemon thread; returns the server (call
    .shutdown() to stop). Binds 127.0.0.1 unless host says otherwise."""
    from prometheus_client import start_http_server

    from gptjax.errors import GptjaxError

    if metrics is None:
        raise GptjaxError("serve_metrics needs the Metrics whose registry it should expose")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise GptjaxError(f"port={port!r} must be an integer in [0, 65535]")
    server, _thread = start_http_server(port, addr=host, registry=metrics.registry)
    return server
