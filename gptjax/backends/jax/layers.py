"""The weight modules of the JAX model beyond the float ones of model.py: one quantised dense layer (stored values +
float32 scales + the matmul formulation lowp.formulation picks), one quantised token table, and the out-major float
kernel gptjax's CPU kernels read. The conversion step (convert.py) builds them from the registry entry of a run
mode; none of them knows which mode it serves.

Every kernel is stored [*in, *out] (Conv1D layout) with n_out output dims, or out-major [out, in] for the CPU
kernels (used only without a mesh, on unstacked layers).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptjax.backends.jax import lowp
from gptjax.backends.jax.model import Table, param

Axes = tuple[str | None, ...]


class ScaledDense(nnx.Module):
    """A quantised kernel: stored values ([*in, *out], packed [I/2, O], or out-major [O, I]) with float32 scales
    ([G, *out] per output channel and group of in/G inputs, or [O, G] out-major), x [..., in] -> float32 [..., out]
    by `matmul` (a formulation of lowp.py). The values travel from memory as stored and are decoded inside the
    jitted matmul. A pass of more than per_token_above tokens per sequence runs `prefill` instead (per-token int8
    activations, Mode.per_token_above of gptjax.precision)."""

    def __init__(self, values: Any, scale: Any, axes: Axes, n_out: int, matmul: Callable[..., jax.Array],
                 prefill: Callable[..., jax.Array] | None = None, per_token_above: int | None = None) -> None:
        lead = np.ndim(scale) - 1 - n_out  # stacked layers
        self.kernel = param(values, axes)
        self.scale = param(scale, (*axes[:lead], None, *axes[-n_out:]))
        self.n_out = n_out
        self.matmul, self.prefill, self.per_token_above = matmul, prefill, per_token_above

    def __call__(self, x: jax.Array) -> jax.Array:
        w, s = self.kernel[...], self.scale[...]
        n = self.n_out
        w, s = w.reshape(-1, math.prod(w.shape[-n:])), s.reshape(-1, math.prod(s.shape[-n:]))  # [I, O], [G, O]
        matmul = self.prefill if lowp.per_token(x, self.per_token_above) else self.matmul  # a prefill: the registry's
        return matmul(x.astype(jnp.float32), w, s)


class OutMajorDense(nnx.Module):
    """A float (bfloat16) kernel stored out-major [out, in] for gptjax's CPU kernels (gptjax.backends.cpu_kernels):
    one pass over its bytes per call, where XLA:CPU would convert it to float32 first. x [..., in] -> [..., out]."""

    def __init__(self, kernel: Any, matmul: Callable[..., jax.Array]) -> None:
        self.kernel = param(kernel, (None, None))  # only used without a mesh
        self.matmul = matmul

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.matmul(x, self.kernel[...])


class ScaledTable(Table):
    """A quantised [V, D] token table (packed [V, D/2]) with float32 scales [V, G] (per row and group of D/G
    columns): rows for token ids by `lookup`, and the (tied) LM head x -> float32 logits by `head` (lowp.py)."""

    def __init__(self, values: Any, scale: Any, axes: Axes, lookup: Callable[..., jax.Array],
                 head: Callable[..., jax.Array]) -> None:
        self.embedding = param(values, axes)
        self.scale = param(np.reshape(scale, (np.shape(values)[0], -1)), (axes[0], None))
        self.lookup, self.head = lookup, head

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return self.lookup(self.embedding[...], self.scale[...], tokens)  # [...] -> [..., D]

    def attend(self, x: jax.Array) -> jax.Array:
        return self.head(x.astype(jnp.float32), self.embedding[...], self.scale[...])  # [..., D] -> [..., V]


def out_major(w: Any, n_out: int) -> np.ndarray:
    """A [*in, *out] kernel as a contiguous [out, in] matrix."""
    w = np.asarray(w)
    return np.ascontiguousarray(w.reshape(-1, math.prod(w.shape[-n_out:])).T)
