"""Tracing and metrics around backend calls (OpenTelemetry spans, Prometheus metrics): filled by the
observability issue. The model code never imports this package."""
