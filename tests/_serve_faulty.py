"""A test server: `gptjax serve`'s app over a jax backend with injected faults, run as a subprocess by
test_serve.py. A row whose prompt starts with token 255 raises in the backend; one starting with 254 (253) makes
its batch slow (very slow) per chunk, so tests can fill the queue, hit timeouts and disconnect mid-stream."""

import sys
import time

from gptjax.backends.jax_flax import JaxBackend
from gptjax.serve import ServeOptions, load_model, run

FAIL, DELAYS = 255, {254: 0.25, 253: 1.0}  # first prompt token → seconds per chunk


class FaultyBackend(JaxBackend):
    """The jax backend, failing or slow on marked prompts."""

    def _generate(self, weights, request, chunk_size):
        if any(p[0] == FAIL for p in request.prompts):
            raise RuntimeError("injected failure (secret detail that must not reach the client)")
        delay = max(DELAYS.get(p[0], 0.0) for p in request.prompts)
        for chunk in super()._generate(weights, request, chunk_size):
            time.sleep(delay)
            yield chunk


if __name__ == "__main__":
    checkpoint, port = sys.argv[1], int(sys.argv[2])
    model = load_model(checkpoint, "jax")
    model.backend.__class__ = FaultyBackend
    options = ServeOptions(model_id="faulty", max_batch=4, max_queue=4, request_timeout=8.0, chunk_size=4)
    raise SystemExit(run(model, options, port=port, drain_timeout=10))
