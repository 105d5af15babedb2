"""An OTLP/HTTP trace receiver in this process: what Jaeger, Tempo or an OpenTelemetry Collector would receive from
gptjax, kept as plain dicts. It stands in for them where they cannot run (the tests, `gptjax bench --study
monitoring`): point a gptjax process at it with OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint and `--trace otlp`.

Each span comes back in the shape of gptjax.tracing.setup.span_to_dict (the JSONL exporter's), plus its links:
name, trace_id, span_id, parent_id (hex), start_ns, end_ns, status, attributes, events, links, resource.
Needs opentelemetry-proto (installed with the otel extra's OTLP exporter).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

Span = dict[str, Any]
STATUS = {0: "UNSET", 1: "OK", 2: "ERROR"}  # OTLP's status codes, named as the SDK names them


class OtlpReceiver:
    """POST /v1/traces (protobuf) on 127.0.0.1 in a daemon thread; `spans` holds what arrived, in order."""

    def __init__(self, port: int = 0) -> None:
        self.spans: list[Span] = []
        self.posts: list[str] = []  # the path of every POST (an exporter sends to /v1/traces)
        self.arrived = threading.Condition()
        self.server = ThreadingHTTPServer(("127.0.0.1", port), _handler(self))
        self.thread = threading.Thread(target=self.server.serve_forever, name="otlp-receiver", daemon=True)
        self.thread.start()

    @property
    def endpoint(self) -> str:
        """The base URL to give OTEL_EXPORTER_OTLP_ENDPOINT."""
        return f"http://127.0.0.1:{self.server.server_port}"

    def received(self, path: str, body: bytes) -> None:
        """Decode one export request's spans and wake whoever waits."""
        spans = decode(body)
        with self.arrived:
            self.posts.append(path)
            self.spans.extend(spans)
            self.arrived.notify_all()

    def wait_for(self, ready: Callable[[list[Span]], bool], timeout: float) -> list[Span]:
        """Block until ready(spans so far) holds (woken by each export), or raise TimeoutError after timeout s."""
        with self.arrived:
            if not self.arrived.wait_for(lambda: ready(list(self.spans)), timeout):
                names = sorted({s["name"] for s in self.spans})
                raise TimeoutError(f"the spans awaited did not arrive in {timeout} s; got {len(self.spans)}: {names}")
            return list(self.spans)

    def close(self) -> None:
        """Stop listening."""
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _handler(receiver: OtlpReceiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # http.server's name for it
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            receiver.received(self.path, body)
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass  # no line per export on stderr

    return Handler


def decode(body: bytes) -> list[Span]:
    """The spans of one OTLP ExportTraceServiceRequest (protobuf bytes) as dicts."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    request = ExportTraceServiceRequest()
    request.ParseFromString(body)
    out = []
    for rs in request.resource_spans:
        resource = attributes(rs.resource.attributes)
        out += [span_dict(s, resource) for ss in rs.scope_spans for s in ss.spans]
    return out


def span_dict(s: Any, resource: dict[str, Any]) -> Span:
    """One protobuf span as span_to_dict's dict (with links)."""
    return {"name": s.name, "trace_id": s.trace_id.hex(), "span_id": s.span_id.hex(),
            "parent_id": s.parent_span_id.hex() or None, "start_ns": s.start_time_unix_nano,
            "end_ns": s.end_time_unix_nano, "status": STATUS[s.status.code], "attributes": attributes(s.attributes),
            "events": [{"name": e.name, "time_ns": e.time_unix_nano, "attributes": attributes(e.attributes)}
                       for e in s.events],
            "links": [{"trace_id": k.trace_id.hex(), "span_id": k.span_id.hex()} for k in s.links],
            "resource": resource}


def attributes(pairs: Any) -> dict[str, Any]:
    """OTLP key-value pairs as a dict of Python values."""
    return {kv.key: value(kv.value) for kv in pairs}


def value(v: Any) -> Any:
    """An OTLP AnyValue as a Python value (arrays as tuples, as the SDK keeps them)."""
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return tuple(value(x) for x in v.array_value.values)
    if kind == "kvlist_value":
        return attributes(v.kvlist_value.values)
    return None if kind is None else getattr(v, kind)
