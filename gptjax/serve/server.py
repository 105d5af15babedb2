"""Loading a checkpoint for serving, and running uvicorn with graceful draining.

SIGTERM (or the first Ctrl-C): /health turns 503 and new requests get 503 while the listener stays open;
requests in flight finish (up to drain_timeout seconds); then uvicorn stops and the process exits 0.
A second signal stops at once. If the warm-up fails, the server stops and the process exits 1.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn

from gptjax.backends import get_backend
from gptjax.backends.base import Backend
from gptjax.errors import GptjaxError
from gptjax.serve.app import create_app
from gptjax.serve.connections import ConnectionLimits
from gptjax.serve.state import ServedModel, ServeOptions, ServerState
from gptjax.speculative import Draft, Speculation
from gptjax.tokenizer import checkpoint_tokenizer
from gptjax.tracing.metrics import Metrics
from gptjax.weights import load_checkpoint, run_options

log = logging.getLogger("gptjax.serve")


def load_model(checkpoint: str | os.PathLike, backend: str = "jax", *, precision: str | None = None,
               kv_cache: str | None = None, mesh: Any = None, draft: Draft | None = None,
               num_speculative_tokens: int = 4) -> ServedModel:
    """A checkpoint's backend, prepared weights, tokenizer (its files, or bytes for a 256-token vocabulary)
    and a fresh metrics registry. precision (default: as the checkpoint stores its weights) and kv_cache are
    the backend options of those names; a draft (gptjax.speculative.ModelDraft or NgramDraft) makes the server
    decode speculatively, num_speculative_tokens per round."""
    config, params = load_checkpoint(checkpoint)
    options = run_options(checkpoint, precision, kv_cache) | ({"mesh": mesh} if mesh is not None else {})
    metrics = Metrics()
    engine = get_backend(backend, config, metrics=metrics, **options)
    tokenizer = checkpoint_tokenizer(checkpoint, config.vocab_size)
    spec = None if draft is None else speculation(engine, draft, num_speculative_tokens)
    return ServedModel(engine, engine.prepare(params), tokenizer, metrics, spec)


def speculation(engine: Backend, draft: Draft, k: int) -> Speculation:
    """The checked drafter for a backend (Backend.speculation), which must have decode sessions."""
    if not engine.supports_sessions:
        raise GptjaxError(f"speculative serving (--draft) needs continuous batching: the jax backend without a mesh "
                          f"(backend {engine.name!r}{' with a mesh' if engine.name == 'jax' else ''} has none)")
    return engine.speculation(draft, k)


class _DrainingServer(uvicorn.Server):
    """uvicorn, except that the first SIGTERM/SIGINT drains before stopping (and the exit status stays 0)."""

    def __init__(self, config: uvicorn.Config, state: ServerState, drain_timeout: float) -> None:
        super().__init__(config)
        self.state, self.drain_timeout, self.draining = state, drain_timeout, False
        self.failed = False  # warm-up failed (the state's phase turns "draining" as the app shuts down)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.draining:  # a second signal: stop now
            self.should_exit = self.force_exit = True
            return
        self.draining = True
        self.state.phase = "draining"
        threading.Thread(target=self._drain, name="gptjax-serve-drain", daemon=True).start()

    def stop_failed(self) -> None:
        """Warm-up failed: stop at once (nothing was served, so nothing to drain); run() then returns 1."""
        self.failed = self.should_exit = True

    def _drain(self) -> None:
        if not self.state.wait_drained(self.drain_timeout):
            log.warning("drain timeout (%.0f s): stopping with requests in flight", self.drain_timeout)
        self.should_exit = True


def run(model: ServedModel, options: ServeOptions, *, host: str = "127.0.0.1", port: int = 8000,
        drain_timeout: float = 30.0, log_level: str = "warning", header_timeout: float = 10.0,
        max_connections: int = 1024) -> int:
    """Serve until SIGTERM/SIGINT, drain, return 0; return 1 at once if the warm-up fails. A connection must
    complete a request's headers within header_timeout seconds; one opened while max_connections are open gets
    503 (serve/connections.py)."""
    app = create_app(model, options)
    limits = ConnectionLimits(model.metrics.server, header_timeout=header_timeout, max_connections=max_connections)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=5, lifespan="on", http=limits.protocol())
    app.state.gptjax.address = f"http://{host}:{port}"  # for the "ready" log line
    server = _DrainingServer(config, app.state.gptjax, drain_timeout)
    app.state.gptjax.on_failed = server.stop_failed
    print(f"gptjax serve: {options.model_id} on http://{host}:{port} (model loading; GET /health says when ready)",
          flush=True)
    server.run()
    if server.failed:  # a server that cannot serve must not look alive to a supervisor
        log.error("exiting with status 1: the model failed to warm up")
        return 1
    return 0


def default_model_id(checkpoint: str | os.PathLike) -> str:
    """The name /v1/models reports: the checkpoint directory's name."""
    return Path(checkpoint).resolve().name or "gptjax"
