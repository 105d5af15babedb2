"""What tracing costs: decode throughput with tracing off, with the OpenTelemetry SDK and a batch exporter on
(spans synced), and with span syncing off.

    python -m benchmarks.tracing_overhead              # gpt2 shape, B=1, prompt 32, 128 new tokens, chunks of 8

Streaming in chunks of 8 makes 17 spans and 120 token events per call. An OpenTelemetry tracer provider can be
installed only once per process, so each variant runs in its own process; rounds go A B C A B C so machine
drift hits all alike, and each process reports the median of its timed calls after warm-up. "on" exports into
a BatchSpanProcessor whose exporter counts and drops the spans (the cost of export without a network).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

VARIANTS = ("off", "on", "unsynced")


def _child(variant: str, preset: str, batch: int, new: int, chunk: int, runs: int) -> None:
    import numpy as np

    from gptjax import get_backend, get_preset, init_params

    spans = [0]
    if variant != "off":
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExportResult

        class Discard:
            def export(self, s):
                spans[0] += len(s)
                return SpanExportResult.SUCCESS

            def shutdown(self):
                pass

            def force_flush(self, timeout_millis=30000):
                return True

        provider = TracerProvider()
        provider.add_span_processor(BatchSpanProcessor(Discard()))
        trace.set_tracer_provider(provider)
    config = get_preset(preset)
    backend = get_backend("jax", config, trace_sync=variant != "unsynced")
    weights = backend.prepare(init_params(config))
    prompts = [np.random.default_rng(i).integers(0, config.vocab_size, (batch, 32)).tolist() for i in range(3)]
    times = []
    for i in range(runs + 2):
        t0 = time.perf_counter()
        list(backend.stream(weights, prompts[i % 3], new, chunk_size=chunk, greedy=True))
        if i >= 2:
            times.append(time.perf_counter() - t0)
    if variant != "off":
        provider.force_flush()
    print(json.dumps({"variant": variant, "median_s": statistics.median(times), "spans": spans[0]}))


def main(argv: list[str] | None = None) -> int:
    """Run the rounds of child processes and print the table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="gpt2")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--chunk-size", type=int, default=8)
    ap.add_argument("--runs", type=int, default=3, help="timed calls per process")
    ap.add_argument("--rounds", type=int, default=3, help="processes per variant (A B C A B C ...)")
    ap.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        _child(args.child, args.preset, args.batch, args.new, args.chunk_size, args.runs)
        return 0
    results: dict[str, list[float]] = {v: [] for v in VARIANTS}
    spans = {}
    for _ in range(args.rounds):
        for v in VARIANTS:
            out = subprocess.run([sys.executable, "-m", "benchmarks.tracing_overhead", "--child", v, "--preset",
                                  args.preset, "--batch", str(args.batch), "--new", str(args.new), "--chunk-size",
                                  str(args.chunk_size), "--runs", str(args.runs)], capture_output=True, text=True,
                                 check=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            results[v].append(r["median_s"])
            spans[v] = r["spans"]
    base = statistics.median(results["off"])
    print(f"decode, {args.preset}, B={args.batch}, 32 + {args.new} tokens, stream chunk {args.chunk_size}; median "
          f"over {args.rounds} processes x {args.runs} calls\n")
    print("| tracing | tokens/s | cost vs off | spans exported per process |\n|---|---|---|---|")
    for v, label in zip(VARIANTS, ("off (API no-op)", "on (SDK + batch exporter, synced)", "on, unsynced")):
        t = statistics.median(results[v])
        print(f"| {label} | {args.batch * args.new / t:.1f} | {t / base - 1:+.1%} | {spans[v]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
