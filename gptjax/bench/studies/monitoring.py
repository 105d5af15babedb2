"""The seed's three signals under load, as the deploy/ stack shows them: `gptjax serve` scraped by a Prometheus
running deploy/prometheus.yml and deploy/rules/ (only the scrape targets substituted: gptjax.tracing.prometheus),
its spans exported over OTLP to an in-process receiver (gptjax.tracing.receiver, standing in for Jaeger).

    gptjax bench --study monitoring --out runs/monitoring           # from the repository root
    gptjax bench --study monitoring --checkpoint DIR --concurrency 1,4,8 --phase-seconds 60

Sends a bounded mixed load in phases of rising concurrency (each client sends streaming completions back to back;
one request in ten is a bad request (400), one in ten leaves after its first token), each phase's shapes compiled
by a short burst and a minute of quiet (the rules' rate window) before the clock starts, then one traced
completion continuing a W3C traceparent. Saves what Prometheus's own query_range returns for throughput, TTFT
and TPOT percentiles and errors by class over the run (the recording rules the Grafana dashboard plots), and the
spans of the traced completion: DIR/signals.jsonl and DIR/trace.jsonl, each starting with a row stamped with the
commit. Copied to benchmarks/results/monitoring-signals.jsonl and monitoring-trace.jsonl, they are what
`python docs/render.py` draws docs/monitoring.md's two pictures from. Needs the prometheus binary, httpx and
the serve and otel extras.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from gptjax.bench.env import git_commit
from gptjax.bench.results import Outcome
from gptjax.bench.server import free_port, start_server
from gptjax.bench.studies.serve_load import levels
from gptjax.errors import GptjaxError
from gptjax.tracing.prometheus import LocalPrometheus
from gptjax.tracing.receiver import OtlpReceiver

# flag -> (default, help[, choices]); the runner adds them (the type is the default's, str for None)
FLAGS = {"--checkpoint": ("tests/fixtures/trained_byte_tiny", "the checkpoint to serve"),
         "--concurrency": ("1,4,8", "comma list: concurrent clients of each load phase"),
         "--phase-seconds": (60.0, "seconds each phase lasts"), "--max-tokens": (32, "max_tokens per request"),
         "--prompt": (8, "prompt tokens"), "--deploy": ("deploy", "the deploy/ directory whose config Prometheus runs")}

# what the pictures plot: deploy/rules/recording.yml's series (the dashboard's throughput, latency, error panels)
SIGNALS = {"throughput": ["gptjax:generated_tokens:rate1m", "gptjax:prompt_tokens:rate1m"],
           "ttft": ["gptjax:time_to_first_token_seconds:p50_1m", "gptjax:time_to_first_token_seconds:p95_1m"],
           "tpot": ["gptjax:time_per_output_token_seconds:p50_1m", "gptjax:time_per_output_token_seconds:p95_1m"],
           "errors": ["gptjax:completion_errors:ratio_rate1m", "gptjax:completion_server_errors:ratio_rate5m"]}
BAD, LEAVES = 0, 1  # request i of a client is a bad request when i % 10 == BAD, leaves early when == LEAVES
TRACE_TIMEOUT_S = 60.0
RATE_WINDOW_S = 60.0  # deploy/rules/recording.yml's rate window


def prepare(args: argparse.Namespace) -> None:
    """Check the flags, the checkpoint and deploy directories, and that prometheus, httpx, the serve extra and
    OpenTelemetry's protobufs (the otel extra) are there."""
    levels(args)
    if args.phase_seconds <= 0 or min(args.max_tokens, args.prompt) < 1:
        raise GptjaxError("--phase-seconds must be > 0, --max-tokens and --prompt >= 1")
    for flag, path in (("--checkpoint", Path(args.checkpoint) / "config.json"),
                       ("--deploy", Path(args.deploy) / "prometheus.yml")):
        if not path.is_file():
            raise GptjaxError(f"{flag} {path.parent}: no {path.name} there (run from the repository root)")
    if shutil.which("prometheus") is None:
        raise GptjaxError("--study monitoring needs the prometheus binary (apt-get install prometheus)")
    missing = [m for m in ("fastapi", "uvicorn", "httpx", "opentelemetry.proto") if importlib.util.find_spec(m) is None]
    if missing:
        raise GptjaxError(f"--study monitoring needs httpx and the serve and otel extras ({missing[0]} is missing)")


# ---- the load ------------------------------------------------------------------------------------------------
async def request(client: Any, kind: str, prompt: list[int], max_tokens: int, seed: int,
                  headers: dict[str, str] | None = None) -> int:
    """One completion of a kind: "ok" (streamed to the end), "bad" (max_tokens -1: a 400) or "leave" (the client
    closes the stream after its first token: the server cancels the work). Its HTTP status."""
    body = {"prompt": prompt, "max_tokens": -1 if kind == "bad" else max_tokens, "seed": seed, "stream": True}
    async with client.stream("POST", "/v1/completions", json=body, headers=headers) as r:
        async for line in r.aiter_lines():
            if kind == "leave" and line.startswith("data: {"):
                break
        return r.status_code


def kind_of(i: int) -> str:
    """The kind of a client's i-th request: one in ten bad, one in ten leaving early, the rest ok."""
    return {BAD: "bad", LEAVES: "leave"}.get(i % 10, "ok")


async def mixed_load(url: str, clients: int, seconds: float, prompts: list[list[int]], max_tokens: int,
                     requests: int | None = None) -> dict[str, int]:
    """`clients` clients sending requests of kind_of(i) back to back for `seconds` (or until each sent
    `requests`); how many requests got each status."""
    import httpx  # optional, checked by prepare()

    statuses: dict[str, int] = {}
    end = time.monotonic() + seconds

    async def client_loop(client: httpx.AsyncClient, c: int) -> None:
        i = 0
        while time.monotonic() < end and (requests is None or i < requests):
            status = await request(client, kind_of(i), prompts[(c + i) % len(prompts)], max_tokens, seed=i)
            statuses[str(status)] = statuses.get(str(status), 0) + 1
            i += 1

    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        await asyncio.gather(*(client_loop(client, c) for c in range(clients)))
    return statuses


# ---- the run -------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def environ(**values: str) -> Iterator[None]:
    """os.environ with these values while the block runs (what a subprocess started inside inherits)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run(args: argparse.Namespace, log: Any) -> Outcome:
    """Serve, scrape and trace; load in phases; save the signals and the traced request's spans."""
    with tempfile.TemporaryDirectory() as tmp, OtlpReceiver() as receiver:
        port = free_port()
        with environ(OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint, OTEL_SERVICE_NAME="gptjax-serve"):
            server = start_server(["--checkpoint", args.checkpoint, "--chunk-size", "4", "--trace", "otlp"], port,
                                  quiet=True)
        try:
            with LocalPrometheus(Path(args.deploy), {"gptjax-serve": f"127.0.0.1:{port}"}, Path(tmp) / "prom",
                                 free_port()) as prometheus:
                record = _measure(args, f"http://127.0.0.1:{port}", prometheus, receiver, log)
        finally:
            server.terminate()
            code = server.wait(60)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    for name, rows in (("signals.jsonl", record["signals"]), ("trace.jsonl", record["trace"])):
        (Path(args.out) / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = [{"phase_clients": p["clients"], "statuses": p["statuses"]} for p in record["phases"]]
    title = (f"gptjax bench --study monitoring: phases of {args.concurrency} clients, {args.phase_seconds:.0f} s each; "
             f"server exit status {code}; signals.jsonl and trace.jsonl in {args.out}")
    lines = ["| clients | responses by status |", "|---|---|"]
    lines += [f"| {p['phase_clients']} | {json.dumps(p['statuses'])} |" for p in summary]
    return Outcome(summary, title, "\n".join(lines), status=int(code != 0))


def _measure(args: argparse.Namespace, url: str, prometheus: LocalPrometheus, receiver: OtlpReceiver,
             log: Any) -> dict[str, Any]:
    """The load phases, one traced request, then what Prometheus recorded and the receiver got."""
    rng = np.random.default_rng(0)
    prompts = [rng.integers(32, 127, args.prompt).tolist() for _ in range(64)]  # printable bytes
    stamp = {"kind": "run", "commit": git_commit(), "args": vars(args).copy()}  # the tree as the run started
    prometheus.wait(lambda: prometheus.scrapes().get("gptjax-serve"), 60, "a first scrape of gptjax serve")
    for clients in levels(args):  # compile what each phase's batches need before the clock starts (6-9 s each)
        asyncio.run(mixed_load(url, clients, 600, prompts, args.max_tokens, requests=10))
    time.sleep(RATE_WINDOW_S)  # idle until the warm-up's compiles (seconds of TTFT) left the rules' 1-min windows
    start, record = time.time(), {"phases": []}
    for clients in levels(args):
        log(f"{clients} clients for {args.phase_seconds:.0f} s ...")
        t0 = time.time()
        statuses = asyncio.run(mixed_load(url, clients, args.phase_seconds, prompts, args.max_tokens))
        record["phases"].append({"clients": clients, "start": t0, "end": time.time(), "statuses": statuses})
    trace_id, spans = _traced_request(url, receiver, prompts[0], args.max_tokens)
    end = time.time()  # the rules' last evaluation after the load: the next scrape, evaluated
    prometheus.wait(lambda: prometheus.scrapes()["gptjax-serve"] > end, 60, "a scrape after the load")
    stamp["time"] = end
    record["signals"] = [stamp | {"start": start, "end": end, "phases": record["phases"]}] + _signals(
        prometheus, start, end)
    record["trace"] = [stamp | {"trace_id": trace_id}] + [{"kind": "span"} | s for s in spans]
    return record


def _traced_request(url: str, receiver: OtlpReceiver, prompt: list[int], max_tokens: int
                    ) -> tuple[str, list[dict[str, Any]]]:
    """One completion continuing a new W3C traceparent; its trace id and the spans the receiver got for it."""
    import httpx  # optional, checked by prepare()

    trace_id, parent = secrets.token_hex(16), secrets.token_hex(8)

    async def one() -> int:
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            return await request(client, "ok", prompt, max_tokens, 0, {"traceparent": f"00-{trace_id}-{parent}-01"})

    if asyncio.run(one()) != 200:
        raise GptjaxError("the traced completion failed")
    def mine(spans: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [s for s in spans if s["trace_id"] == trace_id]

    spans = receiver.wait_for(lambda got: any(s["name"] == "gptjax.serve.batch" for s in mine(got)), TRACE_TIMEOUT_S)
    return trace_id, mine(spans)


def _signals(prometheus: LocalPrometheus, start: float, end: float) -> list[dict[str, Any]]:
    """Each signal query's series over [start, end] at the scrape interval, as Prometheus's query_range gives."""
    rows = []
    for signal, queries in SIGNALS.items():
        for query in queries:
            for series in prometheus.query_range(query, start, end, 5):
                rows.append({"kind": "series", "signal": signal, "query": query, "labels": series["metric"],
                             "values": series["values"]})
    return rows
