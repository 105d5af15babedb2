"""Serving under load: `gptjax serve` on loopback, driven by a bounded async load generator at 1, 4, 16 clients.

    python -m benchmarks.serve_load                          # gpt2 shape, random weights, 32 new tokens
    python -m benchmarks.serve_load --preset byte-mini --requests 64 --concurrency 1,4,16,32

Starts the server (a subprocess, --max-batch 16, --batching continuous or dynamic), warms every batch bucket
and level up, then for each concurrency c runs c clients that each send streaming completions back to back until the
level's request count is sent or its duration cap passes; levels are interleaved over --rounds (1 4 16 1 4 16
...) so machine drift hits all alike. Reports requests/s and generated tokens/s (the median over rounds), time
to first token and time per output token (p50/p99 over all rounds' requests, from the SSE chunks), the rows
decoding per chunk, and checks /metrics against the client's counts (requests answered 200, tokens
generated). The machine is shared: compare ratios within a run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import httpx
import numpy as np

from benchmarks.common import append_jsonl, environment, percentile


@dataclass
class Sample:
    """One request as the client saw it."""

    status: int
    start: float
    first: float | None = None
    end: float = 0.0
    tokens: int = 0
    gaps: list[float] = field(default_factory=list)


async def _one(client: httpx.AsyncClient, prompt: list[int], max_tokens: int, seed: int) -> Sample:
    """A streaming completion: when its first token and each later chunk arrived."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "seed": seed, "stream": True}
    sample = Sample(0, time.perf_counter())
    async with client.stream("POST", "/v1/completions", json=body) as r:
        sample.status = r.status_code
        last = None
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            n = len(json.loads(line[6:])["choices"][0]["token_ids"]) if '"choices": [{' in line else 0
            if not n:
                continue
            now = time.perf_counter()
            if sample.first is None:
                sample.first = now
            elif last is not None:
                sample.gaps += [(now - last) / n] * n  # a chunk of n tokens: n tokens at its mean pace
            last, sample.tokens = now, sample.tokens + n
    sample.end = time.perf_counter()
    return sample


async def _level(url: str, clients: int, requests: int, cap_s: float, prompts: list[list[int]], max_tokens: int
                 ) -> tuple[list[Sample], float]:
    """`clients` workers sending back to back until `requests` were sent or cap_s passed; samples and wall time."""
    sent, samples = [0], []
    t0 = time.perf_counter()

    async def worker(client: httpx.AsyncClient) -> None:
        while sent[0] < requests and time.perf_counter() - t0 < cap_s:
            i = sent[0]
            sent[0] += 1
            samples.append(await _one(client, prompts[i % len(prompts)], max_tokens, seed=i))

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(clients)))
    return samples, time.perf_counter() - t0


def _scrape(url: str) -> dict[str, float]:
    """The samples of /metrics this benchmark checks."""
    wanted = ('gptjax_http_requests_total{method="POST",route="/v1/completions",status="200"}',
              'gptjax_generated_tokens_total{backend="jax"}', "gptjax_serve_decode_rows_sum",
              "gptjax_serve_decode_rows_count")
    values = dict.fromkeys(wanted, 0.0)
    for line in httpx.get(url + "/metrics").text.splitlines():
        name, _, value = line.rpartition(" ")
        if name in values:
            values[name] = float(value)
    return values


def _start_server(checkpoint: str, port: int, args: argparse.Namespace) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "gptjax.cli", "serve", "--checkpoint", checkpoint, "--port", str(port),
           "--max-batch", str(args.max_batch), "--max-queue", "256", "--chunk-size", str(args.chunk_size),
           "--request-timeout", "600", "--batching", args.batching]
    proc = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health").status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("the server did not become ready in 600 s")


def _checkpoint(args: argparse.Namespace, directory: str) -> str:
    if args.checkpoint:
        return args.checkpoint
    from gptjax import get_preset, init_params, save_checkpoint

    config = get_preset(args.preset)
    path = os.path.join(directory, args.preset)
    save_checkpoint(config, init_params(config, seed=0), path)
    return path


def _row(c: int, runs: list[tuple[list[Sample], float, dict]], args: argparse.Namespace) -> dict:
    """One level's figures from its rounds: (samples, wall seconds, /metrics difference) each."""
    samples = [s for run, _, _ in runs for s in run]
    ok = [s for s in samples if s.status == 200]
    tokens = sum(s.tokens for s in ok)
    diff = {k: sum(d[k] for _, _, d in runs) for k in runs[0][2]}
    ttft = [s.first - s.start for s in ok if s.first is not None]
    gaps = [g for s in ok for g in s.gaps]
    rates = [sum(s.tokens for s in run if s.status == 200) / wall for run, wall, _ in runs]
    return {"benchmark": "serve_load", "preset": args.preset, "checkpoint": args.checkpoint, "clients": c,
            "batching": args.batching,
            "requests": len(samples), "ok": len(ok), "rounds": len(runs),
            "requests_per_s": statistics.median(sum(s.status == 200 for s in run) / wall for run, wall, _ in runs),
            "tokens_per_s": statistics.median(rates), "tokens_per_s_rounds": rates,
            "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
            "tpot_p50_s": percentile(gaps, 50) if gaps else float("nan"),
            "tpot_p99_s": percentile(gaps, 99) if gaps else float("nan"),
            "mean_rows": diff["gptjax_serve_decode_rows_sum"] / max(1, diff["gptjax_serve_decode_rows_count"]),
            "server_200": diff['gptjax_http_requests_total{method="POST",route="/v1/completions",status="200"}'],
            "server_tokens": diff['gptjax_generated_tokens_total{backend="jax"}'], "client_tokens": tokens,
            "max_tokens": args.max_tokens, "prompt": args.prompt}


def main(argv: list[str] | None = None) -> int:
    """Run the serving load benchmark; print a table (and JSON lines with --json)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="gpt2", help="model shape with random weights (default gpt2)")
    ap.add_argument("--checkpoint", help="serve this checkpoint instead of a random --preset model")
    ap.add_argument("--concurrency", default="1,4,16", help="comma list of client counts")
    ap.add_argument("--requests", type=int, default=64, help="requests per level and round (default 64)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds of all levels (default 2)")
    ap.add_argument("--duration", type=float, default=120, help="cap in seconds per level (default 120)")
    ap.add_argument("--prompt", type=int, default=16, help="prompt tokens (default 16)")
    ap.add_argument("--max-tokens", type=int, default=32, help="max_tokens per request (default 32)")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--chunk-size", type=int, default=4)
    ap.add_argument("--batching", choices=["continuous", "dynamic"], default="continuous")
    ap.add_argument("--json", metavar="FILE", help="append one JSON line per level")
    args = ap.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]

    with tempfile.TemporaryDirectory() as tmp, socket.socket() as s:
        checkpoint = _checkpoint(args, tmp)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        from gptjax.weights import load_config

        V = load_config(checkpoint).vocab_size
        rng = np.random.default_rng(0)
        prompts = [rng.integers(0, V, args.prompt).tolist() for _ in range(64)]
        proc = _start_server(checkpoint, port, args)
        url = f"http://127.0.0.1:{port}"
        try:
            for b in (1, 2, 4, 8, 16, 32):  # compile each batch bucket the levels can form ...
                if b <= max(levels) and b <= 2 * args.max_batch:
                    asyncio.run(_level(url, b, b, 600, prompts, args.max_tokens))
            for c in levels:  # ... and what each level's traffic compiles (rows joining running batches)
                asyncio.run(_level(url, c, 3 * c, 600, prompts, args.max_tokens))
            runs: dict[int, list] = {c: [] for c in levels}
            for _ in range(args.rounds):
                for c in levels:
                    before = _scrape(url)
                    samples, wall = asyncio.run(_level(url, c, args.requests, args.duration, prompts,
                                                       args.max_tokens))
                    after = _scrape(url)
                    runs[c].append((samples, wall, {k: after[k] - before[k] for k in after}))
            rows = [_row(c, runs[c], args) for c in levels]
        finally:
            proc.terminate()
            code = proc.wait(60)
    env = environment()
    print("environment:", json.dumps(env))
    print(f"\nserve_load, {args.checkpoint or args.preset + ' (random weights)'}, prompt {args.prompt}, max_tokens "
          f"{args.max_tokens}, chunk {args.chunk_size}, max batch {args.max_batch}, {args.batching} batching, "
          f"{args.requests} requests x "
          f"{args.rounds} rounds per level; server exit status {code}\n")
    print("| clients | requests ok | req/s | tokens/s (rounds) | vs 1 client | TTFT p50 / p99 ms | TPOT p50 / p99 ms | "
          "rows per decode chunk | /metrics 200s, tokens = client's |")
    print("|---|---|---|---|---|---|---|---|---|")
    base = next((r["tokens_per_s"] for r in rows if r["clients"] == 1), None)
    for r in rows:
        match = r["server_200"] == r["ok"] and r["server_tokens"] == r["client_tokens"]
        vs = f"{r['tokens_per_s'] / base:.2f}x" if base else "-"
        each = " / ".join(f"{x:,.0f}" for x in r["tokens_per_s_rounds"])
        print(f"| {r['clients']} | {r['ok']}/{r['requests']} | {r['requests_per_s']:.2f} | {r['tokens_per_s']:,.1f} "
              f"({each}) | {vs} | {1e3 * r['ttft_p50_s']:.0f} / {1e3 * r['ttft_p99_s']:.0f} | "
              f"{1e3 * r['tpot_p50_s']:.1f} / {1e3 * r['tpot_p99_s']:.1f} | {r['mean_rows']:.1f} | "
              f"{int(r['server_200'])}, {int(r['server_tokens'])}: {'yes' if match else 'NO'} |")
    append_jsonl(args.json, rows, env)
    return 0 if code == 0 and all(r["ok"] == r["requests"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
