"""The reduced-precision weight modules of the JAX model: int8 kernels (weight-only and w8a8), packed int4, out-major
kernels for gptjax's CPU kernels (gptjax.backends.cpu_kernels), and the tables and position lookup they need.
The conversion step (convert.py) picks them; their matmul formulations are in lowp.py.

Every kernel is stored [*in, *out] (Conv1D layout) with n_out output dims, or out-major [out, in] for the CPU
kernels (used only without a mesh, on unstacked layers).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptjax.backends import cpu_kernels
from gptjax.backends.jax import lowp
from gptjax.backends.jax.model import Embedding, Positions, Table, param


class Int8Dense(nnx.Module):
    """An int8 kernel with float32 scales [G, *out] (one per output channel and group of in/G inputs),
    weight-only: the int8 values travel from memory and are dequantised inside the jitted matmul; a pass of
    more than INT8_PER_TOKEN_ABOVE tokens (gptjax.precision) quantises x per token, as W8A8Dense."""

    def __init__(self, q: Any, scale: Any, axes: tuple[str | None, ...], n_out: int = 1) -> None:
        lead = np.ndim(scale) - 1 - n_out  # stacked layers
        self.kernel = param(q, axes)
        self.scale = param(scale, (*axes[:lead], None, *axes[-n_out:]))
        self.n_out = n_out

    def __call__(self, x: jax.Array) -> jax.Array:
        q, s = self.kernel[...], self.scale[...]
        G, out = s.shape[0], math.prod(s.shape[1:])
        matmul = lowp.w8a8_matmul if lowp.per_token(x) else self.matmul  # a prefill: gptjax.precision
        return matmul(x.astype(jnp.float32), q.reshape(G, -1, out), s.reshape(G, out))

    matmul = staticmethod(lowp.int8_matmul)


class Int4Dense(nnx.Module):
    """A packed int4 kernel [*lead, I/2, O] (two inputs per byte) with float32 scales [*lead, G, O], weight-only:
    the packed bytes travel from memory and are unpacked and dequantised inside the jitted matmul. Its sharding
    keeps only the stacked-layer axes (a packed pair of inputs cannot be split by head)."""

    def __init__(self, p: Any, scale: Any, axes: tuple[str | None, ...]) -> None:
        lead = np.ndim(p) - 2
        self.kernel = param(p, (*axes[:lead], None, None))
        self.scale = param(scale, (*axes[:lead], None, None))

    def __call__(self, x: jax.Array) -> jax.Array:
        return lowp.int4_matmul(x.astype(jnp.float32), self.kernel[...], self.scale[...])


class OutMajorInt4Dense(nnx.Module):
    """A packed int4 kernel stored out-major [O, I/2] (the same bytes) with scales [O, G], for gptjax's CPU int4
    kernel, which unpacks the nibbles in registers."""

    def __init__(self, p: Any, scale: Any) -> None:
        self.kernel = param(_out_major(p, 1), (None, None))
        self.scale = param(_out_major(scale, 1), (None, None))  # [G, O] -> [O, G]

    def __call__(self, x: jax.Array) -> jax.Array:
        return lowp.int4_matmul_nk(x.astype(jnp.float32), self.kernel[...], self.scale[...])


class W8A8Dense(Int8Dense):
    """The same int8 kernel with dynamically quantised activations (int8 per token, int8 x int8 -> int32)."""

    matmul = staticmethod(lowp.w8a8_matmul)


class OutMajorDense(nnx.Module):
    """A bfloat16 kernel stored out-major [out, in] for gptjax's CPU kernels (gptjax.backends.cpu_kernels): one
    pass over its bytes per call, where XLA:CPU would convert it to float32 first. x [..., in] -> [..., out]."""

    def __init__(self, kernel: Any, n_out: int = 1) -> None:
        self.kernel = param(_out_major(kernel, n_out), (None, None))  # only used without a mesh

    def __call__(self, x: jax.Array) -> jax.Array:
        return cpu_kernels.bf16_matmul(x, self.kernel[...])


class OutMajorInt8Dense(nnx.Module):
    """An int8 kernel stored out-major [out, in] with scales [out, G], for gptjax's CPU kernels; weight-only
    (float activations as two int8 terms, as int8_matmul on CPU: per channel, the same numbers; above
    INT8_PER_TOKEN_ABOVE tokens per sequence, one per-token term, as OutMajorW8A8Dense)."""

    def __init__(self, q: Any, scale: Any, n_out: int = 1) -> None:
        self.kernel = param(_out_major(q, n_out), (None, None))
        self.scale = param(_out_major(scale, n_out), (None, None))  # [G, *out] -> [out, G]

    def __call__(self, x: jax.Array) -> jax.Array:
        matmul = lowp.w8a8_matmul_nk if lowp.per_token(x) else self.matmul  # a prefill: gptjax.precision
        return matmul(x.astype(jnp.float32), self.kernel[...], self.scale[...])

    matmul = staticmethod(lowp.int8_matmul_nk)


class OutMajorW8A8Dense(OutMajorInt8Dense):
    """The same out-major int8 kernel with dynamically quantised activations (as W8A8Dense: the same numbers)."""

    matmul = staticmethod(lowp.w8a8_matmul_nk)


def _out_major(w: Any, n_out: int) -> np.ndarray:
    """A [*in, *out] kernel as a contiguous [out, in] matrix."""
    w = np.asarray(w)
    return np.ascontiguousarray(w.reshape(-1, math.prod(w.shape[-n_out:])).T)


def kernel_rows(table: jax.Array, ids: jax.Array | slice) -> jax.Array:
    """table[ids] in float32 for a bfloat16 table, gathered by gptjax's CPU kernel: XLA:CPU gathers a bfloat16
    table from a float32 copy of all of it, which it hoists out of the decode loop (gpt2's wte: 150 MB written,
    about 40 ms, per decode call; one-token stream chunks took 48 ms instead of 8)."""
    return cpu_kernels.bf16_rows(table, jnp.arange(*ids.indices(len(table))) if isinstance(ids, slice) else ids)


class KernelPositions(Positions):
    """The position lookup over a bfloat16 position table, on gptjax's CPU kernel."""

    def __call__(self, table: jax.Array, ids: jax.Array | slice) -> jax.Array:
        return kernel_rows(table, ids)


class KernelEmbedding(Embedding):
    """A bfloat16 [V, D] table (already out-major for the head) whose tied head runs gptjax's CPU bf16 kernel."""

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return kernel_rows(self.embedding[...], tokens)

    def attend(self, x: jax.Array) -> jax.Array:
        return cpu_kernels.bf16_matmul(x, self.embedding[...])

    tied = Table.tied  # its own lookup and head, not the float table's hooks


class Int8Embedding(Table):
    """An int8 [V, D] table with float32 scales [V, G] (per row and group of D/G columns)."""

    def __init__(self, q: Any, scale: Any, axes: tuple[str | None, ...]) -> None:
        self.embedding = param(q, axes)
        self.scale = param(np.reshape(scale, (np.shape(q)[0], -1)), (axes[0], None))

    def __call__(self, tokens: jax.Array) -> jax.Array:
        q, s = self.embedding[...], self.scale[...]
        rows = q[tokens].astype(jnp.float32)  # [..., D]
        return (rows.reshape(*rows.shape[:-1], s.shape[1], -1) * s[tokens][..., None]).reshape(rows.shape)

    def attend(self, x: jax.Array) -> jax.Array:
        q, s = self.embedding[...], self.scale[...]
        return lowp.int8_matmul_t(x.astype(jnp.float32), q, s)  # [..., D] -> [..., V]


class Int4Embedding(Table):
    """A packed int4 [V, D/2] table with float32 scales [V, G] (per row and group of D/G columns): token rows
    are gathered packed and unpacked after the gather."""

    def __init__(self, p: Any, scale: Any, axes: tuple[str | None, ...]) -> None:
        self.embedding = param(p, (axes[0], None))
        self.scale = param(scale, (axes[0], None))

    def __call__(self, tokens: jax.Array) -> jax.Array:
        s = self.scale[...]
        rows = lowp.unpack_int4(self.embedding[...][tokens], -1).astype(jnp.float32)  # [..., D]
        return (rows.reshape(*rows.shape[:-1], s.shape[1], -1) * s[tokens][..., None]).reshape(rows.shape)

    def attend(self, x: jax.Array) -> jax.Array:
        return lowp.int4_matmul_t(x.astype(jnp.float32), self.embedding[...], self.scale[...])  # [..., D] -> [..., V]


class KernelInt4Embedding(Int4Embedding):
    """A packed int4 [V, D/2] table (out-major as stored) whose tied head runs gptjax's CPU int4 kernel."""

    def attend(self, x: jax.Array) -> jax.Array:
        return lowp.int4_matmul_nk(x.astype(jnp.float32), self.embedding[...], self.scale[...])


class KernelInt8Embedding(Int8Embedding):
    """An int8 [V, D] table whose tied head runs gptjax's CPU int8 kernels (weight-only, two int8 terms)."""

    def attend(self, x: jax.Array) -> jax.Array:
        return lowp.int8_matmul_nk(x.astype(jnp.float32), self.embedding[...], self.scale[...])
