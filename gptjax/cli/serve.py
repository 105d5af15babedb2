"""`gptjax serve`: an OpenAI-style HTTP API for a checkpoint (needs the serve extra)."""

from __future__ import annotations

import argparse
import math
import os

from gptjax.cli.generate import draft_from
from gptjax.cli.options import add_draft_flags, add_mesh_flag, add_precision_flags, mesh_from
from gptjax.errors import GptjaxError
from gptjax.speculative import MAX_SPECULATIVE_TOKENS
from gptjax.tracing.setup import install_text_logs
from gptjax.weights import load_config

NAME = "serve"
WARMUPS = ("full", "minimal", "none")  # --warmup's choices: gptjax.serve.warmup.WARMUPS (the serve extra loads later)
HELP = "an OpenAI-style HTTP API (completions, streaming, /metrics) for a checkpoint"
DESCRIPTION = ("Serve a checkpoint over HTTP: POST /v1/completions (JSON or Server-Sent Events), GET /v1/models, "
               "/health and /metrics, with continuous or dynamic batching (speculative with --draft), a bounded "
               "queue (429 when full), per-request timeouts and draining on SIGTERM. Needs the serve extra.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of `gptjax serve`."""
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="checkpoint directory (config.json + "
                   "model.safetensors, tokenizer files optional)")
    p.add_argument("--backend", default="jax", help="backend name (default jax)")
    add_precision_flags(p)
    add_mesh_flag(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument("--api-key", default=os.environ.get("GPTJAX_API_KEY"), metavar="KEY", help="require "
                   "'Authorization: Bearer KEY' on /v1/* (default: $GPTJAX_API_KEY; prefer the variable, "
                   "arguments show in ps)")
    p.add_argument("--model-name", metavar="NAME", help="model id in /v1/models and responses (default: the "
                   "checkpoint directory's name)")
    p.add_argument("--max-batch", type=int, default=16, metavar="N", help="requests per batch (default 16)")
    p.add_argument("--max-queue", type=int, default=64, metavar="N", help="requests waiting for a batch; more "
                   "are refused with 429 (default 64)")
    p.add_argument("--max-tokens-cap", type=int, metavar="N", help="largest max_tokens accepted (default: the "
                   "context length)")
    p.add_argument("--request-timeout", type=float, default=60.0, metavar="SECONDS", help="time from arrival "
                   "to the last token; then 504 and the work is cancelled (default 60)")
    p.add_argument("--drain-timeout", type=float, default=30.0, metavar="SECONDS", help="on SIGTERM, how long "
                   "requests in flight may take to finish (default 30)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, metavar="N", help="larger request bodies get "
                   "413 (default 1 MiB)")
    p.add_argument("--chunk-size", type=int, default=4, metavar="N", help="decode steps between hand-overs to "
                   "clients (default 4)")
    p.add_argument("--batch-wait-ms", type=float, default=20.0, metavar="MS", help="how long a new batch may wait "
                   "for the clients of the previous one to send their next request (default 20)")
    p.add_argument("--batching", choices=["continuous", "dynamic"], default="continuous", help="continuous: "
                   "requests join a running batch between decode chunks (jax backend without --mesh; others fall "
                   "back to dynamic); dynamic: requests arriving during a batch wait for the next (default "
                   "continuous)")
    p.add_argument("--header-timeout", type=float, default=10.0, metavar="SECONDS", help="a connection must "
                   "send a request's complete headers within this time of opening (or of its previous response); "
                   "else it is closed: idle or trickling sockets must not hold file descriptors (default 10)")
    p.add_argument("--max-connections", type=int, default=1024, metavar="N", help="open connections served at "
                   "once; a request on a connection beyond them gets 503 (counted in /metrics, logged): keeps "
                   "the server under its file-descriptor limit (default 1024)")
    p.add_argument("--warmup", choices=WARMUPS, default="full", help="what to compile before /health says ready: "
                   "full, every program the server's request mix can reach (a user never waits for a compilation); "
                   "minimal, a one-row generation (the rest compiles on the requests that need it); none (default "
                   "full)")
    p.add_argument("--no-warmup", action="store_true", help="the same as --warmup none (deprecated)")
    p.add_argument("--max-queued-per-client", type=int, metavar="N", help="completions one client (its API key when "
                   "the server checks one, else its address) may have waiting for a batch; more get 429, so one "
                   "client cannot fill the queue (default: no limit but --max-queue)")
    add_draft_flags(p, draft="decode speculatively: a draft checkpoint with the same vocabulary, or `ngram` for "
                    "prompt lookup (no model); greedy completions are unchanged, a seeded sampled one gets the tokens "
                    "of `generate --draft` with that seed; needs continuous batching (jax, no --mesh); requests with "
                    "presence_penalty, frequency_penalty or logit_bias get 400",
                    spec_k=f"with --draft: draft tokens proposed per target pass, 1..{MAX_SPECULATIVE_TOKENS} "
                    "(default 4); --chunk-size then counts verify rounds")


def run(args: argparse.Namespace) -> int:
    """Check the flags, load the model and serve until SIGTERM/SIGINT (then drain)."""
    try:  # the serve extra (fastapi, uvicorn) is optional: import it only here, and say how to get it
        from gptjax import serve
        from gptjax.serve.server import default_model_id
    except ImportError as e:
        raise GptjaxError(f"gptjax serve needs the serve extra ({e.name} is missing): "
                          "pip install 'gptjax[serve]'") from None
    _check(args)
    draft = None if args.draft is None else draft_from(args.draft, args.ngram, args.draft_precision)
    if args.log_format == "text":  # the server's ready and access-log lines (--log-format json installs its own)
        install_text_logs()
    model = serve.load_model(args.checkpoint, args.backend, precision=args.precision, kv_cache=args.kv_cache,
                             mesh=mesh_from(args.mesh), draft=draft, num_speculative_tokens=args.spec_k)
    cap = args.max_tokens_cap
    if cap is not None and not 1 <= cap <= model.backend.config.n_positions:
        raise GptjaxError(f"--max-tokens-cap {cap} must be in [1, {model.backend.config.n_positions}]")
    options = serve.ServeOptions(model_id=args.model_name or default_model_id(args.checkpoint),
                                 api_key=args.api_key or None, max_batch=args.max_batch, max_queue=args.max_queue,
                                 max_tokens_cap=cap, request_timeout=args.request_timeout,
                                 max_body_bytes=args.max_body_bytes, chunk_size=args.chunk_size,
                                 batch_wait=args.batch_wait_ms / 1e3, batching=args.batching,
                                 warmup="none" if args.no_warmup else args.warmup,
                                 max_queued_per_client=args.max_queued_per_client)
    return serve.run(model, options, host=args.host, port=args.port, drain_timeout=args.drain_timeout,
                     header_timeout=args.header_timeout, max_connections=args.max_connections)


# Every numeric flag: (flag, attribute, integer?, low, high, low allowed?). Checked before the model loads, so a
# bad value (nan, inf, negative, zero where meaningless) is one line and exit 2, never a server that answers 500s.
NUMERIC_FLAGS = (("--port", "port", True, 0, 65535, True), ("--max-batch", "max_batch", True, 1, None, True),
                 ("--max-queue", "max_queue", True, 1, None, True),
                 ("--max-tokens-cap", "max_tokens_cap", True, 1, None, True),
                 ("--max-queued-per-client", "max_queued_per_client", True, 1, None, True),
                 ("--request-timeout", "request_timeout", False, 0, None, False),
                 ("--drain-timeout", "drain_timeout", False, 0, None, True),
                 ("--max-body-bytes", "max_body_bytes", True, 1, None, True),
                 ("--chunk-size", "chunk_size", True, 1, None, True),
                 ("--batch-wait-ms", "batch_wait_ms", False, 0, None, True),
                 ("--header-timeout", "header_timeout", False, 0, None, False),
                 ("--max-connections", "max_connections", True, 1, None, True),
                 ("--spec-k", "spec_k", True, 1, MAX_SPECULATIVE_TOKENS, True))


def _check(args: argparse.Namespace) -> None:
    """A GptjaxError naming the first numeric flag out of its range (before the model loads)."""
    for flag, name, integer, low, high, closed in NUMERIC_FLAGS:
        value = getattr(args, name)
        if value is not None and not _in_range(value, low, high, closed):
            raise GptjaxError(f"{flag} {value} must be {_range(integer, low, high, closed)}")
    if args.draft is not None:
        _check_draft(args)


def _in_range(value: float, low: float, high: float | None, closed: bool) -> bool:
    """Whether value is finite (nan and inf are not) and within [low, high] (or (low, high] if not closed)."""
    if not math.isfinite(value):
        return False
    return (value >= low if closed else value > low) and (high is None or value <= high)


def _range(integer: bool, low: float, high: float | None, closed: bool) -> str:
    """The allowed range in words: "in [1, 16]", ">= 1", "a finite number > 0", "a finite number in [0, 60000]"."""
    if high is None:
        bound = f"{'>=' if closed else '>'} {low}"
    else:
        bound = f"in {'[' if closed else '('}{low}, {high}]"
    return bound if integer else f"a finite number {bound}"


def _check_draft(args: argparse.Namespace) -> None:
    """A GptjaxError for --draft flags that cannot work (before any weights load or anything compiles)."""
    if args.mesh:
        raise GptjaxError(f"--draft runs on one device: drop --mesh {args.mesh!r} (speculative decoding has no mesh)")
    if args.batching != "continuous":
        raise GptjaxError("--draft needs --batching continuous (rows join a speculative batch between chunks)")
    if args.draft == "ngram":
        return
    try:
        draft = load_config(args.draft)
    except GptjaxError as e:
        raise GptjaxError(f"--draft {args.draft!r} is neither `ngram` nor a checkpoint directory: {e}") from None
    target = load_config(args.checkpoint)
    if draft.vocab_size != target.vocab_size:
        raise GptjaxError(f"--draft {args.draft!r} has a vocabulary of {draft.vocab_size} tokens, the checkpoint "
                          f"{target.vocab_size}: a draft model must share the target's tokenizer")
