"""GPT-2 as a Flax NNX model compiled with jax.jit: the float model, top to bottom (nanoGPT-sized). LayerNorm
statistics, softmax and logits in float32.

Layers are a list of blocks by default: decoding reads each layer's weights and cache buffer directly, which
XLA:CPU does without copies (scanning over stacked [L, ...] weights inside the decode loop made it slice a
copy of every layer's weights per token: 26 vs 43 tokens/s on gpt2). `scan_layers=True` stacks them and runs
`lax.scan` instead, which keeps compile time flat in depth (for training and very deep forward passes).

The weight modules (matmul kernels, the token table, the position lookup) come from a `FloatLayers`: this file's
builds float ones for XLA's dots; the conversion step (convert.py) passes the one built from a run mode's registry
entry (quantised modules in layers.py, matmul formulations in lowp.py, gptjax's CPU kernels where they run), so no
layer here branches on precision or platform. The KV cache is in kv.py.

Every parameter carries logical axis names ("vocab", "embed", "heads", "mlp", "layers", ...) as NNX
`out_sharding` metadata; gptjax.sharding maps them to mesh axes. Legend: B T D H K F V L as in config.py.
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
from gptjax.backends.jax.kv import KVCache, LayerKV, Masks
from gptjax.backends.jax.lowp import table_dot, table_lookup
from gptjax.config import GPTConfig
from gptjax.errors import GptjaxError
from gptjax.weights import Params


def param(value: Any, axes: tuple[str | None, ...]) -> nnx.Param:
    """A parameter tagged with logical axis names (no eager sharding: the mesh is applied later)."""
    return nnx.Param(jnp.asarray(value), out_sharding=axes, eager_sharding=False)


# ---- the weight modules: float kernels [*in, *out] (Conv1D layout, n_out output dims), tables [V, D] -------
class Dense(nnx.Module):
    """A float kernel: x [..., in] -> float32 [..., out]. The input is cast to the kernel's dtype, so a
    bfloat16 kernel multiplies bfloat16 activations, accumulating in float32."""

    def __init__(self, kernel: Any, axes: tuple[str | None, ...], n_out: int = 1, dot: Any = lowp.dot) -> None:
        self.kernel = param(kernel, axes)
        self.n_out = n_out
        self.dot = dot  # x [..., in] @ w [in, out] -> float32: XLA's, or a formulation the conversion step passes

    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.kernel[...]
        w = w.reshape(-1, math.prod(w.shape[-self.n_out:]))  # [in, out]: a 2-D dot (fastest on XLA:CPU)
        return self.dot(x.astype(w.dtype), w)


class Linear(nnx.Module):
    """Conv1D-layout dense layer: x [..., in] @ kernel [in, out] + bias [out], float32 out."""

    def __init__(self, kernel: nnx.Module, bias: Any, axes: tuple[str | None, ...]) -> None:
        self.kernel = kernel
        self.bias = param(bias, axes)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.kernel(x) + self.bias[...]


class Table(nnx.Module):
    """A token table: rows for tokens (__call__), the head x -> float32 logits (attend), and both for a tied model."""

    def tied(self, tokens: jax.Array) -> tuple[jax.Array, Callable[[jax.Array], jax.Array]]:
        """The rows of tokens and the tied head: this module's lookup and attend."""
        return self(tokens), self.attend


class Embedding(Table):
    """A float [V, D] table: rows for token ids, and the (tied) LM head x @ table.T with float32 logits."""

    def __init__(self, table: Any, axes: tuple[str | None, ...], head_dot: Any = None, lookup: Any = None) -> None:
        self.embedding = param(table, axes)
        self.head_dot = head_dot or table_dot  # x [..., D] @ table [V, D].T -> float32 (as Dense.dot)
        self.lookup = lookup or table_lookup  # (table, tokens [...]) -> (float32 rows [..., D], the table for the head)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return self.lookup(self.embedding[...], tokens)[0]  # [...] -> [..., D]

    def attend(self, x: jax.Array) -> jax.Array:
        w = self.embedding[...]  # [V, D]
        return self.head_dot(x.astype(w.dtype), w)

    def tied(self, tokens: jax.Array) -> tuple[jax.Array, Callable[[jax.Array], jax.Array]]:
        """The rows of tokens and the tied head x -> float32 logits, reading the table once: the head reads the
        table the lookup returns (a training lookup returns it so that the head's gradient reaches its own)."""
        rows, w = self.lookup(self.embedding[...], tokens)
        return rows, lambda x: self.head_dot(x.astype(w.dtype), w)


class Positions(nnx.Module):
    """The position lookup: rows of the [P, D] position table as float32, by a table lookup (XLA's gather, or the
    one the conversion step picks for the table's storage: gptjax's CPU kernel reads a bfloat16 table)."""

    def __init__(self, lookup: Any = None) -> None:
        self.lookup = lookup or table_lookup  # (table, ids) -> (float32 rows, the table)

    def __call__(self, table: jax.Array, ids: jax.Array | slice) -> jax.Array:
        return self.lookup(table, ids)[0]  # [...] -> [..., D]


class FloatLayers:
    """How the model builds its weight modules from params: float kernels and tables under XLA's dots. The
    conversion step (convert.py) passes a subclass for other storages or for gptjax's CPU kernels."""

    def dense(self, p: dict[str, Any], key: str, axes: tuple[str | None, ...], shape: tuple[int, ...], n_out: int
              ) -> nnx.Module:
        """The kernel module of p[key] viewed as shape (after any stacked-layer dims)."""
        w = p[key]
        return Dense(w.reshape(*w.shape[:-2], *shape), axes, n_out)

    def embedding(self, p: dict[str, Any], key: str, axes: tuple[str | None, ...]) -> nnx.Module:
        """The [V, D] table module of p[key] (token rows and the tied head)."""
        return Embedding(p[key], axes)

    def positions(self, table: Any) -> nnx.Module:
        """The position lookup over the [P, D] table."""
        return Positions()

    def attention(self) -> Any:
        """The causal self-attention without a cache: qkv [B, T, 3, H, K] -> [B, T, H, K] (XLA's dots)."""
        return causal_attention


class LayerNorm(nnx.Module):
    """LayerNorm whose statistics are computed in float32 whatever the activation dtype."""

    def __init__(self, scale: Any, bias: Any, eps: float, axes: tuple[str | None, ...]) -> None:
        self.scale = param(scale, axes)
        self.bias = param(bias, axes)
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

    def __init__(self, p: dict[str, Any], n_head: int, layer_axes: tuple[str, ...], layers: FloatLayers) -> None:
        D = p["attn.c_attn.bias"].shape[-1] // 3
        H, K = n_head, D // n_head
        qkv_axes = layer_axes + ("embed", None, "heads", "kv")
        self.c_attn = layers.dense(p, "attn.c_attn.weight", qkv_axes, (D, 3, H, K), 3)
        b = p["attn.c_attn.bias"]
        self.qkv_bias = param(b.reshape(*b.shape[:-1], 3, H, K), layer_axes + (None, "heads", "kv"))
        self.c_proj = layers.dense(p, "attn.c_proj.weight", layer_axes + ("heads", "kv", "embed"), (H, K, D), 1)
        self.out_bias = param(p["attn.c_proj.bias"], layer_axes + ("embed",))
        self.causal = layers.attention()  # qkv [B, T, 3, H, K] -> [B, T, H, K]: XLA's dots or a kernel

    def fused_qkv(self, x: jax.Array) -> jax.Array:
        """Queries, keys and values of x [B, T, D] as the projection leaves them: [B, T, 3, H, K]."""
        b = self.qkv_bias[...]  # [3, H, K]
        return (self.c_attn(x) + b.reshape(-1).astype(jnp.float32)).reshape(*x.shape[:2], *b.shape)

    def qkv(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Queries, keys, values [B, H, T, K] of x [B, T, D]."""
        return split_heads(self.fused_qkv(x))

    def project(self, out: jax.Array) -> jax.Array:
        """Heads' outputs [B, T, H, K] -> [B, T, D]."""
        return self.c_proj(out.reshape(*out.shape[:2], -1)) + self.out_bias[...]

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.project(self.causal(self.fused_qkv(x)))

    def cached(self, x: jax.Array, masks: Masks, cache: Any, start: jax.Array) -> tuple[jax.Array, Any]:
        """Attention of new tokens x [B, T, D] over one layer's cache (a LayerKV, [B, H, S, K]) before
        they are added (masks.cache, or nothing for a fresh cache) and over themselves (masks.new), seen as the
        cache will store them; their keys/values are then written at cache index start. Reading the cache
        from before the write keeps the write in place in the loop."""
        q, k, v = self.qkv(x)
        new = cache.stored(k, v)  # quantised (or rounded) once: attended to now, written below
        parts = [(new, masks.new)] if masks.cache is None else [(cache, masks.cache), (new, masks.new)]
        out = self.project(attend(q, parts))
        return out, cache.write(new, start + zero_after(out))


def split_heads(qkv: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """qkv [B, T, 3, H, K] -> queries, keys, values [B, H, T, K]."""
    qkv = qkv.transpose(2, 0, 3, 1, 4)  # [3, B, H, T, K]
    return qkv[0], qkv[1], qkv[2]


def attend(q: jax.Array, parts: list[tuple[Any, jax.Array]]) -> jax.Array:
    """Attention of q [B, H, T, K] over one softmax spanning every (keys/values, mask [B or 1, T, S_i]) part:
    [B, T, H, K]. Keys/values (LayerKV, [B, H, S_i, K]) compute their own scores and weighted sums,
    reading the cache's layout without a transpose."""
    scale = 1 / np.sqrt(q.shape[-1])
    scores = [jnp.where(m[:, None], kv.scores(q) * scale, jnp.finfo(jnp.float32).min)
              for kv, m in parts]  # [B, H, T, S_i] each
    probs = jax.nn.softmax(jnp.concatenate(scores, axis=-1), axis=-1)  # [B, H, T, sum S_i]
    splits = np.cumsum([kv.k.shape[2] for kv, _ in parts])[:-1]  # S_i of each part's keys [B, H, S_i, K]
    return sum(kv.mix(p) for p, (kv, _) in zip(jnp.split(probs, splits, axis=-1), parts))  # [B, T, H, K]


def causal_attention(qkv: jax.Array) -> jax.Array:
    """Causal self-attention of qkv [B, T, 3, H, K] (no cache) with XLA's dots: [B, T, H, K]."""
    q, k, v = split_heads(qkv)
    T = q.shape[2]
    return attend(q, [(LayerKV(k, v), jnp.tril(jnp.ones((1, T, T), dtype=bool)))])  # causal [1, T, T]


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


class MLP(nnx.Module):
    """Feed-forward network with tanh GELU."""

    def __init__(self, p: dict[str, Any], layer_axes: tuple[str, ...], layers: FloatLayers) -> None:
        D, F = p["mlp.c_fc.weight"].shape[-2:]
        self.c_fc = Linear(layers.dense(p, "mlp.c_fc.weight", layer_axes + ("embed", "mlp"), (D, F), 1),
                           p["mlp.c_fc.bias"], layer_axes + ("mlp",))
        self.c_proj = Linear(layers.dense(p, "mlp.c_proj.weight", layer_axes + ("mlp", "embed"), (F, D), 1),
                             p["mlp.c_proj.bias"], layer_axes + ("embed",))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.c_proj(jax.nn.gelu(self.c_fc(x), approximate=True))  # [B, T, D] -> [B, T, F] -> [B, T, D]


class Block(nnx.Module):
    """Pre-LayerNorm transformer block. Built with stacked [L, ...] weights; called on one layer's slice."""

    def __init__(self, p: dict[str, Any], n_head: int, eps: float, layer_axes: tuple[str, ...],
                 layers: FloatLayers) -> None:
        self.ln_1 = LayerNorm(p["ln_1.weight"], p["ln_1.bias"], eps, layer_axes + ("embed",))
        self.attn = Attention(p, n_head, layer_axes, layers)
        self.ln_2 = LayerNorm(p["ln_2.weight"], p["ln_2.bias"], eps, layer_axes + ("embed",))
        self.mlp = MLP(p, layer_axes, layers)

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
                 layers: FloatLayers = FloatLayers()) -> None:
        """Built from canonical params; `layers` builds the weight modules (the float ones by default; the
        conversion step passes those of the params' storage)."""
        c = config
        layer = [{k.removeprefix(f"h.{i}."): v for k, v in params.items() if k.startswith(f"h.{i}.")}
                 for i in range(c.n_layer)]
        self.wte = layers.embedding(params, "wte.weight", ("vocab", "embed"))  # [V, D]
        self.wpe = param(params["wpe.weight"], ("length", "embed"))  # [P, D]
        self.positions = layers.positions(params["wpe.weight"])
        if scan_layers:
            stacked = {k: np.stack([p[k] for p in layer]) for k in layer[0]}  # [L, ...]
            self.blocks = Block(stacked, c.n_head, c.layer_norm_epsilon, ("layers",), layers)
        else:
            self.blocks = nnx.List([Block(p, c.n_head, c.layer_norm_epsilon, (), layers) for p in layer])
        self.scan_layers = scan_layers
        self.ln_f = LayerNorm(params["ln_f.weight"], params["ln_f.bias"], c.layer_norm_epsilon, ("embed",))
        untied = "lm_head.weight" in params
        self.lm_head = layers.embedding(params, "lm_head.weight", ("vocab", "embed")) if untied else None  # [V, D]

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
        rows, head = self.wte.tied(tokens) if self.lm_head is None else (self.wte(tokens), self.lm_head.attend)
        x = rows + self.positions(self.wpe[...], slice(0, T))  # [B, T] -> [B, T, D] float32
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
        return head(self.ln_f(x))  # as self.logits(x)

    def logits(self, x: jax.Array) -> jax.Array:
        """Final LayerNorm and the (tied) head: [..., D] -> float32 [..., V]."""
        head = self.wte if self.lm_head is None else self.lm_head  # [V, D]
        return head.attend(self.ln_f(x))

    def step(self, tokens: jax.Array, positions: jax.Array, masks: Masks, cache: KVCache, start: jax.Array
             ) -> tuple[jax.Array, KVCache]:
        """Run new tokens [B, T] at positions [B, T] against the cache, writing their keys/values at cache
        index start; masks say which cache entries and new tokens each query reads. Returns the last
        position's logits [B, V] and the updated cache."""
        x = self.wte(tokens) + self.positions(self.wpe[...], positions)  # [B, T] -> [B, T, D] float32
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
