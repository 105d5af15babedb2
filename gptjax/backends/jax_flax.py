"""GPT-2 as a Flax NNX model compiled with jax.jit: stacked layers under lax.scan, float32-sensitive ops in f32.

Every parameter carries logical axis names ("vocab", "embed", "heads", "mlp", "layers", ...) as NNX
`out_sharding` metadata; gptjax.sharding maps them to mesh axes. Legend: B T D H K F V L as in config.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptjax.backends.base import Backend
from gptjax.config import GPTConfig
from gptjax.weights import Params

_BLOCK_KEYS = (
    "ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
    "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
    "mlp.c_proj.weight", "mlp.c_proj.bias",
)


def _param(value: Any, axes: tuple[str | None, ...]) -> nnx.Param:
    """A parameter tagged with logical axis names (no eager sharding: the mesh is applied later)."""
    return nnx.Param(jnp.asarray(value), out_sharding=axes, eager_sharding=False)


class Linear(nnx.Module):
    """Conv1D-layout dense layer: x [..., in] @ kernel [in, out] + bias [out]."""

    def __init__(self, kernel: Any, bias: Any, axes: tuple[str | None, ...]) -> None:
        self.kernel = _param(kernel, axes)
        self.bias = _param(bias, axes[:-2] + axes[-1:])

    def __call__(self, x: jax.Array) -> jax.Array:
        return x @ self.kernel[...] + self.bias[...]


class LayerNorm(nnx.Module):
    """LayerNorm whose statistics are computed in float32 whatever the activation dtype."""

    def __init__(self, scale: Any, bias: Any, eps: float, axes: tuple[str | None, ...]) -> None:
        self.scale = _param(scale, axes)
        self.bias = _param(bias, axes)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)  # [..., 1]
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)  # [..., 1]
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...] + self.bias[...]).astype(x.dtype)


class Attention(nnx.Module):
    """Multi-head causal self-attention; softmax in float32.

    The Conv1D kernels are stored split by head ([D, 3, H, K] in, [H, K, D] out) so that tensor
    parallelism can shard the "heads" axis directly.
    """

    def __init__(self, p: dict[str, Any], n_head: int, layer_axes: tuple[str, ...]) -> None:
        w, b, wo = p["attn.c_attn.weight"], p["attn.c_attn.bias"], p["attn.c_proj.weight"]
        lead, D = w.shape[:-2], w.shape[-2]
        H, K = n_head, D // n_head
        self.qkv_kernel = _param(w.reshape(*lead, D, 3, H, K), layer_axes + ("embed", None, "heads", "kv"))
        self.qkv_bias = _param(b.reshape(*lead, 3, H, K), layer_axes + (None, "heads", "kv"))
        self.out_kernel = _param(wo.reshape(*lead, H, K, D), layer_axes + ("heads", "kv", "embed"))
        self.out_bias = _param(p["attn.c_proj.bias"], layer_axes + ("embed",))

    def qkv(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Queries, keys, values [B, T, H, K] of x [B, T, D]."""
        qkv = jnp.einsum("btd,dchk->cbthk", x, self.qkv_kernel[...])  # [B, T, D] -> [3, B, T, H, K]
        q, k, v = qkv + self.qkv_bias[...][:, None, None]
        return q, k, v

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
        """Attention of q [B, T, H, K] over k, v [B, S, H, K] where mask [B or 1, T, S] allows, projected out."""
        scores = jnp.einsum("bthk,bshk->bhts", q, k) / np.sqrt(q.shape[-1])  # -> [B, H, T, S]
        scores = jnp.where(mask[:, None], scores.astype(jnp.float32), jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)  # [B, H, T, S]
        out = jnp.einsum("bhts,bshk->bthk", probs, v)  # -> [B, T, H, K]
        return jnp.einsum("bthk,hkd->btd", out, self.out_kernel[...]) + self.out_bias[...]  # -> [B, T, D]

    def __call__(self, x: jax.Array) -> jax.Array:
        T = x.shape[1]
        q, k, v = self.qkv(x)
        return self.attend(q, k, v, jnp.tril(jnp.ones((1, T, T), dtype=bool)))  # causal [1, T, T]

    def cached(self, x: jax.Array, mask: jax.Array, cache: tuple[jax.Array, jax.Array], start: jax.Array
               ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """Attention that first writes x's keys/values into the cache [B, S, H, K] at index start."""
        q, k, v = self.qkv(x)
        k_cache = jax.lax.dynamic_update_slice_in_dim(cache[0], k.astype(cache[0].dtype), start, axis=1)
        v_cache = jax.lax.dynamic_update_slice_in_dim(cache[1], v.astype(cache[1].dtype), start, axis=1)
        return self.attend(q, k_cache, v_cache, mask), (k_cache, v_cache)


class MLP(nnx.Module):
    """Feed-forward network with tanh GELU."""

    def __init__(self, p: dict[str, Any], layer_axes: tuple[str, ...]) -> None:
        self.c_fc = Linear(p["mlp.c_fc.weight"], p["mlp.c_fc.bias"], layer_axes + ("embed", "mlp"))
        self.c_proj = Linear(p["mlp.c_proj.weight"], p["mlp.c_proj.bias"], layer_axes + ("mlp", "embed"))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.c_proj(jax.nn.gelu(self.c_fc(x), approximate=True))  # [B, T, D] -> [B, T, F] -> [B, T, D]


class Block(nnx.Module):
    """Pre-LayerNorm transformer block. Built with stacked [L, ...] weights; called on one layer's slice."""

    def __init__(self, p: dict[str, Any], n_head: int, eps: float, layer_axes: tuple[str, ...] = ()) -> None:
        self.ln_1 = LayerNorm(p["ln_1.weight"], p["ln_1.bias"], eps, layer_axes + ("embed",))
        self.attn = Attention(p, n_head, layer_axes)
        self.ln_2 = LayerNorm(p["ln_2.weight"], p["ln_2.bias"], eps, layer_axes + ("embed",))
        self.mlp = MLP(p, layer_axes)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.ln_1(x))  # [B, T, D]
        return x + self.mlp(self.ln_2(x))  # [B, T, D]

    def cached(self, x: jax.Array, mask: jax.Array, cache: tuple[jax.Array, jax.Array], start: jax.Array
               ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """The block over new tokens x [B, T, D] whose keys/values go into the layer's cache at start."""
        a, cache = self.attn.cached(self.ln_1(x), mask, cache, start)
        x = x + a  # [B, T, D]
        return x + self.mlp(self.ln_2(x)), cache


class GPT(nnx.Module):
    """GPT-2: token + position embeddings, L blocks scanned over a stacked layer axis, final LN, tied head."""

    def __init__(self, config: GPTConfig, params: Params) -> None:
        c = config
        stacked = {k: np.stack([params[f"h.{i}.{k}"] for i in range(c.n_layer)]) for k in _BLOCK_KEYS}
        self.wte = _param(params["wte.weight"], ("vocab", "embed"))  # [V, D]
        self.wpe = _param(params["wpe.weight"], ("length", "embed"))  # [P, D]
        self.blocks = Block(stacked, c.n_head, c.layer_norm_epsilon, layer_axes=("layers",))
        self.ln_f = LayerNorm(params["ln_f.weight"], params["ln_f.bias"], c.layer_norm_epsilon, ("embed",))
        head = params.get("lm_head.weight")
        self.lm_head = None if head is None else _param(head, ("vocab", "embed"))  # [V, D] if untied

    def __call__(self, tokens: jax.Array, last_index: jax.Array | None = None) -> jax.Array:
        """Float32 logits [B, T, V] for int tokens [B, T]; [B, V] at position last_index if given."""
        T = tokens.shape[1]
        x = self.wte[...][tokens] + self.wpe[...][:T]  # [B, T] -> [B, T, D]
        graphdef, layers = nnx.split(self.blocks)
        x, _ = jax.lax.scan(lambda h, layer: (nnx.merge(graphdef, layer)(h), None), x, layers)  # L x [B, T, D]
        if last_index is not None:
            x = jax.lax.dynamic_index_in_dim(x, last_index, axis=1, keepdims=False)  # [B, T, D] -> [B, D]
        return self.logits(x)

    def logits(self, x: jax.Array) -> jax.Array:
        """Final LayerNorm and the (tied) head: [..., D] -> float32 [..., V]."""
        head = self.wte[...] if self.lm_head is None else self.lm_head[...]  # [V, D]
        return jnp.einsum("...d,vd->...v", self.ln_f(x), head, preferred_element_type=jnp.float32)

    def step(self, tokens: jax.Array, positions: jax.Array, mask: jax.Array, cache: KVCache, start: jax.Array
             ) -> tuple[jax.Array, KVCache]:
        """Run new tokens [B, T] at positions [B, T] against the cache, writing their keys/values at cache
        index start; mask [B, T, S] says which cache entries each query reads. Returns the last position's
        logits [B, V] and the updated cache."""
        x = self.wte[...][tokens] + self.wpe[...][positions]  # [B, T] -> [B, T, D]
        graphdef, layers = nnx.split(self.blocks)

        def layer_step(carry, layer):
            h, ks, vs, i = carry
            h, (k, v) = nnx.merge(graphdef, layer).cached(h, mask, (ks[i], vs[i]), start)
            ks = jax.lax.dynamic_update_index_in_dim(ks, k, i, 0)  # written in place: ks is loop-carried
            vs = jax.lax.dynamic_update_index_in_dim(vs, v, i, 0)
            return (h, ks, vs, i + 1), None

        (x, ks, vs, _), _ = jax.lax.scan(layer_step, (x, cache.k, cache.v, 0), layers)
        return self.logits(x[:, -1]), KVCache(ks, vs)


class KVCache(NamedTuple):
    """Keys and values of every layer, [L, B, S, H, K] each; passed in and returned, never hidden state."""

    k: jax.Array
    v: jax.Array


@dataclass(frozen=True)
class JaxWeights:
    """A converted model: NNX graph definition + its state (device arrays), and the config it was built for."""

    graphdef: Any
    state: Any
    config: GPTConfig


@partial(jax.jit, static_argnames=("graphdef", "last_only"))
def _apply(graphdef: Any, state: Any, tokens: jax.Array, last_index: jax.Array, last_only: bool) -> jax.Array:
    with jax.default_matmul_precision("float32"):  # true fp32 dots on GPU/TPU too (no TF32/bf16 passes)
        model = nnx.merge(graphdef, state)
        return model(tokens, last_index if last_only else None)


def bucket_length(T: int, n_positions: int) -> int:
    """Pad lengths to few shapes (powers of two up to 64, then multiples of 64) so jit compiles rarely."""
    bucket = 1 << max(3, (T - 1).bit_length()) if T <= 64 else -(-T // 64) * 64
    return min(bucket, n_positions)


class JaxBackend(Backend):
    """Flax NNX GPT-2 under jax.jit; sequence lengths are padded to buckets (causal: padding is invisible)."""

    name = "jax"
    prepared_type = JaxWeights

    def _convert(self, params: Params) -> JaxWeights:
        float32 = {k: np.asarray(v, dtype=np.float32) for k, v in params.items()}
        graphdef, state = nnx.split(GPT(self.config, float32))
        return JaxWeights(graphdef, state, self.config)

    def _forward(self, weights: JaxWeights, tokens: np.ndarray, last_only: bool) -> np.ndarray:
        B, T = tokens.shape
        padded = np.zeros((B, bucket_length(T, self.config.n_positions)), np.int32)
        padded[:, :T] = tokens
        logits = _apply(weights.graphdef, weights.state, padded, np.int32(T - 1), last_only)
        return np.asarray(logits if last_only else logits[:, :T])
