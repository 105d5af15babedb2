"""The KV cache of the JAX backend: one layer cache per layer ([B, H, S, K] keys and values), passed in and
returned, never hidden state; and the masks that say which entries each new query reads.

A layer cache (LayerKV) computes its own attention scores and weighted sums, reading its layout without a
transpose. How it stores values is its KV storage's format (KV_FORMATS, keyed by the registry's KV storages): float32
as is, bfloat16 as its uint16 bits, int8 with a float32 scale per head and token. Read with XLA's dots, a bfloat16 or
int8 cache is converted to float32 whole, every decode step; with gptjax's CPU kernels (the conversion step's choice,
made once when the cache is created: KVCache.zeros) the decode steps read it as stored. A cache written at one index
for all rows, or at each row's own index (speculative decoding's per-row cursors), is the same type with a flag.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from gptjax.backends import cpu_kernels
from gptjax.backends.jax import lowp
from gptjax.config import GPTConfig
from gptjax.precision import KV_CACHES


class Masks(NamedTuple):
    """Which keys each new query reads: cache entries [B, T, S] (None: the cache is empty) and new tokens
    [B, T, T]."""

    cache: jax.Array | None
    new: jax.Array


def _as_is(x: jax.Array) -> tuple[jax.Array, None]:
    return x, None


def _bf16_bits(x: jax.Array) -> tuple[jax.Array, None]:
    return jax.lax.bitcast_convert_type(x.astype(jnp.bfloat16), jnp.uint16), None


def _from_bits(bits: jax.Array) -> jax.Array:
    return jax.lax.bitcast_convert_type(bits, jnp.bfloat16)


def _int8_rows(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    q, scale = lowp.quantize_rows(x)  # per head and token: max |x| over K / 127
    return q, scale[..., 0]


class KVFormat(NamedTuple):
    """How one KV storage holds keys/values [B, H, S, K]: the buffer dtype, encode(x) -> (values, scales [B, H, S]
    or None), decode(values) -> what the dots read, and whether gptjax's CPU kernels read it as stored."""

    dtype: Any
    encode: Callable[[jax.Array], tuple[jax.Array, jax.Array | None]]
    decode: Callable[[jax.Array], jax.Array]
    kernel: bool = False


# The format of each KV-cache storage of gptjax.precision. bfloat16 is held as uint16 bits: XLA:CPU writes into a
# bfloat16 buffer through a float32 copy of all of it, every decode step (gpt2, B=8, 480 cached tokens, XLA's dots:
# 56.2 vs 48.5 ms per step), while an integer buffer is updated in place. int8: a quarter of float32's bytes, half
# of bfloat16's, plus 4 / K (symmetric, per head and token).
KV_FORMATS: dict[str, KVFormat] = {
    "fp32": KVFormat(jnp.float32, _as_is, lambda a: a),
    "bf16": KVFormat(jnp.uint16, _bf16_bits, _from_bits, kernel=True),
    "int8": KVFormat(jnp.int8, _int8_rows, lambda a: a, kernel=True),
}
KERNEL_QUERIES = 8  # up to this many new tokens per row, gptjax's CPU kernels read an int8/bf16 cache (decode)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class LayerKV:
    """One layer's keys and values [B, H, S, K] in a KV storage's format (with float32 scales [B, H, S] where it
    scales), read by gptjax's CPU kernels during decode if `kernels`, written at one cache index for every row or,
    with `per_row`, at each row's own."""

    k: jax.Array
    v: jax.Array
    k_scale: jax.Array | None = None
    v_scale: jax.Array | None = None
    storage: str = field(default="fp32", metadata={"static": True})
    kernels: bool = field(default=False, metadata={"static": True})
    per_row: bool = field(default=False, metadata={"static": True})

    @classmethod
    def zeros(cls, shape: tuple[int, ...], storage: str = "fp32", kernels: bool = False) -> LayerKV:
        """An empty layer cache (scales 1), read by the CPU kernels if they run and its format has them."""
        f = KV_FORMATS[storage]
        values = [jnp.zeros(shape, f.dtype) for _ in "kv"]
        scales = [jnp.ones(shape[:3], jnp.float32) for _ in "kv"] if KV_CACHES[storage].scaled else []
        return cls(*values, *scales, storage=storage, kernels=kernels and f.kernel)

    def _read(self, a: jax.Array) -> bool:
        """Whether the CPU kernels read this cache for a [B, H, T, .] with few queries (a decode step: XLA converts
        the whole cache to float32 before its dots, every step); prefill keeps XLA's dots."""
        return self.kernels and a.shape[2] <= KERNEL_QUERIES

    def scores(self, q: jax.Array) -> jax.Array:
        """q [B, H, T, K] . keys -> float32 [B, H, T, S] (key scales applied after the dot)."""
        if self._read(q):
            s = cpu_kernels.kv_scores(q, self.k)
        else:
            s = jnp.einsum("bhtk,bhsk->bhts", q, KV_FORMATS[self.storage].decode(self.k).astype(jnp.float32))
        return s if self.k_scale is None else s * self.k_scale[:, :, None]

    def mix(self, p: jax.Array) -> jax.Array:
        """Probabilities [B, H, T, S] . values -> float32 [B, T, H, K] (value scales folded into p)."""
        p = p if self.v_scale is None else p * self.v_scale[:, :, None]
        if self._read(p):
            return cpu_kernels.kv_mix(p, self.v).transpose(0, 2, 1, 3)
        return jnp.einsum("bhts,bhsk->bthk", p, KV_FORMATS[self.storage].decode(self.v).astype(jnp.float32))

    def stored(self, k: jax.Array, v: jax.Array) -> LayerKV:
        """New keys/values [B, H, T, K] as this cache holds them (rounded or quantised)."""
        (k, ks), (v, vs) = (KV_FORMATS[self.storage].encode(a) for a in (k, v))
        return replace(self, k=k.astype(self.k.dtype), v=v.astype(self.v.dtype), k_scale=ks, v_scale=vs)

    def write(self, new: LayerKV, start: jax.Array) -> LayerKV:
        """The cache with new entries (from stored(), [B, H, T, ...]) written at index start ([B]: each row's)."""
        update = _update_rows if self.per_row else _update
        return replace(self, **{f.name: update(getattr(self, f.name), getattr(new, f.name), start)
                                for f in fields(self) if f.name in _DATA and getattr(self, f.name) is not None})


_DATA = ("k", "v", "k_scale", "v_scale")


def _update(old: jax.Array, part: jax.Array, start: jax.Array) -> jax.Array:
    return jax.lax.dynamic_update_slice_in_dim(old, part, start, axis=2)


def _update_rows(old: jax.Array, part: jax.Array, start: jax.Array) -> jax.Array:
    def one(old: jax.Array, part: jax.Array, s: jax.Array) -> jax.Array:  # [H, S, ...] <- [H, T, ...] at s
        return jax.lax.dynamic_update_slice_in_dim(old, part, s, axis=1)
    return jax.vmap(one)(old, part, start)


class KVCache(NamedTuple):
    """The decode cache: one LayerKV ([B, H, S, K]) per layer; passed in and returned, never hidden state.
    Separate buffers (not one [L, ...] array) let XLA update each in place in the loop."""

    layers: tuple[Any, ...]

    @classmethod
    def zeros(cls, config: GPTConfig, batch: int, length: int, kind: str = "fp32", cpu_kernels: bool = False
              ) -> KVCache:
        """An empty cache of S=length entries per row, stored as kind (a KV storage of gptjax.precision), read
        by gptjax's CPU kernels during decode if cpu_kernels (the conversion step's choice)."""
        shape = (batch, config.n_head, length, config.head_dim)
        return cls(tuple(LayerKV.zeros(shape, kind, cpu_kernels) for _ in range(config.n_layer)))

    def per_row(self) -> KVCache:
        """The same buffers as a cache whose writes take a cache index per row (speculative decoding)."""
        return KVCache(tuple(replace(layer, per_row=True) for layer in self.layers))

    @property
    def length(self) -> int:
        """S, the entries per row."""
        return self.layers[0].k.shape[2]  # every layer cache holds keys k [B, H, S, K]
