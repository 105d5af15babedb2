"""Scoring a growing sequence on the JAX backend (`JaxBackend.open_scorer`): each token runs through the model once,
into a float32 KV cache that the next tokens read, so a streamed completion's log-probabilities cost one pass over
its positions in all, not a pass over the whole sequence per chunk (issue 31: 60 prompts x 511 tokens with
logprobs streamed took 50.8 s against 11.1 s as one answer).

Tokens go through in pieces padded to PIECES (8, then 64 per pass), over a cache of n_positions + 64 entries: two
programs per top_k whatever the lengths (a padded piece's extra entries are overwritten by the next piece and never
read: each query reads the entries before the piece's start, and the piece causally). The cache is float32 and read
with XLA's dots, whatever the server's KV-cache storage, so the scores are backend.score's up to rounding.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptjax.backends.jax.kv import KVCache, LayerKV, Masks
from gptjax.backends.jax.speculative import step_all

PIECES = (8, 64)  # tokens per pass: a piece is padded to the first that holds it


@partial(jax.jit, static_argnames=("graphdef", "top_k"), donate_argnames=("cache",))
def extend(graphdef: Any, state: Any, cache: KVCache, inputs: jax.Array, targets: jax.Array, start: jax.Array,
           top_k: int) -> tuple[KVCache, jax.Array, jax.Array, jax.Array]:
    """Run inputs [1, C] at positions start.. (cache index = position) over the cache's entries before start:
    the cache with their keys/values, and the float32 log-softmax at targets [1, C], its top_k values and ids
    [1, C, k] (descending; lax.top_k puts the lower id first among equals)."""
    with jax.default_matmul_precision("float32"):
        model = nnx.merge(graphdef, state)
        C, S = inputs.shape[1], cache.length
        masks = Masks((jnp.arange(S) < start)[None, None], jnp.tril(jnp.ones((1, C, C), bool)))  # [1,1,S], [1,C,C]
        logits, cache = step_all(model, inputs, start + jnp.arange(C)[None], masks, cache, start)  # [1, C, V]
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    chosen = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]  # [1, C]
    if top_k == 0:
        return cache, chosen, jnp.zeros((*chosen.shape, 0), jnp.float32), jnp.zeros((*chosen.shape, 0), jnp.int32)
    values, ids = jax.lax.top_k(logp, top_k)
    return cache, chosen, values, ids.astype(jnp.int32)


class CachedFeed:
    """gptjax.scoring.GrowingScores' feed over a KV cache of its own (one sequence)."""

    def __init__(self, weights: Any, observer: Any, top_k: int) -> None:
        config = weights.config
        self.weights, self.observer, self.top_k = weights, observer, top_k
        shape = (1, config.n_head, config.n_positions + PIECES[-1], config.head_dim)  # [B, H, S, K]
        self.cache = KVCache(tuple(_zeros(shape) for _ in range(config.n_layer)))

    def __call__(self, sequence: list[int], start: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Scores of positions start + 1 .. len(sequence) - 1: inputs sequence[start:-1], in pieces."""
        inputs, targets = sequence[start:-1], sequence[start + 1:]
        parts = [self._piece(inputs[i:i + PIECES[-1]], targets[i:i + PIECES[-1]], start + i)
                 for i in range(0, len(inputs), PIECES[-1])]
        return tuple(np.concatenate(a) for a in zip(*parts))  # type: ignore[return-value]

    def _piece(self, inputs: list[int], targets: list[int], start: int) -> tuple[np.ndarray, ...]:
        """One pass: inputs (at most PIECES[-1]) padded to a piece size, in its score span."""
        m = len(inputs)
        C = next(c for c in PIECES if c >= m)
        padded = np.zeros((2, 1, C), np.int32)
        padded[0, 0, :m], padded[1, 0, :m] = inputs, targets
        w = self.weights
        with self.observer.batch_pass("score", "score", 1, m):
            self.cache, *out = extend(w.graphdef, w.state, self.cache, padded[0], padded[1], np.int32(start),
                                      self.top_k)
            chosen, values, ids = jax.device_get(out)
        return chosen[0, :m], values[0, :m], ids[0, :m]


def _zeros(shape: tuple[int, ...]) -> LayerKV:
    """An empty float32 layer cache (from host zeros: no program to compile)."""
    return LayerKV(jnp.asarray(np.zeros(shape, np.float32)), jnp.asarray(np.zeros(shape, np.float32)))


def compile_count() -> int:
    """Compilations so far of the scoring pass."""
    return extend._cache_size()
