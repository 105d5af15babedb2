"""What a running server holds: its options, the model it serves, its readiness, the scheduler (with continuous
batching where the backend has decode sessions), the request limits and the HTTP metrics. One per app, built by
`create_app`; no global state."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from gptjax.backends.base import Backend
from gptjax.errors import GptjaxError
from gptjax.serve.continuous import SessionRunner
from gptjax.serve.protocol import MAX_CHOICES, Limits
from gptjax.serve.scheduler import DeviceLock, Scheduler
from gptjax.serve.warmup import WARMUPS, warm_up
from gptjax.speculative import Speculation
from gptjax.tokenizer import Tokenizer
from gptjax.tracing.metrics import Metrics

log = logging.getLogger("gptjax.serve")


@dataclass(frozen=True)
class ServeOptions:
    """Server settings (the CLI flags of `gptjax serve`)."""

    model_id: str = "gptjax"
    api_key: str | None = None  # required as "Authorization: Bearer KEY" on /v1/* when set
    max_batch: int = 16  # rows per batch
    max_queue: int = 64  # requests waiting for a batch; more → 429
    max_tokens_cap: int | None = None  # largest max_tokens accepted (None: the context)
    request_timeout: float = 60.0  # seconds from arrival to the last token; then 504 / a timeout error event
    max_body_bytes: int = 1 << 20
    chunk_size: int = 4  # decode steps between hand-overs (streaming granularity, cancellation latency)
    batch_wait: float = 0.02  # seconds a new batch may wait for the clients of the last one to come back
    batching: str = "continuous"  # or "dynamic"; continuous needs the jax backend without a mesh
    warmup: str = "full"  # what to compile before /health says ready: full | minimal | none (gptjax.serve.warmup)
    max_queued_per_client: int | None = None  # completions one client may have waiting (None: up to max_queue)

    def __post_init__(self) -> None:
        if isinstance(self.warmup, bool):  # before 0.3 a bool: True compiled a one-row generation
            object.__setattr__(self, "warmup", "minimal" if self.warmup else "none")
        if self.warmup not in WARMUPS:
            raise GptjaxError(f"warmup={self.warmup!r}; allowed: {', '.join(WARMUPS)}")


@dataclass
class ServedModel:
    """What the server runs: a backend, its prepared weights, the tokenizer (or None) and the metrics registry
    the backend reports to (the server's own metrics join it)."""

    backend: Backend
    weights: Any
    tokenizer: Tokenizer | None
    metrics: Metrics
    speculation: Speculation | None = None  # a drafter (`--draft`): decode speculatively (continuous batching)


class ServerState:
    """Per-app state: readiness phase, the scheduler, requests in flight and the HTTP metrics."""

    def __init__(self, model: ServedModel, options: ServeOptions) -> None:
        self.model, self.options = model, options
        self.phase = "loading"  # → ready → draining
        self.address: str | None = None  # where the server listens (set by whoever runs the app; for the log)
        self.on_failed: Callable[[], None] | None = None  # called if warm-up fails (whoever runs the app: exit)
        self.inflight = 0
        self.parser = ThreadPoolExecutor(1, thread_name_prefix="gptjax-serve-parse")  # /tokenize, /detokenize
        self.limits = Limits(model.backend.config, options.model_id,
                             options.max_tokens_cap or model.backend.config.n_positions,
                             min(MAX_CHOICES, options.max_queue))
        self.server_metrics = m = model.metrics.server  # gptjax.tracing.metrics.ServeMetrics, in the model's registry
        on_cancel = lambda reason: m.cancelled.labels(reason=reason).inc()  # noqa: E731
        self.batching = batching_mode(model, options)
        device = DeviceLock()  # the worker's chunks and scoring calls take turns on the backend
        self.runner = None  # decode sessions, where the backend has them: joined between chunks (continuous) or not
        if model.backend.supports_sessions:
            self.runner = SessionRunner(model.backend, model.weights, chunk_size=options.chunk_size,
                                        max_batch=options.max_batch, on_cancel=on_cancel,
                                        on_chunk=m.decode_rows.observe, device=device, speculation=model.speculation,
                                        joins=self.batching == "continuous")
        self.scheduler = Scheduler(self._stream, max_batch=options.max_batch, max_queue=options.max_queue,
                                   max_per_client=options.max_queued_per_client, batch_wait=options.batch_wait,
                                   on_batch=m.batch_size.observe, on_cancel=on_cancel, on_chunk=m.decode_rows.observe,
                                   session=self.runner, device=device)
        m.queue_depth.set_function(lambda: self.scheduler.depth)

    def _stream(self, requests: Any) -> Any:
        """A batch's chunks (dynamic batching; with a drafter only a job re-run alone after its batch failed:
        its tokens are then its solo speculative run's)."""
        m, spec = self.model, self.model.speculation
        if spec is None:
            return m.backend.stream_joined(m.weights, requests, chunk_size=self.options.chunk_size)
        [r] = requests
        return m.backend.stream(m.weights, r.prompts, r.max_new_tokens, chunk_size=self.options.chunk_size,
                                sampling=r.sampling, draft=spec.draft, num_speculative_tokens=spec.k)

    def start(self) -> None:
        """Warm up (compile) in a thread, then start the worker and turn ready."""
        def run() -> None:
            try:
                start = time.perf_counter()
                compiled = warm_up(self.model, self.runner, self.options.warmup)
                log.info("warm-up (%s): %d programs compiled in %.1f s", self.options.warmup, compiled,
                         time.perf_counter() - start)
            except Exception:
                log.exception("warm-up failed: the server cannot serve this model")
                self.phase = "failed"
                if self.on_failed is not None:
                    self.on_failed()
                return
            self.scheduler.start()
            if self.phase == "loading":
                self.phase = "ready"
                log.info("ready: %s on %s", self.options.model_id, self.address or "(address unknown)",
                         extra={"fields": {"model": self.options.model_id, "address": self.address}})

        threading.Thread(target=run, name="gptjax-serve-warmup", daemon=True).start()

    def drained(self) -> bool:
        """No request in flight and no job queued or running."""
        return self.inflight == 0 and self.scheduler.idle()

    def wait_drained(self, timeout: float) -> bool:
        """Block until drained() or timeout; whether it drained."""
        end = time.monotonic() + timeout
        while not self.drained():
            if time.monotonic() >= end:
                return False
            time.sleep(0.05)
        return True


def batching_mode(model: ServedModel, options: ServeOptions) -> str:
    """The batching mode to use: continuous where the backend has decode sessions (jax without a mesh), else
    dynamic."""
    if options.batching not in ("continuous", "dynamic"):
        raise GptjaxError(f"batching={options.batching!r}; allowed: continuous, dynamic")
    batching = options.batching if model.backend.supports_sessions else "dynamic"
    if model.speculation is not None and batching != "continuous":
        raise GptjaxError("a drafter (--draft) needs continuous batching: the jax backend without --mesh and "
                          "--batching continuous")
    return batching
