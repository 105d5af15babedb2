"""GPT-2 as a Flax NNX model compiled with jax.jit; LayerNorm statistics, softmax and logits in float32.

Layers are a list of blocks by default: decoding reads each layer's weights and cache buffer directly, which
XLA:CPU does without copies (scanning over stacked [L, ...] weights inside the decode loop made it slice a
copy of every layer's weights per token: 26 vs 43 tokens/s on gpt2). `scan_layers=True` stacks them and runs
`lax.scan` instead, which keeps compile time flat in depth (for training and very deep forward passes).

Every parameter carries logical axis names ("vocab", "embed", "heads", "mlp", "layers", ...) as NNX
`out_sharding` metadata; gptjax.sharding maps them to mesh axes. Legend: B T D H K F V L as in config.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptjax.backends.base import Backend
from gptjax.config import GPTConfig
from gptjax.generate import LENGTH, STOP, GenerationRequest, StreamChunk
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
        """Queries, keys, values [B, H, T, K] of x [B, T, D]."""
        B, T, D = x.shape
        w, b = self.qkv_kernel[...], self.qkv_bias[...]  # [D, 3, H, K], [3, H, K]
        qkv = x @ w.reshape(D, -1) + b.reshape(-1)  # 2-D dot (2x faster on XLA:CPU than the 4-D einsum)
        qkv = qkv.reshape(B, T, *b.shape).transpose(2, 0, 3, 1, 4)  # [B, T, 3D] -> [3, B, H, T, K]
        return qkv[0], qkv[1], qkv[2]

    def attend(self, q: jax.Array, parts: list[tuple[jax.Array, jax.Array, jax.Array]]) -> jax.Array:
        """Attention of q [B, H, T, K] over one softmax spanning every (k, v [B, H, S_i, K], mask [B or 1, T, S_i])
        part, projected out to [B, T, D]. Keys/values keep the cache's [B, H, S, K] layout, which both
        einsums read without a transpose."""
        scale = 1 / np.sqrt(q.shape[-1])
        scores = [jnp.where(m[:, None], jnp.einsum("bhtk,bhsk->bhts", q, k).astype(jnp.float32) * scale,
                            jnp.finfo(jnp.float32).min) for k, _, m in parts]  # [B, H, T, S_i] each
        probs = jax.nn.softmax(jnp.concatenate(scores, axis=-1), axis=-1)  # [B, H, T, sum S_i]
        splits = np.cumsum([k.shape[2] for k, _, _ in parts])[:-1]
        out = sum(jnp.einsum("bhts,bhsk->bthk", p.astype(v.dtype), v)
                  for p, (_, v, _) in zip(jnp.split(probs, splits, axis=-1), parts))  # -> [B, T, H, K]
        w = self.out_kernel[...]  # [H, K, D]
        return out.reshape(*out.shape[:2], -1) @ w.reshape(-1, w.shape[-1]) + self.out_bias[...]  # -> [B, T, D]

    def __call__(self, x: jax.Array) -> jax.Array:
        T = x.shape[1]
        q, k, v = self.qkv(x)
        return self.attend(q, [(k, v, jnp.tril(jnp.ones((1, T, T), dtype=bool)))])  # causal [1, T, T]

    def cached(self, x: jax.Array, masks: Masks, cache: tuple[jax.Array, jax.Array], start: jax.Array
               ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """Attention of new tokens x [B, T, D] over the cache [B, H, S, K] before they are added (masks.cache,
        or nothing for a fresh cache) and over themselves (masks.new); their keys/values are then written at
        cache index start. Reading the cache from before the write keeps the write in place in the loop."""
        q, k, v = self.qkv(x)
        parts = [(k, v, masks.new)] if masks.cache is None else [(cache[0], cache[1], masks.cache), (k, v, masks.new)]
        out = self.attend(q, parts)
        start = start + zero_after(out)
        k_cache = jax.lax.dynamic_update_slice_in_dim(cache[0], k.astype(cache[0].dtype), start, axis=2)
        v_cache = jax.lax.dynamic_update_slice_in_dim(cache[1], v.astype(cache[1].dtype), start, axis=2)
        return out, (k_cache, v_cache)


def _dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout; the identity without a key (inference) or at rate 0."""
    if key is None or rate == 0:
        return x
    return jnp.where(jax.random.bernoulli(key, 1 - rate, x.shape), x / (1 - rate), 0).astype(x.dtype)


def zero_after(x: jax.Array) -> jax.Array:
    """An int32 0 that XLA can only compute after x. Adding it to a cache write's index orders the write
    after the reads that produced x; without that order XLA:CPU copies the whole loop-carried cache on every
    decode step (measured: 17 vs 6.6 us per step for one 0.5 MB buffer). argmax is >= 0, so min(., 0) is 0
    for any x, NaN included, and the simplifier cannot fold it away."""
    return jnp.minimum(jnp.argmax(x.reshape(-1)[:8]), 0).astype(jnp.int32)


class Masks(NamedTuple):
    """Which keys each new query reads: cache entries [B, T, S] (None: the cache is empty) and new tokens
    [B, T, T]."""

    cache: jax.Array | None
    new: jax.Array


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

    def __call__(self, x: jax.Array, dropout: float = 0.0, key: jax.Array | None = None) -> jax.Array:
        """x [B, T, D] -> [B, T, D]; with a key, dropout on each residual branch (training only)."""
        k1, k2 = (None, None) if key is None else jax.random.split(key)
        x = x + _dropout(self.attn(self.ln_1(x)), dropout, k1)  # [B, T, D]
        return x + _dropout(self.mlp(self.ln_2(x)), dropout, k2)  # [B, T, D]

    def cached(self, x: jax.Array, masks: Masks, cache: tuple[jax.Array, jax.Array], start: jax.Array
               ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """The block over new tokens x [B, T, D] whose keys/values go into the layer's cache at start."""
        a, cache = self.attn.cached(self.ln_1(x), masks, cache, start)
        x = x + a  # [B, T, D]
        return x + self.mlp(self.ln_2(x)), cache


class GPT(nnx.Module):
    """GPT-2: token + position embeddings, L pre-LN blocks, final LayerNorm, tied (or separate) head."""

    def __init__(self, config: GPTConfig, params: Params, *, scan_layers: bool = False) -> None:
        c = config
        layer = [{k: params[f"h.{i}.{k}"] for k in _BLOCK_KEYS} for i in range(c.n_layer)]
        self.wte = _param(params["wte.weight"], ("vocab", "embed"))  # [V, D]
        self.wpe = _param(params["wpe.weight"], ("length", "embed"))  # [P, D]
        if scan_layers:
            stacked = {k: np.stack([p[k] for p in layer]) for k in _BLOCK_KEYS}  # [L, ...]
            self.blocks = Block(stacked, c.n_head, c.layer_norm_epsilon, layer_axes=("layers",))
        else:
            self.blocks = nnx.List([Block(p, c.n_head, c.layer_norm_epsilon) for p in layer])
        self.scan_layers = scan_layers
        self.ln_f = LayerNorm(params["ln_f.weight"], params["ln_f.bias"], c.layer_norm_epsilon, ("embed",))
        head = params.get("lm_head.weight")
        self.lm_head = None if head is None else _param(head, ("vocab", "embed"))  # [V, D] if untied

    def layers(self) -> list[Block]:
        """One Block per layer (slices of the stacked weights when scan_layers)."""
        if not self.scan_layers:
            return list(self.blocks)
        graphdef, stacked = nnx.split(self.blocks)
        return [nnx.merge(graphdef, jax.tree.map(lambda a: a[i], stacked)) for i in range(self.n_layer())]

    def n_layer(self) -> int:
        """Number of layers."""
        return self.blocks.ln_1.scale.shape[0] if self.scan_layers else len(self.blocks)

    def __call__(self, tokens: jax.Array, last_index: jax.Array | None = None, *, dropout: float = 0.0,
                 key: jax.Array | None = None) -> jax.Array:
        """Float32 logits [B, T, V] for int tokens [B, T]; [B, V] at position last_index if given.
        With a PRNG key, dropout of rate `dropout` on the embeddings and every residual branch."""
        T, L = tokens.shape[1], self.n_layer()
        keys = [None] * (L + 1) if key is None else list(jax.random.split(key, L + 1))
        x = _dropout(self.wte[...][tokens] + self.wpe[...][:T], dropout, keys[0])  # [B, T] -> [B, T, D]
        if self.scan_layers:
            graphdef, stacked = nnx.split(self.blocks)
            layer_keys = None if key is None else jnp.stack(keys[1:])

            def layer(h, xs):
                w, k = xs
                return nnx.merge(graphdef, w)(h, dropout, k), None

            x, _ = jax.lax.scan(layer, x, (stacked, layer_keys))  # L x [B, T, D]
        else:
            for block, k in zip(self.blocks, keys[1:]):
                x = block(x, dropout, k)  # [B, T, D]
        if last_index is not None:
            x = jax.lax.dynamic_index_in_dim(x, last_index, axis=1, keepdims=False)  # [B, T, D] -> [B, D]
        return self.logits(x)

    def logits(self, x: jax.Array) -> jax.Array:
        """Final LayerNorm and the (tied) head: [..., D] -> float32 [..., V]."""
        head = self.wte[...] if self.lm_head is None else self.lm_head[...]  # [V, D]
        return jnp.einsum("...d,vd->...v", self.ln_f(x), head, preferred_element_type=jnp.float32)

    def step(self, tokens: jax.Array, positions: jax.Array, masks: Masks, cache: KVCache, start: jax.Array
             ) -> tuple[jax.Array, KVCache]:
        """Run new tokens [B, T] at positions [B, T] against the cache, writing their keys/values at cache
        index start; masks say which cache entries and new tokens each query reads. Returns the last
        position's logits [B, V] and the updated cache."""
        x = self.wte[...][tokens] + self.wpe[...][positions]  # [B, T] -> [B, T, D]
        ks, vs = [], []
        for block, k, v in zip(self.layers(), cache.k, cache.v):
            x, (k, v) = block.cached(x, masks, (k, v), start)  # [B, T, D]; cache [B, H, S, K]
            ks.append(k)
            vs.append(v)
        return self.logits(x[:, -1]), KVCache(tuple(ks), tuple(vs))


def to_params(model: GPT) -> Params:
    """The canonical GPT-2 dict (NumPy float32, Conv1D layouts) of a model, stacked or not: the inverse of
    GPT(config, params)."""
    params = {"wte.weight": model.wte[...], "wpe.weight": model.wpe[...], "ln_f.weight": model.ln_f.scale[...],
              "ln_f.bias": model.ln_f.bias[...]}
    if model.lm_head is not None:
        params["lm_head.weight"] = model.lm_head[...]
    for i, block in enumerate(model.layers()):
        a = block.attn
        D = a.qkv_kernel.shape[0]
        params |= {f"h.{i}.{k}": v for k, v in {
            "ln_1.weight": block.ln_1.scale[...], "ln_1.bias": block.ln_1.bias[...],
            "attn.c_attn.weight": a.qkv_kernel[...].reshape(D, -1), "attn.c_attn.bias": a.qkv_bias[...].reshape(-1),
            "attn.c_proj.weight": a.out_kernel[...].reshape(-1, D), "attn.c_proj.bias": a.out_bias[...],
            "ln_2.weight": block.ln_2.scale[...], "ln_2.bias": block.ln_2.bias[...],
            "mlp.c_fc.weight": block.mlp.c_fc.kernel[...], "mlp.c_fc.bias": block.mlp.c_fc.bias[...],
            "mlp.c_proj.weight": block.mlp.c_proj.kernel[...], "mlp.c_proj.bias": block.mlp.c_proj.bias[...],
        }.items()}
    return {k: np.asarray(v, dtype=np.float32) for k, v in params.items()}


class KVCache(NamedTuple):
    """Keys and values, one [B, H, S, K] buffer per layer; passed in and returned, never hidden state.

    Separate buffers (not one [L, ...] array) let XLA update each in place inside the decode loop."""

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]

    @classmethod
    def zeros(cls, config: GPTConfig, batch: int, length: int, dtype: Any = jnp.float32) -> KVCache:
        """An empty cache of S=length entries per row."""
        shape = (batch, config.n_head, length, config.head_dim)
        return cls(*(tuple(jnp.zeros(shape, dtype) for _ in range(config.n_layer)) for _ in "kv"))


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
    """Flax NNX GPT-2 under jax.jit; sequence lengths are padded to buckets (causal: padding is invisible).

    Option mesh (from gptjax.sharding.make_mesh): weights are placed by their logical axes (tensor parallel
    over heads/MLP/vocab, FSDP over the width), batches over (data, fsdp), the KV cache over heads."""

    name = "jax"
    prepared_type = JaxWeights
    options = {"mesh": ()}

    def __init__(self, config: GPTConfig, *, metrics: Any = None, trace_sync: bool = True, **options: Any) -> None:
        super().__init__(config, metrics=metrics, trace_sync=trace_sync, **options)
        self.mesh = options.get("mesh")
        if self.mesh is not None:
            from gptjax.sharding import check_config

            check_config(config, self.mesh)

    def _attributes(self, phase: str, batch: int, seq_len: int) -> dict[str, Any]:
        from gptjax.sharding import mesh_description

        return super()._attributes(phase, batch, seq_len) | {"gptjax.mesh": mesh_description(self.mesh)}

    def _place_batch(self, tokens: np.ndarray) -> Any:
        if self.mesh is None:
            return tokens
        from gptjax.sharding import shard_batch

        return shard_batch(tokens, self.mesh)

    def _compile_count(self) -> int:
        from gptjax.backends import jax_decode

        return _apply._cache_size() + jax_decode.prefill._cache_size() + jax_decode.decode._cache_size()

    def _devices(self) -> int:
        return jax.device_count()

    def _convert(self, params: Params) -> JaxWeights:
        float32 = {k: np.asarray(v, dtype=np.float32) for k, v in params.items()}
        graphdef, state = nnx.split(GPT(self.config, float32))
        if self.mesh is not None:
            from gptjax.sharding import shard_state

            state = shard_state(state, self.mesh)
        return JaxWeights(graphdef, state, self.config)

    def _generate(self, weights: JaxWeights, request: GenerationRequest, chunk_size: int | None
                  ) -> Iterator[StreamChunk]:
        """Prefill (its token is the first chunk), then the jitted decode loop: once to the end, or chunk_size
        steps per yielded chunk."""
        Tp = bucket_length(max(len(p) for p in request.prompts), self.config.n_positions)
        S = Tp + bucket_length(request.max_new_tokens, 2**31)
        from gptjax.backends import jax_decode  # the decode loop builds on this module's model

        d, pad, sampling, mode = jax_decode.start(weights, request, Tp, S, self.mesh)
        max_new, sent = np.int32(request.max_new_tokens), np.zeros(request.batch, int)
        step, phase = 1, "prefill"  # the first chunk is prefill's token; then chunk_size decode steps each
        while True:
            if phase == "decode":
                until = request.max_new_tokens if chunk_size is None else min(step + chunk_size, max_new)
                d = jax_decode.decode(weights.graphdef, weights.state, d, pad, sampling, np.int32(until), mode)
            step, done, stopped, lengths = jax.device_get((d.step, d.done, d.stopped, d.lengths))
            first = sent.min()
            out = np.asarray(d.out[: request.batch, first: lengths.max(initial=0)])
            chunk = [out[b, sent[b] - first: lengths[b] - first].tolist() for b in range(request.batch)]
            sent = lengths[: request.batch].copy()
            reasons = [(STOP if stopped[b] else LENGTH) if done[b] else None for b in range(request.batch)]
            yield StreamChunk(chunk, reasons, phase)
            if done[: request.batch].all():
                return
            phase = "decode"

    def _forward(self, weights: JaxWeights, tokens: np.ndarray, last_only: bool) -> np.ndarray:
        B, T = tokens.shape
        padded = np.zeros((B, bucket_length(T, self.config.n_positions)), np.int32)
        padded[:, :T] = tokens
        logits = _apply(weights.graphdef, weights.state, self._place_batch(padded), np.int32(T - 1), last_only)
        return np.asarray(logits if last_only else logits[:, :T])
