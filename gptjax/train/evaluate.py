"""Validation loss: of a training state (the loop's evaluations) and of canonical params (`gptjax eval` on a
checkpoint), each the mean next-token cross-entropy over the same fixed batches."""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx

from gptjax.backends import get_backend
from gptjax.config import GPTConfig
from gptjax.errors import GptjaxError
from gptjax.quantize import precision_of
from gptjax.weights import Params


@partial(jax.jit, static_argnames=("graphdef",))
def eval_loss(graphdef: Any, weights: Any, inputs: jax.Array, targets: jax.Array) -> jax.Array:
    """Summed cross-entropy (nats) over a batch, for exact averaging across batches."""
    logits = nnx.merge(graphdef, weights)(inputs)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).sum()


def evaluate(graphdef: Any, weights: Any, batches: Iterator[tuple[np.ndarray, np.ndarray]]) -> tuple[float, int]:
    """(mean loss in nats/token, tokens scored) over the batches."""
    total, n = 0.0, 0
    for x, y in batches:
        total += float(eval_loss(graphdef, weights, x, y))
        n += y.size
    return total / max(n, 1), n


def evaluate_params(config: GPTConfig, params: Params, batches: Iterator[tuple[np.ndarray, np.ndarray]]
                    ) -> tuple[float, int]:
    """evaluate()'s (mean loss, tokens scored) of canonical params (a checkpoint's), from the JAX backend's
    score (in the precision the params are stored in) of each window: inputs [B, T] and their last target,
    for targets [B, T] that are the inputs shifted by one (as data.eval_batches gives them)."""
    backend = get_backend("jax", config, precision=precision_of(params))
    weights = backend.prepare(params)
    total, n = 0.0, 0
    for x, y in batches:
        if x.shape != y.shape or not np.array_equal(x[:, 1:], y[:, :-1]):
            raise GptjaxError(f"evaluate_params needs targets that are the inputs shifted by one, got inputs "
                              f"{x.shape} and targets {y.shape} that are not")
        windows = np.concatenate([x, y[:, -1:]], axis=1)  # [B, T + 1]
        total -= sum(s.total() for s in backend.score(weights, windows))
        n += y.size
    return total / max(n, 1), n
