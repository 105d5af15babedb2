"""A test server: `gptjax serve`'s app over a jax backend with injected faults, run as a subprocess by
test_serve.py (args: checkpoint, port, batching mode[, "fail-warmup"][, ServeOptions field=integer ...]). A row whose prompt starts with token 255 raises in the
backend; one starting with 254 (253) makes its batch slow (very slow) per chunk, so tests can fill the queue,
hit timeouts and disconnect mid-stream. Both paths are patched: the decode session the backend opens (both
batching modes run on sessions) and its _generate (a job re-run alone after its batch failed). With
"fail-warmup", the warm-up raises."""

import sys
import time

from gptjax.backends.jax import JaxBackend
from gptjax.backends.jax import session as jax_session
from gptjax.serve import ServeOptions, load_model, run

FAIL, DELAYS = 255, {254: 0.25, 253: 1.0}  # first prompt token → seconds per chunk


def _delay(prompts) -> float:
    return max(DELAYS.get(p[0], 0.0) for p in prompts)


class FaultyBackend(JaxBackend):
    """The jax backend, failing or slow on marked prompts."""

    def _generate(self, weights, request, chunk_size):
        if any(p[0] == FAIL for p in request.prompts):
            raise RuntimeError("injected failure (secret detail that must not reach the client)")
        delay = _delay(request.prompts)
        for chunk in super()._generate(weights, request, chunk_size):
            time.sleep(delay)
            yield chunk

    def open_session(self, weights, requests, owners, *, slots, headroom, speculation=None):
        return FaultySession(self, weights, requests, owners, slots, headroom)


class FaultySession(jax_session.DecodeSession):
    """The decode session, failing or slow on marked prompts."""

    def __init__(self, backend, weights, requests, owners, slots, headroom):
        if any(r.prompts[0][0] == FAIL for r in requests):
            raise RuntimeError("injected failure (secret detail that must not reach the client)")
        super().__init__(backend, weights, requests, owners, slots, headroom)

    def admit(self, request, owner):
        if request.prompts[0][0] == FAIL:
            raise RuntimeError("injected failure (secret detail that must not reach the client)")
        return super().admit(request, owner)

    def run(self, chunk_size):
        time.sleep(_delay([o.request.prompts[0] for o in self.owners if hasattr(o, "request")] or [[0]]))
        return super().run(chunk_size)


class WarmupFailingBackend(FaultyBackend):
    """A backend whose every generation (the server's warm-up first) raises."""

    def generate(self, *args, **kwargs):
        raise RuntimeError("injected warm-up failure")

    def open_session(self, *args, **kwargs):
        raise RuntimeError("injected warm-up failure")


if __name__ == "__main__":
    checkpoint, port, batching, extra = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]
    model = load_model(checkpoint, "jax")
    model.backend.__class__ = WarmupFailingBackend if "fail-warmup" in extra else FaultyBackend
    settings = {k: int(v) for k, v in (a.split("=") for a in extra if "=" in a)}  # e.g. max_queued_per_client=2
    defaults = {"model_id": "faulty", "max_batch": 4, "max_queue": 4, "chunk_size": 4, "batching": batching,
                "request_timeout": 8.0 if batching == "dynamic" else 30.0}
    options = ServeOptions(**defaults | settings)
    raise SystemExit(run(model, options, port=port, drain_timeout=10))
