"""Jitted generation for the JAX backend: prefill, a `lax.while_loop` decode over chunks of steps, and the
sampling rules of gptjax.generate implemented on device.

Penalties and logit bias cost [B, V] arrays (the bias row, and each row's counts of generated tokens): they exist
only when some row uses them (or a session may admit such a row), as Sampling.bias and DecodeState.counts;
otherwise those are None and the compiled loop is the one without them.

Shapes are bucketed so a mixed workload compiles rarely: batch to a power of two, prompt length Tp and
cache length S with `bucket_length`; sampling settings and max_new_tokens are traced values, so only
(B, Tp, S, sampling mode greedy | sample | filter) select a compilation of each of the two functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptjax.backends.jax.kv import KVCache, Masks
from gptjax.config import GPTConfig
from gptjax.generate import GenerationRequest, RowSettings, bias_row, left_pad
from gptjax.sharding import cache_sharding, shard_batch


def bucket_length(T: int, n_positions: int) -> int:
    """Pad lengths to few shapes (powers of two up to 64, then multiples of 64) so jit compiles rarely."""
    bucket = 1 << max(3, (T - 1).bit_length()) if T <= 64 else -(-T // 64) * 64
    return min(bucket, n_positions)


class Sampling(NamedTuple):
    """Per-row sampling settings as device arrays (so changing them never recompiles)."""

    temperature: jax.Array  # [B] float32, 0 = greedy
    top_k: jax.Array  # [B] int32, V = off
    top_p: jax.Array  # [B] float32, 1 = off
    stop: jax.Array  # [B, n] int32 stop tokens per row, -1 padded
    # the decode loop's per-row budget and random stream (sample() alone needs none of them)
    max_new: jax.Array | None = None  # [B] int32 tokens each row may add
    seed: jax.Array | None = None  # [B] uint32 each row's seed ...
    key_index: jax.Array | None = None  # [B] int32 ... and stream: its key is fold_in(key(seed), key_index)
    # logit adjustments (None when no row uses them): penalties on generated tokens, and a bias
    presence: jax.Array | None = None  # [B] float32
    frequency: jax.Array | None = None  # [B] float32
    bias: jax.Array | None = None  # [B, V] float32

    @classmethod
    def of(cls, request: GenerationRequest, batch: int, vocab: int, adjust: bool | None = None) -> Sampling:
        """Arrays for a request's rows (rows beyond the request are padding, greedy and finished); with the
        logit adjustments when adjust (default: when some row uses them)."""
        rows = [request.row(b) for b in range(request.batch)]
        return cls.of_rows(rows, batch, vocab, request.adjusts if adjust is None else adjust)

    @classmethod
    def of_rows(cls, rows: Sequence[RowSettings], batch: int, vocab: int, adjust: bool, stops: int | None = None
                ) -> Sampling:
        """Arrays for `batch` rows, the first len(rows) with these settings (none: an idle batch); with the logit
        adjustments when adjust; stops: stop tokens per row (default: the rows' most, rounded up to 8)."""
        n = stops or -(-max([1] + [len(r.sampling.stop_tokens) for r in rows]) // 8) * 8  # 8 per bucket
        temperature, top_k, top_p = np.zeros(batch, np.float32), np.full(batch, vocab, np.int32), np.ones(batch)
        stop, max_new = np.full((batch, n), -1, np.int32), np.ones(batch, np.int32)
        seed, key_index = np.zeros(batch, np.uint32), np.arange(batch, dtype=np.int32)
        for b, r in enumerate(rows):
            sp = r.sampling
            temperature[b] = 0.0 if sp.is_greedy else sp.temperature
            top_k[b] = sp.top_k or vocab
            top_p[b] = 1.0 if sp.top_p is None else sp.top_p
            stop[b, : len(sp.stop_tokens)] = sp.stop_tokens
            max_new[b], seed[b], key_index[b] = r.max_new_tokens, sp.seed, r.key_index
        adjustments = (None, None, None)
        if adjust:
            presence, frequency = np.zeros(batch, np.float32), np.zeros(batch, np.float32)
            bias = np.zeros((batch, vocab), np.float32)
            for b, r in enumerate(rows):
                presence[b], frequency[b] = r.sampling.presence_penalty, r.sampling.frequency_penalty
                bias[b] = bias_row(r.sampling, vocab)
            adjustments = (jnp.asarray(presence), jnp.asarray(frequency), jnp.asarray(bias))
        return cls(jnp.asarray(temperature), jnp.asarray(top_k), jnp.asarray(top_p.astype(np.float32)),
                   jnp.asarray(stop), jnp.asarray(max_new), jnp.asarray(seed), jnp.asarray(key_index), *adjustments)


class DecodeState(NamedTuple):
    """Everything the decode loop carries between steps and between chunks (donated on each call)."""

    cache: Any  # KVCache
    last: jax.Array  # [B] the token sampled last, fed to the next step
    step: jax.Array  # () tokens sampled so far
    done: jax.Array  # [B] row finished (or a padding row)
    stopped: jax.Array  # [B] row finished on a stop token
    lengths: jax.Array  # [B] tokens kept in out (stop token excluded)
    out: jax.Array  # [B, N] generated tokens
    keys: jax.Array  # [B] per-row PRNG keys
    start: jax.Array  # [B] step at which each row began: 0, or later for a row admitted into a running batch
    counts: jax.Array | None = None  # [B, V] int32 tokens each row has generated (None: no row adjusts logits)
    tp: jax.Array | None = None  # () cache index of step 1's token (a session's, chosen at run time); None: the
    # prompt bucket, cache length less out's width (a generate call's, fixed when it compiles)


def filter_top_k_top_p(x: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Set logits [B, V] outside each row's top-k, then outside its top-p nucleus, to -inf."""
    V = x.shape[-1]
    ranked = -jnp.sort(-x, axis=-1)  # [B, V] descending
    kth = jnp.take_along_axis(ranked, top_k[:, None] - 1, axis=-1)  # [B, 1]
    x = jnp.where(x < kth, -jnp.inf, x)
    ranked = jnp.where(jnp.arange(V) < top_k[:, None], ranked, -jnp.inf)
    probs = jax.nn.softmax(ranked, axis=-1)  # [B, V]
    keep = (jnp.cumsum(probs, axis=-1) - probs < top_p[:, None]) | (top_p[:, None] >= 1)
    threshold = jnp.take_along_axis(ranked, keep.sum(-1, keepdims=True) - 1, axis=-1)  # [B, 1]
    return jnp.where(x < threshold, -jnp.inf, x)


def adjust_logits(logits: jax.Array, sampling: Sampling, counts: jax.Array) -> jax.Array:
    """Logits [B, V] less each row's penalties on the tokens it generated (counts [B, V]), plus its bias: the
    float32 expression of gptjax.generate.adjust_logits."""
    c = counts.astype(jnp.float32)
    penalty = c * sampling.frequency[:, None] + (c > 0).astype(jnp.float32) * sampling.presence[:, None]
    return logits.astype(jnp.float32) - penalty + sampling.bias


def sample(logits: jax.Array, keys: jax.Array, step: jax.Array, sampling: Sampling, mode: str,
           counts: jax.Array | None = None) -> jax.Array:
    """Next token per row [B] from logits [B, V]: argmax where temperature is 0, else a seeded draw; first
    adjusted by penalties (on counts [B, V]) and bias where sampling carries them.

    mode (static) is "greedy" (every row: skip the draw), "sample", or "filter" (top-k/top-p on). The draw, and
    the top-k/top-p filter, each run only when some row needs them (a runtime branch: XLA runs one side of a
    cond), so one "filter" loop serves every mix of settings at the cost of the work the mix needs: what lets
    a server compile one loop for all requests. A draw is one uniform number per row against the cumulative
    distribution, not V Gumbel numbers: the threefry bits for 50k Gumbels cost more than a decode step's
    attention."""
    if sampling.bias is not None:
        logits = adjust_logits(logits, sampling, counts)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if mode == "greedy":
        return greedy
    sampled = sampling.temperature > 0

    def draw() -> jax.Array:
        shifted = logits - logits.max(axis=-1, keepdims=True)  # <= 0: a tiny temperature cannot overflow to NaN
        x = shifted / jnp.where(sampled, sampling.temperature, 1.0)[:, None]
        if mode == "filter":
            filters = jnp.any(sampled & ((sampling.top_k < x.shape[-1]) | (sampling.top_p < 1)))
            x = jax.lax.cond(filters, lambda x: filter_top_k_top_p(x, sampling.top_k, sampling.top_p),
                             lambda x: x, x)
        cdf = jnp.cumsum(jax.nn.softmax(x, axis=-1), axis=-1)  # [B, V]
        step_keys = jax.vmap(jax.random.fold_in)(keys, jnp.broadcast_to(step, keys.shape[:1]))  # step: () or [B]
        u = jax.vmap(jax.random.uniform)(step_keys) * cdf[:, -1]  # [B], scaled by the total (rounding)
        return jnp.minimum((cdf <= u[:, None]).sum(-1), x.shape[-1] - 1).astype(jnp.int32)  # first cdf > u

    drawn = jax.lax.cond(jnp.any(sampled), draw, lambda: greedy)
    return jnp.where(sampled, drawn, greedy)


def _record(d: DecodeState, token: jax.Array, stop: jax.Array, max_new: jax.Array) -> DecodeState:
    """Store the tokens of step d.step (out column d.step), mark rows that hit their stop tokens [B, n] or
    length limits [B]; a row's own count is the steps since its start."""
    active = ~d.done
    hit_stop = active & (token[:, None] == stop).any(-1)
    kept = active & ~hit_stop
    out = jax.lax.dynamic_update_index_in_dim(d.out, jnp.where(kept, token, 0), d.step, axis=1)
    step = d.step + 1
    own = step - d.start  # [B] tokens each row has sampled
    counts = None if d.counts is None else d.counts.at[jnp.arange(token.shape[0]), token].add(1)
    return d._replace(last=token, step=step, out=out, lengths=jnp.where(kept, own, d.lengths),
                      stopped=d.stopped | hit_stop, done=d.done | hit_stop | (own >= max_new), counts=counts)


def prefill_masks(pad: jax.Array, T: int) -> Masks:
    """Left-padded prompts [B, T] into an empty cache: causal among themselves, never reading padding."""
    s = jnp.arange(T)
    return Masks(None, (s <= s[:, None])[None] & (s >= pad[:, None, None]))  # [B, T, T]


def decode_masks(pad: jax.Array, index: jax.Array, S: int) -> Masks:
    """One new token per row at cache index `index`: it reads the row's cache entries before it (outside
    the padding) and itself."""
    s = jnp.arange(S)
    cache = (s < index)[None, None] & (s >= pad[:, None, None])  # [B, 1, S]
    return Masks(cache, jnp.ones((pad.shape[0], 1, 1), bool))


@partial(jax.jit, static_argnames=("graphdef", "config", "cache_length", "mode", "kv_cache", "mesh", "cpu_kernels"))
def prefill(graphdef: Any, state: Any, tokens: jax.Array, pad: jax.Array, valid: jax.Array, sampling: Sampling,
            config: GPTConfig, cache_length: int, mode: str, kv_cache: str = "fp32", mesh: Any = None,
            cpu_kernels: bool = False) -> DecodeState:
    """Run left-padded prompts [B, Tp] into a fresh cache (cache_length entries stored as kv_cache, read by
    gptjax's CPU kernels if the conversion chose them) and sample the first token."""
    with jax.default_matmul_precision("float32"):
        model = nnx.merge(graphdef, state)
        B, Tp = tokens.shape
        cache = KVCache.zeros(config, B, cache_length, kv_cache, cpu_kernels)
        if mesh is not None:  # heads over tensor, rows over the batch axes
            cache = jax.tree.map(lambda a: jax.lax.with_sharding_constraint(a, cache_sharding(mesh, a.ndim)), cache)
        positions = jnp.maximum(jnp.arange(Tp)[None] - pad[:, None], 0)  # [B, Tp]
        logits, cache = model.step(tokens, positions, prefill_masks(pad, Tp), cache, 0)
        keys = jax.vmap(lambda s, i: jax.random.fold_in(jax.random.key(s), i))(sampling.seed, sampling.key_index)
        zeros = jnp.zeros(B, jnp.int32)
        counts = None if sampling.bias is None else jnp.zeros(sampling.bias.shape, jnp.int32)  # [B, V]
        d = DecodeState(cache, zeros, jnp.int32(0), ~valid, jnp.zeros(B, bool), zeros,
                        jnp.zeros((B, cache_length - Tp), jnp.int32), keys, zeros, counts)
        return _record(d, sample(logits, keys, d.step, sampling, mode, counts), sampling.stop, sampling.max_new)


@partial(jax.jit, static_argnames=("graphdef", "mode"), donate_argnames=("d",))
def decode(graphdef: Any, state: Any, d: DecodeState, pad: jax.Array, sampling: Sampling, until: jax.Array,
           mode: str) -> DecodeState:
    """Decode one token per row per step, inside one while_loop, until step == until or every row is done."""
    with jax.default_matmul_precision("float32"):
        model = nnx.merge(graphdef, state)
        S = d.cache.length
        Tp = S - d.out.shape[1] if d.tp is None else d.tp  # the cache holds Tp prompt entries, then new tokens

        def body(d: DecodeState) -> DecodeState:
            index = Tp + d.step - 1  # cache index of d.last
            logits, cache = model.step(d.last[:, None], (index - pad)[:, None], decode_masks(pad, index, S),
                                       d.cache, index)
            token = sample(logits, d.keys, d.step - d.start, sampling, mode, d.counts)
            return _record(d._replace(cache=cache), token, sampling.stop, sampling.max_new)

        return jax.lax.while_loop(lambda d: (d.step < until) & ~jnp.all(d.done), body, d)


def batch_bucket(batch: int) -> int:
    """Round the batch up to a power of two (extra rows are finished from the start)."""
    return 1 << (batch - 1).bit_length()


def start(weights: Any, request: GenerationRequest, prompt_length: int, cache_length: int, mesh: Any = None,
          kv_cache: str = "fp32", rows: int | None = None, mode: str | None = None, adjust: bool | None = None
          ) -> tuple[DecodeState, jax.Array, Sampling, str]:
    """Pad the request to its buckets and run prefill; returns the state and what decode needs besides.
    With a mesh the batch is padded to a multiple of its batch axes too, and placed over them. rows (at least
    the request's) and mode (one covering the request's) override the batch bucket and sampling mode; adjust
    whether the loop carries logit adjustments (default: when some row uses them)."""
    config = weights.config
    B = batch_bucket(max(rows or 1, request.batch))
    if mesh is not None:
        rows = mesh.shape["data"] * mesh.shape["fsdp"]
        B = -(-B // rows) * rows
    tokens, pad = left_pad(request.prompts, prompt_length, rows=B)
    valid = np.arange(B) < request.batch
    sampling = Sampling.of(request, B, config.vocab_size, adjust)
    mode = mode or request.mode
    if mesh is not None:
        tokens = shard_batch(tokens, mesh)
    d = prefill(weights.graphdef, weights.state, tokens, pad, valid, sampling, config, cache_length, mode, kv_cache,
                mesh, weights.cpu_kernels)
    return d, jnp.asarray(pad), sampling, mode


@partial(jax.jit, donate_argnames=("d",))
def admit(d: DecodeState, new: DecodeState, row: jax.Array, index: jax.Array) -> DecodeState:
    """Put a one-row prefill `new` (its prompt bucket of cache entries, first token, key) into slot `row` of a
    running batch, so that its next token is written at cache index `index` (its prompt ends just before)."""
    Tp1 = new.cache.length - new.out.shape[1]  # the new row's prompt bucket

    def put(big: jax.Array, small: jax.Array) -> jax.Array:  # [B, H, S, ...] <- [1, H, Tp1, ...] (values, scales)
        at = (row, 0, index - Tp1) + (0,) * (big.ndim - 3)
        return jax.lax.dynamic_update_slice(big, small[:, :, :Tp1].astype(big.dtype), at)

    first = d.step - 1  # the new row's token 0 sits in out column first; decode samples its token 1 next

    def one(a: jax.Array, b: jax.Array) -> jax.Array:
        return a.at[row].set(b[0])

    return d._replace(cache=jax.tree.map(put, d.cache, new.cache), last=one(d.last, new.last),
                      done=one(d.done, new.done), stopped=one(d.stopped, new.stopped),
                      lengths=one(d.lengths, new.lengths), keys=one(d.keys, new.keys),
                      out=jax.lax.dynamic_update_slice(d.out, new.out[:, :1], (row, first)),
                      start=d.start.at[row].set(first),
                      counts=None if d.counts is None else one(d.counts, new.counts))  # the row's own counts


@partial(jax.jit, static_argnames=("config", "rows", "cache_length", "width", "kv_cache", "cpu_kernels", "adjust"))
def empty(config: GPTConfig, rows: int, cache_length: int, width: int, kv_cache: str, cpu_kernels: bool,
          adjust: bool, tp: jax.Array) -> DecodeState:
    """A state of `rows` free slots (all done) over an empty cache of cache_length entries, at step 1, whose step
    1 writes at cache index tp; out holds width tokens per row, counts exist if adjust. A session starts from it
    and admits its requests one by one, so its compiled shapes do not depend on them."""
    cache = KVCache.zeros(config, rows, cache_length, kv_cache, cpu_kernels)
    z = [jnp.zeros(rows, jnp.int32) for _ in range(3)]  # separate buffers: decode donates each
    keys = jax.vmap(jax.random.key)(jnp.zeros(rows, jnp.uint32))
    counts = jnp.zeros((rows, config.vocab_size), jnp.int32) if adjust else None
    return DecodeState(cache, z[0], jnp.int32(1), jnp.ones(rows, bool), jnp.zeros(rows, bool), z[1],
                       jnp.zeros((rows, width), jnp.int32), keys, z[2], counts, jnp.asarray(tp, jnp.int32))


@partial(jax.jit, donate_argnames=("state",))
def stop_row(state: Any, row: jax.Array) -> Any:
    """A decode (or speculative) state with row marked done: it stops being decoded, its slot is free."""
    return state._replace(done=state.done.at[row].set(True))


def compile_count() -> int:
    """Compilations so far of this module's jitted functions (prefill, decode, admit, empty, stop_row)."""
    return sum(f._cache_size() for f in (prefill, decode, admit, empty, stop_row))
