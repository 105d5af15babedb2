"""GPT-2 as a Flax NNX model compiled with jax.jit; LayerNorm statistics, softmax and logits in float32.

Layers are a list of blocks by default: decoding reads each layer's weights and cache buffer directly, which
XLA:CPU does without copies (scanning over stacked [L, ...] weights inside the decode loop made it slice a
copy of every layer's weights per token: 26 vs 43 tokens/s on gpt2). `scan_layers=True` stacks them and runs
`lax.scan` instead, which keeps compile time flat in depth (for training and very deep forward passes).

Every parameter carries logical axis names ("vocab", "embed", "heads", "mlp", "layers", ...) as NNX
`out_sharding` metadata; gptjax.sharding maps them to mesh axes. Legend: B T D H K F V L as in config.py.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptjax.backends import cpu_kernels, lowp
from gptjax.backends.base import PRECISION_OPTIONS, Backend
from gptjax.config import GPTConfig
from gptjax.errors import GptjaxError
from gptjax.generate import LENGTH, STOP, GenerationRequest, StreamChunk
from gptjax.quantize import SCALE_SUFFIX
from gptjax.weights import Params


def _param(value: Any, axes: tuple[str | None, ...]) -> nnx.Param:
    """A parameter tagged with logical axis names (no eager sharding: the mesh is applied later)."""
    return nnx.Param(jnp.asarray(value), out_sharding=axes, eager_sharding=False)


# ---- matmul weights in each precision. The conversion step (gptjax.quantize) decides what the params hold; the
# model builds the matching module once (float kernel, int8 weight-only, or int8 with int8 activations), so no
# layer branches on precision. Every kernel is stored [*in, *out] (Conv1D layout) with n_out output dims.
class Dense(nnx.Module):
    """A float kernel: x [..., in] -> float32 [..., out]. The input is cast to the kernel's dtype, so a
    bfloat16 kernel multiplies bfloat16 activations, accumulating in float32."""

    def __init__(self, kernel: Any, axes: tuple[str | None, ...], n_out: int = 1) -> None:
        self.kernel = _param(kernel, axes)
        self.n_out = n_out

    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.kernel[...]
        w = w.reshape(-1, math.prod(w.shape[-self.n_out:]))  # [in, out]: a 2-D dot (fastest on XLA:CPU)
        return lowp.dot(x.astype(w.dtype), w)


class Int8Dense(nnx.Module):
    """An int8 kernel with float32 scales [G, *out] (one per output channel and group of in/G inputs),
    weight-only: the int8 values travel from memory and are dequantised inside the jitted matmul."""

    def __init__(self, q: Any, scale: Any, axes: tuple[str | None, ...], n_out: int = 1) -> None:
        lead = np.ndim(scale) - 1 - n_out  # stacked layers
        self.kernel = _param(q, axes)
        self.scale = _param(scale, (*axes[:lead], None, *axes[-n_out:]))
        self.n_out = n_out

    def __call__(self, x: jax.Array) -> jax.Array:
        q, s = self.kernel[...], self.scale[...]
        G, out = s.shape[0], math.prod(s.shape[1:])
        return self.matmul(x.astype(jnp.float32), q.reshape(G, -1, out), s.reshape(G, out))

    matmul = staticmethod(lowp.int8_matmul)


class W8A8Dense(Int8Dense):
    """The same int8 kernel with dynamically quantised activations (int8 per token, int8 x int8 -> int32)."""

    matmul = staticmethod(lowp.w8a8_matmul)


class OutMajorDense(nnx.Module):
    """A bfloat16 kernel stored out-major [out, in] for gptjax's CPU kernels (gptjax.backends.cpu_kernels): one
    pass over its bytes per call, where XLA:CPU would convert it to float32 first. x [..., in] -> [..., out]."""

    def __init__(self, kernel: Any, n_out: int = 1) -> None:
        self.kernel = _param(_out_major(kernel, n_out), (None, None))  # only used without a mesh

    def __call__(self, x: jax.Array) -> jax.Array:
        return cpu_kernels.bf16_matmul(x, self.kernel[...])


class OutMajorInt8Dense(nnx.Module):
    """An int8 kernel stored out-major [out, in] with scales [out, G], for gptjax's CPU kernels; weight-only
    (float activations as two int8 terms, as int8_matmul on CPU: per channel, the same numbers)."""

    def __init__(self, q: Any, scale: Any, n_out: int = 1) -> None:
        self.kernel = _param(_out_major(q, n_out), (None, None))
        self.scale = _param(_out_major(scale, n_out), (None, None))  # [G, *out] -> [out, G]

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.matmul(x.astype(jnp.float32), self.kernel[...], self.scale[...])

    matmul = staticmethod(lowp.int8_matmul_nk)


class OutMajorW8A8Dense(OutMajorInt8Dense):
    """The same out-major int8 kernel with dynamically quantised activations (as W8A8Dense: the same numbers)."""

    matmul = staticmethod(lowp.w8a8_matmul_nk)


def rows(table: jax.Array, ids: Any, kernels: bool = False) -> jax.Array:
    """table[ids] in float32. XLA:CPU gathers a bfloat16 table from a float32 copy of all of it, which it hoists
    out of the decode loop (gpt2's wte: 150 MB written, about 40 ms, per decode call; one-token stream chunks
    took 48 ms instead of 8), so with gptjax's CPU kernels those rows come from a kernel instead."""
    if kernels and table.dtype == jnp.bfloat16:
        return cpu_kernels.bf16_rows(table, jnp.arange(*ids.indices(len(table))) if isinstance(ids, slice) else ids)
    return table[ids].astype(jnp.float32)


def _out_major(w: Any, n_out: int) -> np.ndarray:
    """A [*in, *out] kernel as a contiguous [out, in] matrix."""
    w = np.asarray(w)
    return np.ascontiguousarray(w.reshape(-1, math.prod(w.shape[-n_out:])).T)


class Linear(nnx.Module):
    """Conv1D-layout dense layer: x [..., in] @ kernel [in, out] + bias [out], float32 out."""

    def __init__(self, kernel: Dense | Int8Dense, bias: Any, axes: tuple[str | None, ...]) -> None:
        self.kernel = kernel
        self.bias = _param(bias, axes)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.kernel(x) + self.bias[...]


class Embedding(nnx.Module):
    """A float [V, D] table: rows for token ids, and the (tied) LM head x @ table.T with float32 logits."""

    def __init__(self, table: Any, axes: tuple[str | None, ...]) -> None:
        self.embedding = _param(table, axes)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return self.embedding[...][tokens].astype(jnp.float32)  # [...] -> [..., D]

    def attend(self, x: jax.Array) -> jax.Array:
        w = self.embedding[...]  # [V, D]
        return jnp.einsum("...d,vd->...v", x.astype(w.dtype), w, preferred_element_type=jnp.float32)


class KernelEmbedding(Embedding):
    """A bfloat16 [V, D] table (already out-major for the head) whose tied head runs gptjax's CPU bf16 kernel."""

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return rows(self.embedding[...], tokens, kernels=True)

    def attend(self, x: jax.Array) -> jax.Array:
        return cpu_kernels.bf16_matmul(x, self.embedding[...])


class Int8Embedding(nnx.Module):
    """An int8 [V, D] table with float32 scales [V, G] (per row and group of D/G columns)."""

    def __init__(self, q: Any, scale: Any, axes: tuple[str | None, ...]) -> None:
        self.embedding = _param(q, axes)
        self.scale = _param(np.reshape(scale, (np.shape(q)[0], -1)), (axes[0], None))

    def __call__(self, tokens: jax.Array) -> jax.Array:
        q, s = self.embedding[...], self.scale[...]
        rows = q[tokens].astype(jnp.float32)  # [..., D]
        return (rows.reshape(*rows.shape[:-1], s.shape[1], -1) * s[tokens][..., None]).reshape(rows.shape)

    def attend(self, x: jax.Array) -> jax.Array:
        q, s = self.embedding[...], self.scale[...]
        return lowp.int8_matmul_t(x.astype(jnp.float32), q, s)  # [..., D] -> [..., V]


class KernelInt8Embedding(Int8Embedding):
    """An int8 [V, D] table whose tied head runs gptjax's CPU int8 kernels (weight-only, two int8 terms)."""

    def attend(self, x: jax.Array) -> jax.Array:
        return lowp.int8_matmul_nk(x.astype(jnp.float32), self.embedding[...], self.scale[...])


class Formulation(NamedTuple):
    """How the matmuls run, chosen once per backend (JaxBackend.formulation): int8 activations (w8a8), and
    gptjax's CPU kernels (one device) over out-major int8 and bfloat16 weights (unstacked layers) and over
    int8 / bfloat16 KV caches during decode."""

    w8a8: bool = False
    cpu_kernels: bool = False


def _dense(p: dict[str, Any], key: str, axes: tuple[str | None, ...], shape: tuple[int, ...], n_out: int,
           how: Formulation) -> nnx.Module:
    """The kernel module for what the converted params hold under key (a scale marks an int8 weight)."""
    w = p[key]
    lead = w.shape[:-2]  # stacked layers
    kernels = how.cpu_kernels and not lead
    if key + SCALE_SUFFIX in p:
        scale = p[key + SCALE_SUFFIX].reshape(*lead, -1, *shape[-n_out:])  # [*lead, G, *out]
        if kernels:
            return (OutMajorW8A8Dense if how.w8a8 else OutMajorInt8Dense)(w.reshape(shape), scale, n_out)
        return (W8A8Dense if how.w8a8 else Int8Dense)(w.reshape(*lead, *shape), scale, axes, n_out)
    if kernels and w.dtype.name == "bfloat16":
        return OutMajorDense(w.reshape(shape), n_out)
    return Dense(w.reshape(*lead, *shape), axes, n_out)


def _embedding(p: dict[str, Any], key: str, axes: tuple[str | None, ...], how: Formulation) -> nnx.Module:
    w = p[key]
    if key + SCALE_SUFFIX in p:
        return (KernelInt8Embedding if how.cpu_kernels else Int8Embedding)(w, p[key + SCALE_SUFFIX], axes)
    return (KernelEmbedding if how.cpu_kernels and w.dtype.name == "bfloat16" else Embedding)(w, axes)


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
    """Multi-head causal self-attention; scores, softmax and the weighted sum in float32.

    The Conv1D kernels are viewed split by head ([D, 3, H, K] in, [H, K, D] out) so that tensor
    parallelism can shard the "heads" axis directly.
    """

    def __init__(self, p: dict[str, Any], n_head: int, layer_axes: tuple[str, ...], how: Formulation = Formulation()
                 ) -> None:
        D = p["attn.c_attn.bias"].shape[-1] // 3
        H, K = n_head, D // n_head
        self.c_attn = _dense(p, "attn.c_attn.weight", layer_axes + ("embed", None, "heads", "kv"), (D, 3, H, K), 3, how)
        b = p["attn.c_attn.bias"]
        self.qkv_bias = _param(b.reshape(*b.shape[:-1], 3, H, K), layer_axes + (None, "heads", "kv"))
        self.c_proj = _dense(p, "attn.c_proj.weight", layer_axes + ("heads", "kv", "embed"), (H, K, D), 1, how)
        self.out_bias = _param(p["attn.c_proj.bias"], layer_axes + ("embed",))
        self.kernels = how.cpu_kernels  # a reduced-precision cache is read by gptjax's CPU kernels

    def qkv(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Queries, keys, values [B, H, T, K] of x [B, T, D]."""
        B, T, D = x.shape
        b = self.qkv_bias[...]  # [3, H, K]
        qkv = self.c_attn(x) + b.reshape(-1).astype(jnp.float32)  # [B, T, 3D]
        qkv = qkv.reshape(B, T, *b.shape).transpose(2, 0, 3, 1, 4)  # [B, T, 3D] -> [3, B, H, T, K]
        return qkv[0], qkv[1], qkv[2]

    def attend(self, q: jax.Array, parts: list[tuple[Any, jax.Array]]) -> jax.Array:
        """Attention of q [B, H, T, K] over one softmax spanning every (keys/values, mask [B or 1, T, S_i])
        part, projected out to [B, T, D]. Keys/values (FloatKV or Int8KV, [B, H, S_i, K]) compute their own
        scores and weighted sums, reading the cache's layout without a transpose."""
        scale = 1 / np.sqrt(q.shape[-1])
        scores = [jnp.where(m[:, None], kv.scores(q, self.kernels) * scale, jnp.finfo(jnp.float32).min)
                  for kv, m in parts]  # [B, H, T, S_i] each
        probs = jax.nn.softmax(jnp.concatenate(scores, axis=-1), axis=-1)  # [B, H, T, sum S_i]
        splits = np.cumsum([kv.length for kv, _ in parts])[:-1]
        out = sum(kv.mix(p, self.kernels) for p, (kv, _) in zip(jnp.split(probs, splits, axis=-1), parts))  # [B,T,H,K]
        return self.c_proj(out.reshape(*out.shape[:2], -1)) + self.out_bias[...]  # -> [B, T, D]

    def __call__(self, x: jax.Array) -> jax.Array:
        T = x.shape[1]
        q, k, v = self.qkv(x)
        return self.attend(q, [(FloatKV(k, v), jnp.tril(jnp.ones((1, T, T), dtype=bool)))])  # causal [1, T, T]

    def cached(self, x: jax.Array, masks: Masks, cache: Any, start: jax.Array) -> tuple[jax.Array, Any]:
        """Attention of new tokens x [B, T, D] over one layer's cache (FloatKV or Int8KV, [B, H, S, K]) before
        they are added (masks.cache, or nothing for a fresh cache) and over themselves (masks.new), seen as the
        cache will store them; their keys/values are then written at cache index start. Reading the cache
        from before the write keeps the write in place in the loop."""
        q, k, v = self.qkv(x)
        new = cache.stored(k, v)  # quantised (or rounded) once: attended to now, written below
        parts = [(new, masks.new)] if masks.cache is None else [(cache, masks.cache), (new, masks.new)]
        out = self.attend(q, parts)
        return out, cache.write(new, start + zero_after(out))


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

    def __init__(self, p: dict[str, Any], layer_axes: tuple[str, ...], how: Formulation = Formulation()) -> None:
        D, F = p["mlp.c_fc.weight"].shape[-2:]
        self.c_fc = Linear(_dense(p, "mlp.c_fc.weight", layer_axes + ("embed", "mlp"), (D, F), 1, how),
                           p["mlp.c_fc.bias"], layer_axes + ("mlp",))
        self.c_proj = Linear(_dense(p, "mlp.c_proj.weight", layer_axes + ("mlp", "embed"), (F, D), 1, how),
                             p["mlp.c_proj.bias"], layer_axes + ("embed",))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.c_proj(jax.nn.gelu(self.c_fc(x), approximate=True))  # [B, T, D] -> [B, T, F] -> [B, T, D]


class Block(nnx.Module):
    """Pre-LayerNorm transformer block. Built with stacked [L, ...] weights; called on one layer's slice."""

    def __init__(self, p: dict[str, Any], n_head: int, eps: float, layer_axes: tuple[str, ...] = (),
                 how: Formulation = Formulation()) -> None:
        self.ln_1 = LayerNorm(p["ln_1.weight"], p["ln_1.bias"], eps, layer_axes + ("embed",))
        self.attn = Attention(p, n_head, layer_axes, how)
        self.ln_2 = LayerNorm(p["ln_2.weight"], p["ln_2.bias"], eps, layer_axes + ("embed",))
        self.mlp = MLP(p, layer_axes, how)

    def __call__(self, x: jax.Array, dropout: float = 0.0, key: jax.Array | None = None) -> jax.Array:
        """x [B, T, D] -> [B, T, D]; with a key, dropout on each residual branch (training only)."""
        k1, k2 = (None, None) if key is None else jax.random.split(key)
        x = x + _dropout(self.attn(self.ln_1(x)), dropout, k1)  # [B, T, D]
        return x + _dropout(self.mlp(self.ln_2(x)), dropout, k2)  # [B, T, D]

    def cached(self, x: jax.Array, masks: Masks, cache: Any, start: jax.Array) -> tuple[jax.Array, Any]:
        """The block over new tokens x [B, T, D] whose keys/values go into the layer's cache at start."""
        a, cache = self.attn.cached(self.ln_1(x), masks, cache, start)
        x = x + a  # [B, T, D]
        return x + self.mlp(self.ln_2(x)), cache


class GPT(nnx.Module):
    """GPT-2: token + position embeddings, L pre-LN blocks, final LayerNorm, tied (or separate) head."""

    def __init__(self, config: GPTConfig, params: Params, *, scan_layers: bool = False,
                 how: Formulation = Formulation()) -> None:
        """Built from canonical params as gptjax.quantize left them (float32, bfloat16, or int8 matmul weights
        with `<key>_scale`); `how` says how the matmuls run (Formulation)."""
        c = config
        layer = [{k.removeprefix(f"h.{i}."): v for k, v in params.items() if k.startswith(f"h.{i}.")}
                 for i in range(c.n_layer)]
        self.wte = _embedding(params, "wte.weight", ("vocab", "embed"), how)  # [V, D]
        self.wpe = _param(params["wpe.weight"], ("length", "embed"))  # [P, D]
        self.cpu_kernels = how.cpu_kernels
        if scan_layers:
            stacked = {k: np.stack([p[k] for p in layer]) for k in layer[0]}  # [L, ...]
            self.blocks = Block(stacked, c.n_head, c.layer_norm_epsilon, ("layers",), how)
        else:
            self.blocks = nnx.List([Block(p, c.n_head, c.layer_norm_epsilon, (), how) for p in layer])
        self.scan_layers = scan_layers
        self.ln_f = LayerNorm(params["ln_f.weight"], params["ln_f.bias"], c.layer_norm_epsilon, ("embed",))
        untied = "lm_head.weight" in params
        self.lm_head = _embedding(params, "lm_head.weight", ("vocab", "embed"), how) if untied else None  # [V, D]

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
        x = self.wte(tokens) + rows(self.wpe[...], slice(0, T), self.cpu_kernels)  # [B, T] -> [B, T, D] float32
        x = _dropout(x, dropout, keys[0])
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
        head = self.wte if self.lm_head is None else self.lm_head  # [V, D]
        return head.attend(self.ln_f(x))

    def step(self, tokens: jax.Array, positions: jax.Array, masks: Masks, cache: KVCache, start: jax.Array
             ) -> tuple[jax.Array, KVCache]:
        """Run new tokens [B, T] at positions [B, T] against the cache, writing their keys/values at cache
        index start; masks say which cache entries and new tokens each query reads. Returns the last
        position's logits [B, V] and the updated cache."""
        x = self.wte(tokens) + rows(self.wpe[...], positions, self.cpu_kernels)  # [B, T] -> [B, T, D] float32
        layers = []
        for block, layer in zip(self.layers(), cache.layers):
            x, layer = block.cached(x, masks, layer, start)  # [B, T, D]; cache [B, H, S, K]
            layers.append(layer)
        return self.logits(x[:, -1]), KVCache(tuple(layers))


def to_params(model: GPT) -> Params:
    """The canonical GPT-2 dict (NumPy float32, Conv1D layouts) of a model, stacked or not: the inverse of
    GPT(config, params) for float weights in XLA's layout (an int8 or out-major model cannot be exported)."""
    dense = [m for b in model.layers() for m in (b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc.kernel, b.mlp.c_proj.kernel)]
    tables = [model.wte] + ([model.lm_head] if model.lm_head is not None else [])
    if any(type(m) is not Dense for m in dense) or any(type(t) is not Embedding for t in tables):
        raise GptjaxError("to_params exports float models built in XLA's layout (not int8 or out-major ones)")
    params = {"wte.weight": model.wte.embedding[...], "wpe.weight": model.wpe[...],
              "ln_f.weight": model.ln_f.scale[...], "ln_f.bias": model.ln_f.bias[...]}
    if model.lm_head is not None:
        params["lm_head.weight"] = model.lm_head.embedding[...]
    for i, block in enumerate(model.layers()):
        a = block.attn
        D = a.out_bias.shape[0]
        params |= {f"h.{i}.{k}": v for k, v in {
            "ln_1.weight": block.ln_1.scale[...], "ln_1.bias": block.ln_1.bias[...],
            "attn.c_attn.weight": a.c_attn.kernel[...].reshape(D, -1), "attn.c_attn.bias": a.qkv_bias[...].reshape(-1),
            "attn.c_proj.weight": a.c_proj.kernel[...].reshape(-1, D), "attn.c_proj.bias": a.out_bias[...],
            "ln_2.weight": block.ln_2.scale[...], "ln_2.bias": block.ln_2.bias[...],
            "mlp.c_fc.weight": block.mlp.c_fc.kernel.kernel[...], "mlp.c_fc.bias": block.mlp.c_fc.bias[...],
            "mlp.c_proj.weight": block.mlp.c_proj.kernel.kernel[...], "mlp.c_proj.bias": block.mlp.c_proj.bias[...],
        }.items()}
    return {k: np.asarray(v, dtype=np.float32) for k, v in params.items()}


class FloatKV(NamedTuple):
    """One layer's keys and values [B, H, S, K] in a float dtype (float32 or bfloat16)."""

    k: jax.Array
    v: jax.Array

    @property
    def length(self) -> int:
        """S, the entries per row."""
        return self.k.shape[2]

    @classmethod
    def zeros(cls, shape: tuple[int, ...], dtype: Any) -> FloatKV:
        """An empty layer cache."""
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    def scores(self, q: jax.Array, kernels: bool = False) -> jax.Array:
        """q [B, H, T, K] . keys -> float32 [B, H, T, S] (XLA's dot; `kernels` concerns the stored caches)."""
        return jnp.einsum("bhtk,bhsk->bhts", q, self.k.astype(jnp.float32))

    def mix(self, p: jax.Array, kernels: bool = False) -> jax.Array:
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

    @property
    def length(self) -> int:
        """S, the entries per row."""
        return self.k.shape[2]

    @classmethod
    def zeros(cls, shape: tuple[int, ...], dtype: Any = None) -> Int8KV:
        """An empty layer cache."""
        return cls(jnp.zeros(shape, jnp.int8), jnp.zeros(shape, jnp.int8), jnp.ones(shape[:3], jnp.float32),
                   jnp.ones(shape[:3], jnp.float32))

    def scores(self, q: jax.Array, kernels: bool = False) -> jax.Array:
        """q [B, H, T, K] . keys -> float32 [B, H, T, S] (the key scales applied after the dot)."""
        if _cache_kernels(kernels, q):
            return cpu_kernels.kv_scores(q, self.k) * self.k_scale[:, :, None]
        return jnp.einsum("bhtk,bhsk->bhts", q, self.k.astype(jnp.float32)) * self.k_scale[:, :, None]

    def mix(self, p: jax.Array, kernels: bool = False) -> jax.Array:
        """Probabilities [B, H, T, S] . values -> float32 [B, T, H, K] (value scales folded into p)."""
        if _cache_kernels(kernels, p):
            return cpu_kernels.kv_mix(p * self.v_scale[:, :, None], self.v).transpose(0, 2, 1, 3)
        return jnp.einsum("bhts,bhsk->bthk", p * self.v_scale[:, :, None], self.v.astype(jnp.float32))

    def stored(self, k: jax.Array, v: jax.Array) -> Int8KV:
        """New keys/values [B, H, T, K] quantised as this cache holds them."""
        (kq, ks), (vq, vs) = lowp.quantize_rows(k), lowp.quantize_rows(v)
        return Int8KV(kq, vq, ks[..., 0], vs[..., 0])

    def write(self, new: Int8KV, start: jax.Array) -> Int8KV:
        """The cache with new entries (from stored(): int8 [B, H, T, K], scales [B, H, T]) written at start."""
        return Int8KV(*(jax.lax.dynamic_update_slice_in_dim(old, part, start, axis=2) for old, part in zip(self, new)))


class Bf16KV(FloatKV):
    """One layer's bfloat16 keys and values [B, H, S, K], held as their uint16 bit patterns: XLA:CPU writes into
    a bfloat16 buffer through a float32 copy of all of it, every decode step (gpt2, B=8, 480 cached tokens,
    XLA's dots: 56.2 vs 48.5 ms per step), while an integer buffer is updated in place. Read and written as
    bfloat16 (read by gptjax's CPU kernels where available)."""

    @classmethod
    def zeros(cls, shape: tuple[int, ...], dtype: Any = None) -> Bf16KV:
        """An empty layer cache."""
        return cls(jnp.zeros(shape, jnp.uint16), jnp.zeros(shape, jnp.uint16))

    def scores(self, q: jax.Array, kernels: bool = False) -> jax.Array:
        """q [B, H, T, K] . keys -> float32 [B, H, T, S]."""
        if _cache_kernels(kernels, q):
            return cpu_kernels.kv_scores(q, self.k)
        return FloatKV(_from_bits(self.k), self.v).scores(q)

    def mix(self, p: jax.Array, kernels: bool = False) -> jax.Array:
        """Probabilities [B, H, T, S] . values -> float32 [B, T, H, K]."""
        if _cache_kernels(kernels, p):
            return cpu_kernels.kv_mix(p, self.v).transpose(0, 2, 1, 3)
        return FloatKV(self.k, _from_bits(self.v)).mix(p)

    def stored(self, k: jax.Array, v: jax.Array) -> Bf16KV:
        """New keys/values [B, H, T, K] rounded to bfloat16, as bits."""
        return Bf16KV(*(jax.lax.bitcast_convert_type(a.astype(jnp.bfloat16), jnp.uint16) for a in (k, v)))

    def write(self, new: Bf16KV, start: jax.Array) -> Bf16KV:
        """The cache with new entries (from stored()) written at index start."""
        return Bf16KV(*FloatKV.write(self, new, start))


KERNEL_QUERIES = 8  # up to this many new tokens per row, gptjax's CPU kernels read an int8/bf16 cache (decode)


def _cache_kernels(kernels: bool, a: jax.Array) -> bool:
    """Whether attention over a stored int8/bf16 cache runs on gptjax's CPU kernels: few queries (a decode
    step: XLA converts the whole cache to float32 before its dots, every step); prefill keeps XLA's dots."""
    return kernels and a.shape[2] <= KERNEL_QUERIES


def _from_bits(bits: jax.Array) -> jax.Array:
    return jax.lax.bitcast_convert_type(bits, jnp.bfloat16)


KV_CACHES = {"fp32": (FloatKV, jnp.float32), "bf16": (Bf16KV, None), "int8": (Int8KV, None)}


class KVCache(NamedTuple):
    """The decode cache: one layer cache (FloatKV or Int8KV, [B, H, S, K]) per layer; passed in and returned,
    never hidden state. Separate buffers (not one [L, ...] array) let XLA update each in place in the loop."""

    layers: tuple[Any, ...]

    @classmethod
    def zeros(cls, config: GPTConfig, batch: int, length: int, kind: str = "fp32") -> KVCache:
        """An empty cache of S=length entries per row, stored as kind (fp32, bf16 or int8)."""
        layer_cls, dtype = KV_CACHES[kind]
        shape = (batch, config.n_head, length, config.head_dim)
        return cls(tuple(layer_cls.zeros(shape, dtype) for _ in range(config.n_layer)))

    @property
    def length(self) -> int:
        """S, the entries per row."""
        return self.layers[0].length


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


def _is_lowp(a: Any) -> bool:
    """bfloat16 or int8 arrays: kept as the conversion step stored them."""
    return np.asarray(a).dtype.name in ("bfloat16", "int8")


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
    options = {"mesh": (), **PRECISION_OPTIONS}

    def __init__(self, config: GPTConfig, *, metrics: Any = None, trace_sync: bool = True, **options: Any) -> None:
        super().__init__(config, metrics=metrics, trace_sync=trace_sync, **options)
        self.mesh = options.get("mesh")
        if self.mesh is not None:
            from gptjax.sharding import check_config

            check_config(config, self.mesh)

    def span_attributes(self, phase: str, batch: int, seq_len: int) -> dict[str, Any]:
        """Backend.span_attributes plus the mesh's description."""
        from gptjax.sharding import mesh_description

        return super().span_attributes(phase, batch, seq_len) | {"gptjax.mesh": mesh_description(self.mesh)}

    @property
    def supports_sessions(self) -> bool:
        """Decode sessions are built for one device: with a mesh the server batches dynamically."""
        return self.mesh is None

    def open_session(self, weights: JaxWeights, requests: Any, owners: Any, *, slots: int, headroom: int) -> Any:
        """A gptjax.backends.jax_session.DecodeSession (see Backend.open_session)."""
        if not self.supports_sessions:
            raise GptjaxError("decode sessions (continuous batching) need the jax backend without a mesh")
        from gptjax.backends.jax_session import DecodeSession  # session builds on this module: imported on use

        return DecodeSession(self, weights, requests, owners, slots=slots, headroom=headroom)

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
        kept = {k: np.asarray(v) if _is_lowp(v) else np.asarray(v, np.float32) for k, v in params.items()}
        graphdef, state = nnx.split(GPT(self.config, kept, how=self.formulation()))
        if self.mesh is not None:
            from gptjax.sharding import shard_state

            state = shard_state(state, self.mesh)
        return JaxWeights(graphdef, state, self.config)

    def formulation(self) -> Formulation:
        """gptjax's CPU kernels (cpu_kernels.status()) for int8/bf16 weights and caches on one CPU device, else
        XLA's dots."""
        kernels = self.mesh is None and cpu_kernels.available()  # fp32 weights keep XLA's dots either way
        return Formulation(w8a8=self.precision == "w8a8", cpu_kernels=kernels)

    def _generate(self, weights: JaxWeights, request: GenerationRequest, chunk_size: int | None
                  ) -> Iterator[StreamChunk]:
        """Prefill (its token is the first chunk), then the jitted decode loop: once to the end, or chunk_size
        steps per yielded chunk."""
        Tp = bucket_length(max(len(p) for p in request.prompts), self.config.n_positions)
        S = Tp + bucket_length(request.max_new_tokens, 2**31)
        from gptjax.backends import jax_decode  # the decode loop builds on this module's model

        d, pad, sampling, mode = jax_decode.start(weights, request, Tp, S, self.mesh, self.kv_cache)
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
