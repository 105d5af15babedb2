"""Serving under load: `gptjax serve` on loopback, driven by a bounded async load generator at 1, 4, 16 clients.

    gptjax bench --study serve-load                       # gpt2 shape, random weights, 32 new tokens
    gptjax bench --study serve-load --preset byte-mini --requests 64 --concurrency 1,4,16,32

Starts the server (a subprocess on 127.0.0.1, --max-batch 16, --batching continuous or dynamic; needs the
serve extra and httpx), warms every batch bucket and level up, then for each concurrency c runs c clients that
each send streaming completions back to back until the level's request count is sent or its duration cap
passes; levels are interleaved over --rounds (1 4 16 1 4 16 ...) so machine drift hits all alike. Reports
requests/s and generated tokens/s (the median over rounds), time to first token and time per output token
(p50/p99 over all rounds' requests, from the SSE chunks), the rows decoding per chunk, and checks /metrics
against the client's counts (requests answered 200, tokens generated). The machine is shared: compare ratios
within a run. Exit status 1 when a request failed or the server did not exit cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import tempfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gptjax import get_preset, init_params, save_checkpoint
from gptjax.bench.results import Outcome
from gptjax.bench.server import free_port, start_server
from gptjax.errors import GptjaxError
from gptjax.timing import clock, interleaved_runs, median, percentile
from gptjax.weights import load_config

METRICS = ('gptjax_http_requests_total{method="POST",route="/v1/completions",status="200"}',
           'gptjax_generated_tokens_total{backend="jax"}', "gptjax_serve_decode_rows_sum",
           "gptjax_serve_decode_rows_count")

# flag -> (default, help[, choices]); the runner adds them (the type is the default's, str for None)
FLAGS = {"--preset": ("gpt2", "model shape with random weights"),
         "--checkpoint": (None, "serve this checkpoint instead of a random --preset model"),
         "--concurrency": ("1,4,16", "comma list of client counts"),
         "--requests": (64, "requests per level and round"), "--rounds": (2, "interleaved rounds of all levels"),
         "--duration": (120.0, "cap in seconds per level"), "--prompt": (16, "prompt tokens"),
         "--max-tokens": (32, "max_tokens per request"), "--max-batch": (16, "the server's --max-batch"),
         "--chunk-size": (4, "the server's --chunk-size"),
         "--batching": ("continuous", "the server's --batching", ("continuous", "dynamic"))}


def levels(args: argparse.Namespace) -> list[int]:
    """The client counts of --concurrency; a GptjaxError for anything but positive integers."""
    try:
        found = [int(c) for c in args.concurrency.split(",")]
    except ValueError:
        found = []
    if not found or min(found) < 1:
        raise GptjaxError(f"--concurrency {args.concurrency!r}: give a comma list of positive integers, e.g. 1,4,16")
    return found


def prepare(args: argparse.Namespace) -> None:
    """Check the flags and that the client (httpx) and the server (serve extra) can be imported."""
    levels(args)
    if min(args.requests, args.rounds, args.prompt, args.max_tokens) < 1 or args.duration <= 0:
        raise GptjaxError("--requests, --rounds, --prompt and --max-tokens must be >= 1, --duration > 0")
    try:  # the client and the serve extra are optional: are they installed?
        import fastapi  # noqa: F401
        import httpx  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise GptjaxError(f"--study serve-load needs httpx and the serve extra ({e.name} is missing)") from None


@dataclass
class Sample:
    """One request as the client saw it."""

    status: int
    start: float
    first: float | None = None
    end: float = 0.0
    tokens: int = 0
    gaps: list[float] = field(default_factory=list)


async def _one(client: Any, prompt: list[int], max_tokens: int, seed: int) -> Sample:
    """A streaming completion: when its first token and each later chunk arrived."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "seed": seed, "stream": True}
    sample = Sample(0, clock())
    async with client.stream("POST", "/v1/completions", json=body) as r:
        sample.status = r.status_code
        last = None
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            n = len(json.loads(line[6:])["choices"][0]["token_ids"]) if '"choices": [{' in line else 0
            if not n:
                continue
            now = clock()
            if sample.first is None:
                sample.first = now
            elif last is not None:
                sample.gaps += [(now - last) / n] * n  # a chunk of n tokens: n tokens at its mean pace
            last, sample.tokens = now, sample.tokens + n
    sample.end = clock()
    return sample


async def _level(url: str, clients: int, requests: int, cap_s: float, prompts: list[list[int]], max_tokens: int
                 ) -> tuple[list[Sample], float]:
    """`clients` workers sending back to back until `requests` were sent or cap_s passed; samples and wall time."""
    import httpx  # optional, checked by prepare()

    sent, samples = [0], []
    t0 = clock()

    async def worker(client: httpx.AsyncClient) -> None:
        while sent[0] < requests and clock() - t0 < cap_s:
            i = sent[0]
            sent[0] += 1
            samples.append(await _one(client, prompts[i % len(prompts)], max_tokens, seed=i))

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(clients)))
    return samples, clock() - t0


def _scrape(url: str) -> dict[str, float]:
    """The samples of /metrics this study checks."""
    import httpx  # optional, checked by prepare()

    values = dict.fromkeys(METRICS, 0.0)
    for line in httpx.get(url + "/metrics").text.splitlines():
        name, _, value = line.rpartition(" ")
        if name in values:
            values[name] = float(value)
    return values


def _start_server(checkpoint: str, port: int, args: argparse.Namespace) -> subprocess.Popen:
    """`gptjax serve` in a subprocess on 127.0.0.1:port, once /health answers 200."""
    return start_server(["--checkpoint", checkpoint, "--max-batch", str(args.max_batch), "--max-queue", "256",
                         "--chunk-size", str(args.chunk_size), "--request-timeout", "600", "--batching",
                         args.batching], port)


def _checkpoint(args: argparse.Namespace, directory: str) -> str:
    if args.checkpoint:
        return args.checkpoint

    config = get_preset(args.preset)
    path = os.path.join(directory, args.preset)
    save_checkpoint(config, init_params(config, seed=0), path)
    return path


def run(args: argparse.Namespace, log: Any) -> Outcome:
    """Start the server, warm it up, run the levels' rounds interleaved, stop it; one row per level."""
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = _checkpoint(args, tmp)
        rng = np.random.default_rng(0)
        prompts = [rng.integers(0, load_config(checkpoint).vocab_size, args.prompt).tolist() for _ in range(64)]
        port = free_port()
        proc = _start_server(checkpoint, port, args)
        try:
            runs = _measure(f"http://127.0.0.1:{port}", args, prompts, log)
        finally:
            proc.terminate()
            code = proc.wait(60)
    rows = [_row(c, rounds, args) | {"server_exit_status": code} for c, rounds in runs.items()]
    title = (f"gptjax bench --study serve-load: {args.checkpoint or args.preset + ' (random weights)'}, prompt "
             f"{args.prompt}, max_tokens {args.max_tokens}, chunk {args.chunk_size}, max batch {args.max_batch}, "
             f"{args.batching} batching, {args.requests} requests x {args.rounds} rounds per level; server exit "
             f"status {code}")
    failed = code != 0 or any(r["ok"] != r["requests"] for r in rows)
    return Outcome(rows, title, table(rows), status=int(failed))


def _measure(url: str, args: argparse.Namespace, prompts: list[list[int]], log: Any) -> dict[int, list[tuple]]:
    """Warm-up, then (samples, wall seconds, /metrics difference) per level and round."""
    found = levels(args)
    log("warming up the batch buckets and levels ...")
    for b in (1, 2, 4, 8, 16, 32):  # compile each batch bucket the levels can form ...
        if b <= max(found) and b <= 2 * args.max_batch:
            asyncio.run(_level(url, b, b, 600, prompts, args.max_tokens))
    for c in found:  # ... and what each level's traffic compiles (rows joining running batches)
        asyncio.run(_level(url, c, 3 * c, 600, prompts, args.max_tokens))

    def level(c: int) -> tuple[list[Sample], float, dict[str, float]]:
        log(f"{c} clients ...")
        before = _scrape(url)
        samples, wall = asyncio.run(_level(url, c, args.requests, args.duration, prompts, args.max_tokens))
        after = _scrape(url)
        return samples, wall, {k: after[k] - before[k] for k in after}

    runs = interleaved_runs({str(c): (lambda i, c=c: level(c)) for c in found}, args.rounds, warmup=0)
    return {int(c): rounds for c, rounds in runs.items()}


def _row(c: int, runs: list[tuple[list[Sample], float, dict]], args: argparse.Namespace) -> dict[str, Any]:
    """One level's figures from its rounds: (samples, wall seconds, /metrics difference) each."""
    samples = [s for run, _, _ in runs for s in run]
    ok = [s for s in samples if s.status == 200]
    diff = {k: sum(d[k] for _, _, d in runs) for k in runs[0][2]}
    ttft = [s.first - s.start for s in ok if s.first is not None]
    gaps = [g for s in ok for g in s.gaps]
    rates = [sum(s.tokens for s in run if s.status == 200) / wall for run, wall, _ in runs]
    return {"preset": args.preset, "checkpoint": args.checkpoint, "clients": c, "batching": args.batching,
            "requests": len(samples), "ok": len(ok), "rounds": len(runs),
            "requests_per_s": median([sum(s.status == 200 for s in run) / wall for run, wall, _ in runs]),
            "tokens_per_s": median(rates), "tokens_per_s_rounds": rates,
            "ttft_p50_s": percentile(ttft, 50) if ttft else None, "ttft_p99_s": percentile(ttft, 99) if ttft else None,
            "tpot_p50_s": percentile(gaps, 50) if gaps else None, "tpot_p99_s": percentile(gaps, 99) if gaps else None,
            "mean_rows": diff["gptjax_serve_decode_rows_sum"] / max(1, diff["gptjax_serve_decode_rows_count"]),
            "server_200": diff[METRICS[0]], "server_tokens": diff[METRICS[1]],
            "client_tokens": sum(s.tokens for s in ok), "max_tokens": args.max_tokens, "prompt": args.prompt}


def _ms(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(1e3 * v, fmt)


def table(rows: list[dict[str, Any]]) -> str:
    """The markdown table, one line per level, with the /metrics cross-check."""
    lines = ["| clients | requests ok | req/s | tokens/s (rounds) | vs 1 client | TTFT p50 / p99 ms | TPOT p50 / p99 "
             "ms | rows per decode chunk | /metrics 200s, tokens = client's |", "|---|---|---|---|---|---|---|---|---|"]
    base = next((r["tokens_per_s"] for r in rows if r["clients"] == 1), None)
    for r in rows:
        match = r["server_200"] == r["ok"] and r["server_tokens"] == r["client_tokens"]
        vs = f"{r['tokens_per_s'] / base:.2f}x" if base else "-"
        each = " / ".join(f"{x:,.0f}" for x in r["tokens_per_s_rounds"])
        lines.append(f"| {r['clients']} | {r['ok']}/{r['requests']} | {r['requests_per_s']:.2f} "
                     f"| {r['tokens_per_s']:,.1f} ({each}) | {vs} | {_ms(r['ttft_p50_s'], '.0f')} / "
                     f"{_ms(r['ttft_p99_s'], '.0f')} | {_ms(r['tpot_p50_s'], '.1f')} / {_ms(r['tpot_p99_s'], '.1f')} "
                     f"| {r['mean_rows']:.1f} | {int(r['server_200'])}, {int(r['server_tokens'])}: "
                     f"{'yes' if match else 'NO'} |")
    return "\n".join(lines)
