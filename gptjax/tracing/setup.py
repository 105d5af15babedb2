"""Turning telemetry on: an OpenTelemetry SDK with a console, OTLP or JSONL exporter, and JSON logs that carry
the current trace and span ids. Needs the `otel` extra (the SDK) for every exporter but "none".

Standard environment variables are honoured: OTEL_SDK_DISABLED, OTEL_TRACES_EXPORTER (console, otlp, jsonl,
none), OTEL_SERVICE_NAME, OTEL_EXPORTER_OTLP_ENDPOINT / OTEL_EXPORTER_OTLP_TRACES_ENDPOINT and
OTEL_EXPORTER_OTLP_PROTOCOL (http/protobuf, or grpc when its exporter is installed).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Sequence
from typing import Any

from gptjax.errors import GptjaxError

EXPORTERS = ("console", "otlp", "jsonl", "none")


def configure(exporter: str | None = None, *, service_name: str | None = None, path: str | None = None,
              endpoint: str | None = None, json_logs: bool = False, log_level: int = logging.INFO) -> Any:
    """Install a tracer provider exporting gptjax's spans; returns it (call .shutdown() to flush), or None for
    "none". exporter defaults to $OTEL_TRACES_EXPORTER, else "none"; jsonl writes one span per line to path.
    A second call adds its exporter to the provider already installed (one provider per process)."""
    if json_logs:
        install_json_logs(log_level)
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return None
    exporter = exporter or os.environ.get("OTEL_TRACES_EXPORTER", "none").split(",")[0].strip() or "none"
    if exporter not in EXPORTERS:
        raise GptjaxError(f"trace exporter {exporter!r}; allowed: {', '.join(EXPORTERS)}")
    if exporter == "none":
        return None
    if exporter == "jsonl" and not path:
        raise GptjaxError("the jsonl trace exporter needs a file path (--trace FILE or path=...)")
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    except ImportError:
        raise GptjaxError("tracing needs the OpenTelemetry SDK: pip install 'gptjax[otel]'") from None
    span_exporter = _exporter(exporter, path, endpoint)
    processor = (SimpleSpanProcessor if exporter == "console" else BatchSpanProcessor)(span_exporter)
    current = trace.get_tracer_provider()
    if isinstance(current, TracerProvider):  # OpenTelemetry allows one provider per process: add to it
        current.add_span_processor(processor)
        return current
    name = service_name or os.environ.get("OTEL_SERVICE_NAME") or "gptjax"
    provider = TracerProvider(resource=Resource.create({"service.name": name}))
    provider.add_span_processor(processor)
    trace.set_tracer_provider(provider)
    return provider


def _exporter(kind: str, path: str | None, endpoint: str | None) -> Any:
    if kind == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if kind == "jsonl":
        return JsonlSpanExporter(path)
    if os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf") == "grpc":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        except ImportError:
            raise GptjaxError("OTEL_EXPORTER_OTLP_PROTOCOL=grpc needs opentelemetry-exporter-otlp-proto-grpc") from None
        return OTLPSpanExporter(endpoint=endpoint) if endpoint else OTLPSpanExporter()
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError:
        raise GptjaxError("the otlp exporter needs opentelemetry-exporter-otlp-proto-http: "
                          "pip install 'gptjax[otel]'") from None
    if endpoint:
        return OTLPSpanExporter(endpoint=endpoint.rstrip("/") + "/v1/traces")
    return OTLPSpanExporter()  # reads OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT, default http://localhost:4318


class JsonlSpanExporter:
    """A span exporter writing one JSON object per finished span to a file (appending, flushed per batch)."""

    def __init__(self, path: str) -> None:
        self.path, self._lock = path, threading.Lock()
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise GptjaxError(f"trace file {path!r}: directory {directory!r} does not exist")

    def export(self, spans: Sequence[Any]) -> Any:
        """Append the spans; SUCCESS or FAILURE as the SDK expects."""
        from opentelemetry.sdk.trace.export import SpanExportResult

        try:
            with self._lock, open(self.path, "a", encoding="utf-8") as f:
                for s in spans:
                    f.write(json.dumps(span_to_dict(s), default=str) + "\n")
            return SpanExportResult.SUCCESS
        except OSError:
            return SpanExportResult.FAILURE

    def shutdown(self) -> None:
        """Nothing to release: the file is opened per batch."""

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Batches are written synchronously."""
        return True


def span_to_dict(span: Any) -> dict[str, Any]:
    """A finished SDK span as plain JSON-able data (ids in hex, times in ns since the epoch)."""
    ctx, parent = span.context, span.parent
    return {
        "name": span.name, "trace_id": f"{ctx.trace_id:032x}", "span_id": f"{ctx.span_id:016x}",
        "parent_id": f"{parent.span_id:016x}" if parent else None, "start_ns": span.start_time,
        "end_ns": span.end_time, "status": span.status.status_code.name, "attributes": dict(span.attributes),
        "events": [{"name": e.name, "time_ns": e.timestamp, "attributes": dict(e.attributes)} for e in span.events],
        "resource": dict(span.resource.attributes),
    }


class JsonLogFormatter(logging.Formatter):
    """One JSON object per record, with the current trace_id/span_id so a log line leads to its trace."""

    def format(self, record: logging.LogRecord) -> str:
        from opentelemetry import trace

        ctx = trace.get_current_span().get_span_context()
        payload = {"time": self.formatTime(record), "level": record.levelname, "logger": record.name,
                   "message": record.getMessage()}
        payload |= getattr(record, "fields", {})  # a record's own fields (extra={"fields": {...}}), e.g. access logs
        if ctx.is_valid:
            payload |= {"trace_id": f"{ctx.trace_id:032x}", "span_id": f"{ctx.span_id:016x}"}
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        return json.dumps(payload)


def install_json_logs(level: int = logging.INFO) -> logging.Handler:
    """Route the `gptjax` logger's records to stderr as JSON lines (replacing a previous JSON handler)."""
    logger = logging.getLogger("gptjax")
    for h in [h for h in logger.handlers if isinstance(h.formatter, JsonLogFormatter)]:
        logger.removeHandler(h)
    handler = logging.StreamHandler()
    handler.setFormatter(JsonLogFormatter())
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    return handler


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def install_text_logs(level: int = logging.INFO) -> logging.Handler:
    """Route the `gptjax` logger's records to stderr as text lines, unless a handler is already installed
    (e.g. the JSON one); returns the handler in place."""
    logger = logging.getLogger("gptjax")
    if logger.handlers:
        return logger.handlers[0]
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    return handler
