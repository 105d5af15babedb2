"""Warm-up: what a server compiles before /health says ready (`gptjax serve --warmup full|minimal|none`).

A server's decode sessions are shaped for any request (gptjax.backends.jax.session.Shape, headroom None): their
programs depend on the row count and, for admitting a request, on its prompt bucket, nothing else (max_tokens, n
and every sampling setting are run-time values). So the set of programs a server can reach is known: per row
count of the runner's row_buckets, one empty session, one decode (or speculative) loop, the stop and settings
updates, and one admission copy per prompt bucket; per prompt bucket one one-row prefill; two scoring passes
(log-probabilities). `full` compiles all of it by driving real sessions through it, so in steady state no user
waits for a compilation (gptjax_compiles_total{purpose="request"} stays 0); `minimal` only what a lone short
request needs; `none` nothing. All of it runs inside the observer's warmup(): counted as purpose="warmup".

Measured on this 2-core CPU (jax 0.10.2), server start to ready and RSS after warm-up: see docs/serving.md.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

from opentelemetry import trace

from gptjax.generate import GenerationRequest, make_request
from gptjax.sampling import SamplingParams
from gptjax.serve.continuous import SessionRunner
from gptjax.serve.protocol import MAX_LOGPROBS

if TYPE_CHECKING:
    from gptjax.serve.state import ServedModel
    from gptjax.tracing.observe import Observer

WARMUPS = ("full", "minimal", "none")


def warm_up(model: ServedModel, runner: SessionRunner | None, kind: str) -> int:
    """Compile what `kind` says (one of WARMUPS) for a server batching on runner (None: without sessions);
    returns how many programs that compiled."""
    backend = model.backend
    before = backend.compile_count()
    with backend.observer.warmup(), _one_trace(backend.observer):
        if kind == "none":
            pass
        elif runner is None:  # dynamic batching without sessions: a one-row generation, as before 0.3
            backend.generate(model.weights, [[0]], 2, sampling=SamplingParams(seed=0))
        else:
            for rows in runner.rows if kind == "full" else runner.rows[:1]:
                _session(runner, rows, kind == "full")
            if kind == "full":
                _scorer(model)
    return backend.compile_count() - before


@contextlib.contextmanager
def _one_trace(observer: Observer) -> Iterator[None]:
    """The warm-up's passes under one `text_completion` root (gptjax.purpose=warmup): one trace, not one per pass."""
    root = observer.request_span(1, 1, dict)
    with trace.use_span(root, end_on_exit=True):
        yield


def _session(runner: SessionRunner, rows: int, every_bucket: bool) -> None:
    """Open a session of `rows` rows, admit a prompt of each bucket (every_bucket; else one short one), cancel a
    running row, and decode a chunk: every program of sessions that size."""
    config, observer = runner.backend.config, runner.observer

    def request(n: int, budget: int) -> GenerationRequest:
        return make_request(config, [[0] * n], budget, SamplingParams(seed=0))

    longest = config.n_positions - 1 if every_bucket else 1
    with observer.forward_pass("prefill", "prefill", 1, longest):
        session = runner.open([request(longest, 1)], ["first"], rows)  # step 1 then writes after every bucket
        session.first_chunk()
    lengths = session.prompt_lengths if every_bucket else [1]
    for n in lengths:
        with observer.forward_pass("prefill", "prefill", 1, n):
            session.admit(request(n, 1), n)  # its one token comes from the prefill: the row is freed at once
    owner = object()
    with observer.forward_pass("prefill", "prefill", 1, 1):
        session.admit(request(1, 2), owner)
    session.cancel(owner)
    with observer.forward_pass("decode", "decode", rows, longest):
        session.run(1)


def _scorer(model: ServedModel) -> None:
    """Both scoring passes (a piece of up to 8 tokens, then one of up to 64)."""
    scorer = model.backend.open_scorer(model.weights, top_k=MAX_LOGPROBS)
    scorer.extend([0] * 9)
    scorer.extend([0] * 10)
