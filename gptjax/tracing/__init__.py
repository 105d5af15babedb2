"""Observability: OpenTelemetry spans around every forward pass (API only; no-ops without an SDK), Prometheus
metrics, the `Observer` that puts both around any backend's calls (session.py: the server's decode sessions), and
`configure()` to export spans (console, OTLP, JSONL) with JSON logs carrying trace ids. The model code never
imports this package; the backends' public methods (through their observer) and the training loop wrap their work
in these spans. receiver.py (an in-process OTLP receiver) and prometheus.py (a local Prometheus on deploy/'s
config) stand in for a tracing backend and the compose stack in the tests and `gptjax bench --study monitoring`."""

from gptjax.tracing.metrics import Metrics, ServeMetrics, serve_metrics
from gptjax.tracing.observe import Observer
from gptjax.tracing.setup import EXPORTERS, JsonlSpanExporter, configure, install_json_logs
from gptjax.tracing.spans import forward_span, record_error, start_parent, tracer

__all__ = ["EXPORTERS", "JsonlSpanExporter", "Metrics", "Observer", "ServeMetrics", "configure", "forward_span",
           "install_json_logs", "record_error", "serve_metrics", "start_parent", "tracer"]
