"""The matmul formulations of the reduced-precision modes, one function per kind of weight.

Legend: x [..., I] activations, q [G, I/G, O] int8 values with float32 scales s [G, O] (G groups along the
input; per-channel quantisation is G = 1). Every function returns float32 [..., O].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def dot(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., I] @ w [I, O] in w's dtype, accumulated and returned in float32."""
    return jnp.dot(x, w, preferred_element_type=jnp.float32)


def int8_matmul(x: jax.Array, q: jax.Array, s: jax.Array) -> jax.Array:
    """Weight-only int8: sum over groups g of (x_g @ q_g) * s_g, the int8 values converted inside the jit."""
    G = q.shape[0]
    xg = x.reshape(*x.shape[:-1], G, -1)  # [..., G, I/G]
    y = jnp.einsum("...gi,gio->...go", xg, q.astype(jnp.float32)) * s  # [..., G, O]
    return y.sum(-2)


def quantize_rows(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Symmetric int8 of x [..., K] with one float32 scale per row [..., 1] (an all-zero row gets scale 1)."""
    amax = jnp.abs(x).max(-1, keepdims=True)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0).astype(jnp.float32)
    return jnp.clip(jnp.rint(x / scale), -127, 127).astype(jnp.int8), scale


def w8a8_matmul(x: jax.Array, q: jax.Array, s: jax.Array) -> jax.Array:
    """Dynamic W8A8: each token's activations (per group) quantised to int8 with their own scale, an
    int8 x int8 -> int32 dot, then both scales: sum over g of (xq_g @ q_g) * sx_g * s_g."""
    G = q.shape[0]
    xq, sx = quantize_rows(x.reshape(*x.shape[:-1], G, -1))  # [..., G, I/G] int8, [..., G, 1]
    acc = jnp.einsum("...gi,gio->...go", xq, q, preferred_element_type=jnp.int32)  # [..., G, O]
    return (acc.astype(jnp.float32) * sx * s).sum(-2)


def int8_matmul_t(x: jax.Array, q: jax.Array, s: jax.Array) -> jax.Array:
    """x [..., D] @ q.T for an int8 [V, D] table with scales s [V, G] per row and group: float32 [..., V]."""
    V, G = s.shape
    xg = x.reshape(*x.shape[:-1], G, -1)  # [..., G, D/G]
    y = jnp.einsum("...gi,vgi->...vg", xg, q.reshape(V, G, -1).astype(jnp.float32)) * s  # [..., V, G]
    return y.sum(-1)
