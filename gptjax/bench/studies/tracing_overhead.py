"""What tracing costs: decode throughput with tracing off, with the OpenTelemetry SDK and a batch exporter on
(spans synced), and with span syncing off.

    gptjax bench --study tracing-overhead              # gpt2 shape, B=1, prompt 32, 128 new tokens, chunks of 8

Streaming in chunks of 8 makes 17 spans and 120 token events per call. An OpenTelemetry tracer provider can be
installed only once per process, so each variant runs in its own process (needs the otel extra); rounds go
A B C A B C so machine drift hits all alike, and each process reports the median of its timed calls after 2
warm-up calls. "on" exports into a BatchSpanProcessor whose exporter counts and drops the spans (the cost of
export without a network).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import numpy as np
from opentelemetry import trace

from gptjax import get_backend, get_preset, init_params
from gptjax.bench.results import Outcome, child_result
from gptjax.errors import GptjaxError
from gptjax.sampling import GREEDY
from gptjax.timing import interleaved_runs, interleaved_times, median

VARIANTS = ("off", "on", "unsynced")
LABELS = {"off": "off (API no-op)", "on": "on (SDK + batch exporter, synced)", "unsynced": "on, unsynced"}
PROMPT = 32  # prompt tokens per row

# flag -> (default, help); the runner adds them (the type is the default's)
FLAGS = {"--preset": ("gpt2", "model shape, random weights"), "--batch": (1, "rows per call"),
         "--new": (128, "new tokens per row"), "--chunk-size": (8, "decode steps per stream chunk"),
         "--runs": (3, "timed calls per process"), "--rounds": (3, "processes per variant, A B C A B C ...")}


def prepare(args: argparse.Namespace) -> None:
    """Check the flags and that the OpenTelemetry SDK is installed."""
    if min(args.batch, args.new, args.chunk_size, args.runs, args.rounds) < 1:
        raise GptjaxError("--batch, --new, --chunk-size, --runs and --rounds must be >= 1")
    try:  # the otel extra is optional: is it installed?
        import opentelemetry.sdk.trace  # noqa: F401
    except ImportError:
        raise GptjaxError("--study tracing-overhead needs the otel extra (pip install 'gptjax[otel]')") from None


def run(args: argparse.Namespace, log: Any) -> Outcome:
    """Each variant's decode throughput, one child process per variant and round."""

    def child(variant: str) -> dict[str, Any]:
        log(f"tracing {variant} ...")
        return child_result(__name__, json.dumps(vars(args) | {"variant": variant}))

    found = interleaved_runs({v: (lambda i, v=v: child(v)) for v in VARIANTS}, args.rounds, warmup=0)
    base = median([r["median_s"] for r in found["off"]])
    rows = []
    for v, results in found.items():
        t = median([r["median_s"] for r in results])
        rows.append({"variant": v, "label": LABELS[v], "preset": args.preset, "batch": args.batch, "prompt": PROMPT,
                     "new": args.new, "chunk_size": args.chunk_size, "median_s": t,
                     "tokens_per_s": args.batch * args.new / t, "cost_vs_off": t / base - 1,
                     "process_median_s": [r["median_s"] for r in results], "spans": results[-1]["spans"]})
    return Outcome(rows, f"gptjax bench --study tracing-overhead: decode, {args.preset}, B={args.batch}, {PROMPT} + "
                   f"{args.new} tokens, stream chunk {args.chunk_size}; median over {args.rounds} processes x "
                   f"{args.runs} calls", table(rows))


def table(rows: list[dict[str, Any]]) -> str:
    """The markdown table: tokens/s, cost against tracing off, spans exported per process."""
    lines = ["| tracing | tokens/s | cost vs off | spans exported per process |", "|---|---|---|---|"]
    lines += [f"| {r['label']} | {r['tokens_per_s']:.1f} | {r['cost_vs_off']:+.1%} | {r['spans']} |" for r in rows]
    return "\n".join(lines)


def _child(task: dict[str, Any]) -> dict[str, Any]:
    """In a fresh process: install the variant's tracer provider, then time streamed decode calls."""
    args, variant = argparse.Namespace(**task), task["variant"]
    spans = [0]
    provider = _discarding_provider(spans) if variant != "off" else None
    config = get_preset(args.preset)
    backend = get_backend("jax", config, trace_sync=variant != "unsynced")
    weights = backend.prepare(init_params(config))
    prompts = [np.random.default_rng(i).integers(0, config.vocab_size, (args.batch, PROMPT)).tolist()
               for i in range(3)]

    def call(i: int) -> None:
        list(backend.stream(weights, prompts[i % 3], args.new, chunk_size=args.chunk_size, sampling=GREEDY))

    times = interleaved_times({variant: call}, args.runs, warmup=2)[variant]
    if provider is not None:
        provider.force_flush()
    return {"variant": variant, "median_s": median(times), "times_s": times, "spans": spans[0]}


def _discarding_provider(spans: list[int]) -> Any:
    """The global tracer provider, exporting through a batch processor into an exporter that counts and drops."""
    from opentelemetry.sdk.trace import TracerProvider  # the otel extra, checked by prepare()
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult  # the otel extra

    class Discard(SpanExporter):
        def export(self, batch: Any) -> SpanExportResult:
            spans[0] += len(batch)
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(Discard()))
    trace.set_tracer_provider(provider)
    return provider


if __name__ == "__main__":  # a child process of the study: its arguments and variant as one JSON object
    print(json.dumps(_child(json.loads(sys.argv[1]))))
