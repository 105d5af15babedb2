"""The KV cache of the JAX backend: one layer cache per layer ([B, H, S, K] keys and values), passed in and
returned, never hidden state; and the masks that say which entries each new query reads.

A layer cache computes its own attention scores and weighted sums, reading its layout without a transpose.
Float caches use XLA's dots. A bfloat16 or int8 cache read with XLA's dots is converted to float32 whole, every
decode step; the Kernel* caches read it as stored with gptjax's CPU kernels during decode. Which type a cache
is is chosen once, when it is created (KVCache.zeros), from the conversion step's CPU-kernel choice.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from gptjax.backends import cpu_kernels
from gptjax.backends.jax import lowp
from gptjax.config import GPTConfig


class Masks(NamedTuple):
    """Which keys each new query reads: cache entries [B, T, S] (None: the cache is empty) and new tokens
    [B, T, T]."""

    cache: jax.Array | None
    new: jax.Array


class FloatKV(NamedTuple):
    """One layer's keys and values [B, H, S, K] in a float dtype (float32 or bfloat16)."""

    k: jax.Array
    v: jax.Array

    @classmethod
    def zeros(cls, shape: tuple[int, ...]) -> FloatKV:
        """An empty float32 layer cache."""
        return cls(jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32))

    def scores(self, q: jax.Array) -> jax.Array:
        """q [B, H, T, K] . keys -> float32 [B, H, T, S]."""
        return jnp.einsum("bhtk,bhsk->bhts", q, self.k.astype(jnp.float32))

    def mix(self, p: jax.Array) -> jax.Array:
        """Probabilities [B, H, T, S] . values -> float32 [B, T, H, K]."""
        return jnp.einsum("bhts,bhsk->bthk", p, self.v.astype(jnp.float32))

    def stored(self, k: jax.Array, v: jax.Array) -> FloatKV:
        """New keys/values [B, H, T, K] as this cache would hold them."""
        return FloatKV(k.astype(self.k.dtype), v.astype(self.v.dtype))

    def write(self, new: FloatKV, start: jax.Array) -> FloatKV:
        """The cache with new entries (from stored(), [B, H, T, K]) written at index start."""
        return FloatKV(*(jax.lax.dynamic_update_slice_in_dim(old, part, start, axis=2) for old, part in zip(self, new)))


class Int8KV(NamedTuple):
    """One layer's keys and values as int8 [B, H, S, K] with a float32 scale per head and token [B, H, S]
    (symmetric: max |x| over K / 127): a quarter of float32's bytes, half of bfloat16's, plus 4 / K."""

    k: jax.Array
    v: jax.Array
    k_scale: jax.Array
    v_scale: jax.Array

    @classmethod
    def zeros(cls, shape: tuple[int, ...]) -> Int8KV:
        """An empty layer cache."""
        return cls(jnp.zeros(shape, jnp.int8), jnp.zeros(shape, jnp.int8), jnp.ones(shape[:3], jnp.float32),
                   jnp.ones(shape[:3], jnp.float32))

    def scores(self, q: jax.Array) -> jax.Array:
        """q [B, H, T, K] . keys -> float32 [B, H, T, S] (the key scales applied after the dot)."""
        return jnp.einsum("bhtk,bhsk->bhts", q, self.k.astype(jnp.float32)) * self.k_scale[:, :, None]

    def mix(self, p: jax.Array) -> jax.Array:
        """Probabilities [B, H, T, S] . values -> float32 [B, T, H, K] (value scales folded into p)."""
        return jnp.einsum("bhts,bhsk->bthk", p * self.v_scale[:, :, None], self.v.astype(jnp.float32))

    def stored(self, k: jax.Array, v: jax.Array) -> Int8KV:
        """New keys/values [B, H, T, K] quantised as this cache holds them."""
        (kq, ks), (vq, vs) = lowp.quantize_rows(k), lowp.quantize_rows(v)
        return type(self)(kq, vq, ks[..., 0], vs[..., 0])

    def write(self, new: Int8KV, start: jax.Array) -> Int8KV:
        """The cache with new entries (from stored(): int8 [B, H, T, K], scales [B, H, T]) written at start."""
        return type(self)(*(jax.lax.dynamic_update_slice_in_dim(old, part, start, axis=2)
                            for old, part in zip(self, new)))


class Bf16KV(FloatKV):
    """One layer's bfloat16 keys and values [B, H, S, K], held as their uint16 bit patterns: XLA:CPU writes into
    a bfloat16 buffer through a float32 copy of all of it, every decode step (gpt2, B=8, 480 cached tokens,
    XLA's dots: 56.2 vs 48.5 ms per step), while an integer buffer is updated in place. Read and written as
    bfloat16 (read by gptjax's CPU kernels where available)."""

    @classmethod
    def zeros(cls, shape: tuple[int, ...]) -> Bf16KV:
        """An empty layer cache."""
        return cls(jnp.zeros(shape, jnp.uint16), jnp.zeros(shape, jnp.uint16))

    def scores(self, q: jax.Array) -> jax.Array:
        """q [B, H, T, K] . keys -> float32 [B, H, T, S]."""
        return FloatKV(_from_bits(self.k), self.v).scores(q)

    def mix(self, p: jax.Array) -> jax.Array:
        """Probabilities [B, H, T, S] . values -> float32 [B, T, H, K]."""
        return FloatKV(self.k, _from_bits(self.v)).mix(p)

    def stored(self, k: jax.Array, v: jax.Array) -> Bf16KV:
        """New keys/values [B, H, T, K] rounded to bfloat16, as bits."""
        return type(self)(*(jax.lax.bitcast_convert_type(a.astype(jnp.bfloat16), jnp.uint16) for a in (k, v)))

    def write(self, new: Bf16KV, start: jax.Array) -> Bf16KV:
        """The cache with new entries (from stored()) written at index start."""
        return type(self)(*FloatKV.write(self, new, start))


KERNEL_QUERIES = 8  # up to this many new tokens per row, gptjax's CPU kernels read an int8/bf16 cache (decode)


def _decoding(a: jax.Array) -> bool:
    """Whether attention over a stored int8/bf16 cache runs on gptjax's CPU kernels: few queries (a decode
    step: XLA converts the whole cache to float32 before its dots, every step); prefill keeps XLA's dots."""
    return a.shape[2] <= KERNEL_QUERIES


def _from_bits(bits: jax.Array) -> jax.Array:
    return jax.lax.bitcast_convert_type(bits, jnp.bfloat16)


class KernelInt8KV(Int8KV):
    """An int8 layer cache read by gptjax's CPU kernels during decode (the same numbers as Int8KV's dots)."""

    def scores(self, q: jax.Array) -> jax.Array:
        """q [B, H, T, K] . keys -> float32 [B, H, T, S] (the key scales applied after the dot)."""
        if _decoding(q):
            return cpu_kernels.kv_scores(q, self.k) * self.k_scale[:, :, None]
        return super().scores(q)

    def mix(self, p: jax.Array) -> jax.Array:
        """Probabilities [B, H, T, S] . values -> float32 [B, T, H, K] (value scales folded into p)."""
        if _decoding(p):
            return cpu_kernels.kv_mix(p * self.v_scale[:, :, None], self.v).transpose(0, 2, 1, 3)
        return super().mix(p)


class KernelBf16KV(Bf16KV):
    """A bfloat16 layer cache read by gptjax's CPU kernels during decode."""

    def scores(self, q: jax.Array) -> jax.Array:
        """q [B, H, T, K] . keys -> float32 [B, H, T, S]."""
        if _decoding(q):
            return cpu_kernels.kv_scores(q, self.k)
        return super().scores(q)

    def mix(self, p: jax.Array) -> jax.Array:
        """Probabilities [B, H, T, S] . values -> float32 [B, T, H, K]."""
        if _decoding(p):
            return cpu_kernels.kv_mix(p, self.v).transpose(0, 2, 1, 3)
        return super().mix(p)


# The layer cache per KV-cache storage of gptjax.precision: (read with XLA's dots, read with gptjax's CPU kernels)
KV_LAYERS: dict[str, tuple[type, type]] = {"fp32": (FloatKV, FloatKV), "bf16": (Bf16KV, KernelBf16KV),
                                            "int8": (Int8KV, KernelInt8KV)}


class KVCache(NamedTuple):
    """The decode cache: one layer cache (FloatKV, Bf16KV, Int8KV ..., [B, H, S, K]) per layer; passed in and returned,
    never hidden state. Separate buffers (not one [L, ...] array) let XLA update each in place in the loop."""

    layers: tuple[Any, ...]

    @classmethod
    def zeros(cls, config: GPTConfig, batch: int, length: int, kind: str = "fp32", cpu_kernels: bool = False
              ) -> KVCache:
        """An empty cache of S=length entries per row, stored as kind (a KV storage of gptjax.precision), read
        by gptjax's CPU kernels during decode if cpu_kernels (the conversion step's choice)."""
        layer_cls = KV_LAYERS[kind][cpu_kernels]
        shape = (batch, config.n_head, length, config.head_dim)
        return cls(tuple(layer_cls.zeros(shape) for _ in range(config.n_layer)))

    @property
    def length(self) -> int:
        """S, the entries per row."""
        return self.layers[0].k.shape[2]  # every layer cache holds keys k [B, H, S, K]
