"""The readable oracle: GPT-2 as pure NumPy functions over the canonical param dict (after picoGPT).

Constants are Python floats: a NumPy float64 scalar would silently promote float32 activations to float64.

Legend: B batch, T time, D width, H heads, K head dim, F MLP width, V vocab. Weights are Conv1D [in, out].
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from functools import partial

import ml_dtypes
import numpy as np

from gptjax.backends.base import PRECISION_OPTIONS, Backend
from gptjax.config import GPTConfig
from gptjax.generate import (
    LENGTH, STOP, GenerationRequest, RowSettings, StreamChunk, left_pad, sample_token,
)
from gptjax import precision as registry
from gptjax.precision import PER_TOKEN, STORAGES, Mode
from gptjax.quantize import SCALE_SUFFIX, quantize_int8, quantized_keys, unpacked
from gptjax.sampling import SamplingParams
from gptjax.speculative import NgramDraft, Speculation, accept_greedy, accept_sampled, ngram_proposal, token_probs
from gptjax.weights import Params


def gelu(x: np.ndarray) -> np.ndarray:
    """GPT-2's tanh approximation of GELU."""
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x * x * x)))


def softmax(x: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, shifted by the max for stability."""
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def layer_norm(x: np.ndarray, g: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    """Normalise the last axis to zero mean, unit variance, then scale and shift."""
    mean = x.mean(axis=-1, keepdims=True)  # [..., 1]
    var = x.var(axis=-1, keepdims=True)  # [..., 1]
    return g * (x - mean) / np.sqrt(var + eps) + b


def linear(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Conv1D: [..., in] @ [in, out] + [out]."""
    return x @ w + b


def mlp(x: np.ndarray, p: Params, h: str) -> np.ndarray:
    """Position-wise feed-forward network of block h."""
    a = gelu(linear(x, p[h + "mlp.c_fc.weight"], p[h + "mlp.c_fc.bias"]))  # [B, T, D] -> [B, T, F]
    return linear(a, p[h + "mlp.c_proj.weight"], p[h + "mlp.c_proj.bias"])  # [B, T, F] -> [B, T, D]


def attention_weights(q: np.ndarray, k: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """softmax(QK^T / sqrt(K) + M): how much each query attends to each key; mask is additive (0 where allowed,
    -1e10 where not)."""
    scores = q @ k.swapaxes(-1, -2) / math.sqrt(q.shape[-1]) + mask  # [B, H, T, K] x [B, H, K, S] -> [B, H, T, S]
    return softmax(scores)  # [B, H, T, S], each row sums to 1


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray,
              maps: list[np.ndarray] | None = None) -> np.ndarray:
    """Scaled dot-product attention; the weights are appended to maps when given one."""
    weights = attention_weights(q, k, mask)  # [B, H, T, S]
    if maps is not None:
        maps.append(weights)
    return weights @ v  # [B, H, T, S] x [B, H, S, K] -> [B, H, T, K]


def self_attention(x: np.ndarray, p: Params, h: str, n_head: int, mask: np.ndarray,
                   cache: LayerCache | None = None, start: int = 0, maps: list[np.ndarray] | None = None
                   ) -> np.ndarray:
    """Multi-head self-attention of block h. With this layer's cache ([B, H, S, K] keys and values), the new
    keys/values are written at index start and the queries attend over the whole cache (as stored: rounded to
    bf16 or int8 if it holds those), as the mask allows."""
    B, T, D = x.shape
    qkv = linear(x, p[h + "attn.c_attn.weight"], p[h + "attn.c_attn.bias"])  # [B, T, D] -> [B, T, 3D]
    q, k, v = qkv.reshape(B, T, 3, n_head, D // n_head).transpose(2, 0, 3, 1, 4)  # -> 3 x [B, H, T, K]
    if cache is not None:
        cache.write(k, v, start)  # in place: the cache is preallocated to S
        k, v = cache.read()  # [B, H, S, K]
    out = attention(q, k, v, mask, maps)  # -> [B, H, T, K]
    out = out.transpose(0, 2, 1, 3).reshape(B, T, D)  # [B, H, T, K] -> [B, T, D]
    return linear(out, p[h + "attn.c_proj.weight"], p[h + "attn.c_proj.bias"])  # [B, T, D] -> [B, T, D]


def block(x: np.ndarray, p: Params, h: str, n_head: int, eps: float, mask: np.ndarray,
          cache: LayerCache | None = None, start: int = 0, maps: list[np.ndarray] | None = None) -> np.ndarray:
    """Pre-LayerNorm transformer block: x + attn(ln_1(x)), then + mlp(ln_2(x))."""
    a = self_attention(layer_norm(x, p[h + "ln_1.weight"], p[h + "ln_1.bias"], eps), p, h, n_head, mask, cache,
                       start, maps)
    x = x + a  # [B, T, D]
    return x + mlp(layer_norm(x, p[h + "ln_2.weight"], p[h + "ln_2.bias"], eps), p, h)  # [B, T, D]


def causal_mask(T: int, dtype: np.dtype) -> np.ndarray:
    """Additive mask [T, T]: position t sees positions <= t."""
    return np.triu(np.full((T, T), -1e10, dtype=dtype), k=1)


def gpt2(tokens: np.ndarray, p: Params, n_layer: int, n_head: int, eps: float, last_only: bool,
         positions: np.ndarray | None = None, mask: np.ndarray | None = None,
         cache: list[LayerCache] | None = None, start: int = 0, return_attention: bool = False
         ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Logits for int tokens [B, T]: [B, T, V], or [B, V] at the last position; with return_attention, also
    every layer's attention weights [L, B, H, T, S] (the same logits: the weights are kept, not recomputed).

    Without a cache this is the plain causal forward pass. With one (a LayerCache of [B, H, S, K] keys and
    values per layer), tokens sit at cache index start.. with their own positions [B, T] and additive mask
    [B, 1, T, S]. Matrices may be reduced-precision stand-ins (FloatMatrix, ScaledMatrix) for float arrays.
    """
    T = tokens.shape[1]
    pos = np.arange(T) if positions is None else positions  # [T] or [B, T]
    x = p["wte.weight"][tokens] + p["wpe.weight"][pos]  # [B, T] -> [B, T, D]
    mask = causal_mask(T, x.dtype) if mask is None else mask
    maps: list[np.ndarray] | None = [] if return_attention else None  # one [B, H, T, S] per layer
    for i in range(n_layer):
        x = block(x, p, f"h.{i}.", n_head, eps, mask, None if cache is None else cache[i], start, maps)  # [B, T, D]
    if last_only:
        x = x[:, -1]  # [B, T, D] -> [B, D]
    x = layer_norm(x, p["ln_f.weight"], p["ln_f.bias"], eps)
    logits = x @ p.get("lm_head.weight", p["wte.weight"]).T  # [..., D] x [D, V] -> [..., V]
    return (logits, np.stack(maps)) if maps is not None else logits  # maps: [L, B, H, T, S]


# ---- reduced precision: stand-ins for the float matrices (built from the registry) and the KV cache ----------
class FloatMatrix:
    """A matrix in a float storage narrower than float32 (bfloat16; Conv1D [in, out], or a [V, D] table) used like the
    float one: `x @ w` rounds x to its dtype (the mode's compute dtype) and accumulates in float32, `w[ids]` gives
    float32 rows, `x @ w.T` is the tied head."""

    __array_ufunc__ = None  # ndarray @ w defers to __rmatmul__

    def __init__(self, w: np.ndarray) -> None:
        self.w = w

    def __rmatmul__(self, x: np.ndarray) -> np.ndarray:
        return _rounded(x, self.w.dtype) @ self.w.astype(np.float32)  # [..., in] x [in, out] -> [..., out]

    def __getitem__(self, ids: np.ndarray) -> np.ndarray:
        return self.w[ids].astype(np.float32)

    @property
    def T(self) -> _Transposed:
        return _Transposed(lambda x: _rounded(x, self.w.dtype) @ self.w.astype(np.float32).T)


def float_dots(xg: np.ndarray, qg: np.ndarray) -> np.ndarray:
    """Per group g: xg[..., g, :] @ qg[g] -> float32 [..., G, out] (weight-only: float activations)."""
    return np.einsum("...gi,gio->...go", xg.astype(np.float32), qg.astype(np.float32))


def per_token_int8_dots(xg: np.ndarray, qg: np.ndarray) -> np.ndarray:
    """Per group g: (int8 xg_g @ qg[g]) * xg_g's scale -> float32 [..., G, out]: x quantised per token and group
    first (dynamic), an exact int32 dot."""
    xq, sx = quantize_int8(xg, axis=xg.ndim - 1)  # [..., G, in/G] int8, [..., G]
    acc = np.einsum("...gi,gio->...go", xq.astype(np.int32), qg.astype(np.int32))  # exact
    return acc.astype(np.float32) * sx[..., None]


# The activations each compute_dtype of gptjax.precision names, for scaled matrices (as the JAX backend computes)
GROUP_DOTS = {"fp32": float_dots, "int8": per_token_int8_dots}


class ScaledMatrix:
    """A matrix of scaled values (gptjax.quantize: int8, packed int4, ... with float32 scales per output channel and
    input group), used like the float one. `x @ w` multiplies each group with the mode's activations (GROUP_DOTS of
    its compute_dtype; a pass of more than per_token_above tokens per sequence with PER_TOKEN's) and applies the
    scales after each group's dot, as the JAX backend does; rows and the tied head are weight-only. `packed` is the
    array as stored (kept, never quantised again), `q` its values, unpacked on each use (int4)."""

    __array_ufunc__ = None

    def __init__(self, packed: np.ndarray, scale: np.ndarray, axis: int, mode: Mode) -> None:
        self.packed, self.scale, self.axis = packed, scale, axis
        self.dots, self.per_token_above = GROUP_DOTS[mode.compute_dtype], mode.per_token_above

    @property
    def q(self) -> np.ndarray:
        """The values (the stored array itself unless packed: int4's in [-8, 7])."""
        return unpacked(self.packed, self.axis)

    def __rmatmul__(self, x: np.ndarray) -> np.ndarray:  # Conv1D [in, out]
        q = self.q
        s = self.scale.reshape(-1, q.shape[1])  # [G, out]
        xg = x.reshape(*x.shape[:-1], s.shape[0], -1)  # [..., G, in/G]
        qg = q.reshape(s.shape[0], -1, q.shape[1])  # [G, in/G, out]
        long = self.per_token_above is not None and x.ndim >= 3 and x.shape[-2] > self.per_token_above  # x [B, T, in]
        return ((GROUP_DOTS[PER_TOKEN] if long else self.dots)(xg, qg) * s).sum(-2)

    def __getitem__(self, ids: np.ndarray) -> np.ndarray:  # [V, D] table rows
        q = self.q
        s = self.scale.reshape(q.shape[0], -1)  # [V, G]
        rows = q[ids].astype(np.float32)  # [..., D]
        return (rows.reshape(*rows.shape[:-1], s.shape[1], -1) * s[ids][..., None]).reshape(rows.shape)

    @property
    def T(self) -> _Transposed:
        def head(x: np.ndarray) -> np.ndarray:  # x [..., D] @ table.T -> [..., V], weight-only
            q = self.q
            s = self.scale.reshape(q.shape[0], -1)  # [V, G]
            V, G = s.shape
            xg = x.reshape(*x.shape[:-1], G, -1).astype(np.float32)
            return (np.einsum("...gi,vgi->...vg", xg, q.reshape(V, G, -1).astype(np.float32)) * s).sum(-1)
        return _Transposed(head)


def stand_in(params: Params, key: str, axis: int, mode: Mode) -> FloatMatrix | ScaledMatrix | None:
    """The stand-in for matmul weight params[key] (contracted along axis) in a run mode: scaled values (with
    `<key>_scale`), a narrower float, or None (a float32 array, as keep_head leaves the head)."""
    value = params[key]
    if key + SCALE_SUFFIX in params:
        return ScaledMatrix(value, params[key + SCALE_SUFFIX], axis, mode)
    return FloatMatrix(value) if np.asarray(value).dtype.name in _NARROW_FLOATS else None


_NARROW_FLOATS = {s.dtype for s in STORAGES.values() if not s.scaled} - {"float32"}


class _Transposed:
    """`x @ w.T` for a stand-in matrix w."""

    __array_ufunc__ = None

    def __init__(self, matmul) -> None:
        self.matmul = matmul

    def __rmatmul__(self, x: np.ndarray) -> np.ndarray:
        return self.matmul(x)


def _rounded(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """x rounded to dtype (as the JAX backend feeds a bf16 matmul), back in float32."""
    return x.astype(dtype).astype(np.float32)


class FloatCache:
    """One layer's keys and values [B, H, S, K] stored in a float dtype (float32, bfloat16), read as `compute`."""

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype, compute: np.dtype) -> None:
        self.k, self.v, self.compute = np.zeros(shape, dtype), np.zeros(shape, dtype), compute

    def write(self, k: np.ndarray, v: np.ndarray, start: int) -> None:
        """Store k, v [B, H, T, K] at index start."""
        self.k[:, :, start:start + k.shape[2]] = k
        self.v[:, :, start:start + v.shape[2]] = v

    def read(self) -> tuple[np.ndarray, np.ndarray]:
        """All keys and values, [B, H, S, K] each."""
        return self.k.astype(self.compute), self.v.astype(self.compute)


class Int8Cache:
    """One layer's keys and values as int8 [B, H, S, K] with a float32 scale per head and token [B, H, S]."""

    def __init__(self, shape: tuple[int, ...], dtype: object = None, compute: np.dtype = np.float32) -> None:
        self.k, self.v = np.zeros(shape, np.int8), np.zeros(shape, np.int8)
        self.k_scale, self.v_scale = np.ones(shape[:3], np.float32), np.ones(shape[:3], np.float32)

    def write(self, k: np.ndarray, v: np.ndarray, start: int) -> None:
        """Quantise k, v [B, H, T, K] per head and token and store them at index start."""
        end = start + k.shape[2]
        self.k[:, :, start:end], self.k_scale[:, :, start:end] = quantize_int8(k, axis=3)
        self.v[:, :, start:end], self.v_scale[:, :, start:end] = quantize_int8(v, axis=3)

    def read(self) -> tuple[np.ndarray, np.ndarray]:
        """All keys and values dequantised, float32 [B, H, S, K] each."""
        return self.k * self.k_scale[..., None], self.v * self.v_scale[..., None]


LayerCache = FloatCache | Int8Cache


def ragged_mask(pad: np.ndarray, first: int, T: int, S: int, dtype: np.dtype) -> np.ndarray:
    """Additive mask [B, 1, T, S] for queries at cache indices first..first+T-1 of left-padded rows:
    a query reads cache entries at or before its own index and not in its row's padding."""
    s = np.arange(S)  # [S]
    t = first + np.arange(T)[:, None]  # [T, 1]
    allowed = (s <= t)[None] & (s >= pad[:, None, None])  # [B, T, S]
    return np.where(allowed, 0, -1e10).astype(dtype)[:, None]  # -> [B, 1, T, S]


class NumpyBackend(Backend):
    """Pure NumPy, float32 (or float64 with dtype="float64" for reference checks); every reduced-precision mode
    of gptjax.precision through stand-in matrices built from its registry entry (stored values, the activations
    its compute_dtype names) that compute as the JAX backend does."""

    name = "numpy"
    options = {"dtype": ("float32", "float64"), **PRECISION_OPTIONS}

    def __init__(self, config: GPTConfig, *, metrics: object = None, trace_sync: bool = True, **options: str) -> None:
        super().__init__(config, metrics=metrics, trace_sync=trace_sync, **options)
        self.dtype = np.dtype(options.get("dtype", "float32"))

    def _convert(self, params: Params) -> Params:
        matrices, mode = quantized_keys(self.config), registry.mode(self.precision)
        out: Params = {}
        for key, value in params.items():
            if key.endswith(SCALE_SUFFIX) and key.removesuffix(SCALE_SUFFIX) in matrices:
                continue
            matrix = stand_in(params, key, matrices[key], mode) if key in matrices else None
            # biases, LayerNorm, wpe (bf16 converts exactly), and float32 matrices are arrays
            out[key] = np.asarray(value, dtype=self.dtype) if matrix is None else matrix
        return out

    def _forward(self, weights: Params, tokens: np.ndarray, last_only: bool) -> np.ndarray:
        c = self.config
        logits = gpt2(tokens, weights, c.n_layer, c.n_head, c.layer_norm_epsilon, last_only)
        return logits.astype(np.float32)

    def _generate(self, weights: Params, request: GenerationRequest, chunk_size: int | None
                  ) -> Iterator[StreamChunk]:
        """Prefill the left-padded prompts into a preallocated cache (first chunk: its token), then one token
        per row per step, chunk_size steps per chunk."""
        c, rows_settings = self.config, [request.row(b) for b in range(request.batch)]
        Tp = max(len(p) for p in request.prompts)
        S = Tp + request.max_new_tokens
        tokens, pad = left_pad(request.prompts, Tp)  # [B, Tp], [B]
        B, K = len(pad), c.head_dim
        layer_cache, dtype = CACHES[self.kv_cache]
        cache = [layer_cache((B, c.n_head, S, K), dtype or self.dtype, self.dtype) for _ in range(c.n_layer)]
        run = partial(gpt2, p=weights, n_layer=c.n_layer, n_head=c.n_head, eps=c.layer_norm_epsilon,
                      last_only=True, cache=cache)
        positions = np.maximum(np.arange(Tp)[None] - pad[:, None], 0)  # [B, Tp]
        logits = run(tokens, positions=positions, mask=ragged_mask(pad, 0, Tp, S, self.dtype), start=0)
        rngs = [np.random.default_rng([r.sampling.seed, r.key_index]) for r in rows_settings]
        rows = _Rows(rows_settings)
        counts = np.zeros((B, c.vocab_size), np.int32) if request.adjusts else None  # generated tokens per row
        for step in range(request.max_new_tokens):
            next_tokens = np.array([sample_token(logits[b], r.sampling, rngs[b], None if counts is None else counts[b])
                                    for b, r in enumerate(rows_settings)])  # [B]
            if counts is not None:
                counts[np.arange(B), next_tokens] += 1
            rows.record(next_tokens, step)
            if step == 0 or rows.all_done or (chunk_size and step % chunk_size == 0):
                yield rows.flush("prefill" if step == 0 else "decode")
            if rows.all_done:
                return
            index = Tp + step  # cache index of the token just sampled
            logits = run(next_tokens[:, None], positions=(index - pad)[:, None],
                         mask=ragged_mask(pad, index, 1, S, self.dtype), start=index)

    # ---- speculative decoding: the readable reference loop (the rules are gptjax.speculative's) ------------
    def _speculate(self, weights: Params, request: GenerationRequest, chunk_size: int | None, spec: Speculation
                   ) -> Iterator[StreamChunk]:
        """Row by row, without caches: the prompt's token first, then rounds of k proposals verified by one
        target pass over the context plus the proposals (k shrinks to fit a row's remaining budget)."""
        c, settings = self.config, [request.row(b) for b in range(request.batch)]
        target = partial(_all_logits, p=weights, config=c)
        rngs = [np.random.default_rng([r.sampling.seed, r.key_index]) for r in settings]
        context = [list(p) for p in request.prompts]
        rows, counts = _Rows(settings), [1] * request.batch
        for b, r in enumerate(settings):
            context[b].append(sample_token(target(context[b])[-1], r.sampling, rngs[b]))
            rows.extend(b, context[b][-1:], 0)
        yield rows.flush("prefill")
        proposed = accepted = rounds = 0
        while not rows.all_done:
            for b, r in enumerate(settings):
                if rows.reasons[b]:
                    continue
                k = min(spec.k, r.max_new_tokens - counts[b] - 1)
                drafts, q = self._propose(context[b], k, spec, r.sampling, rngs[b])
                logits = target(context[b] + drafts)[-k - 1:]  # [k+1, V]: before each proposal, and after all
                tokens = (accept_greedy(logits, drafts) if r.sampling.is_greedy else
                          accept_sampled(token_probs(logits, r.sampling), q, drafts, rngs[b]))
                kept = rows.extend(b, tokens, counts[b])
                context[b] += tokens
                counts[b] += len(tokens)
                proposed, accepted = proposed + spec.k, accepted + min(len(tokens) - 1, kept)
            rounds += 1
            if rows.all_done or (chunk_size and rounds % chunk_size == 0):
                chunk = rows.flush("decode")
                chunk.proposed, chunk.accepted, proposed, accepted = proposed, accepted, 0, 0
                yield chunk

    def _propose(self, context: list[int], k: int, spec: Speculation, sampling: SamplingParams,
                 rng: np.random.Generator) -> tuple[list[int], np.ndarray | None]:
        """k draft tokens after context and the distributions [k, V] they were drawn from (one-hot for n-grams;
        None for greedy rows, which take the draft's argmax)."""
        V = self.config.vocab_size
        if isinstance(spec.draft, NgramDraft):
            drafts = ngram_proposal(context, k, spec.draft.max_ngram, spec.draft.min_ngram)
            return drafts, np.eye(V)[drafts]
        drafts, q = [], []
        for _ in range(k):
            logits = _all_logits(context + drafts, spec.weights, spec.draft.config)[-1]  # [V]
            if sampling.is_greedy:
                drafts.append(int(np.argmax(logits)))
                continue
            q.append(token_probs(logits, sampling))
            drafts.append(int(rng.choice(V, p=q[-1])))
        return drafts, (np.array(q) if q else np.zeros((0, V)))


# The layer cache (with its storage dtype; None: the backend's) per KV-cache storage of gptjax.precision.
CACHES = {"fp32": (FloatCache, None), "bf16": (FloatCache, ml_dtypes.bfloat16), "int8": (Int8Cache, None)}


def _all_logits(tokens: list[int], p: Params, config: GPTConfig) -> np.ndarray:
    """The causal forward pass over one row's tokens: logits [T, V] (float32 or float64, as the weights)."""
    return gpt2(np.array([tokens]), p, config.n_layer, config.n_head, config.layer_norm_epsilon, False)[0]


class _Rows:
    """Per-row bookkeeping of a decode: tokens not yet yielded, which rows are done and why."""

    def __init__(self, settings: list[RowSettings]) -> None:
        self.pending: list[list[int]] = [[] for _ in settings]
        self.reasons: list[str | None] = [None] * len(settings)
        self.stop_tokens = [set(r.sampling.stop_tokens) for r in settings]
        self.last_step = [r.max_new_tokens - 1 for r in settings]

    @property
    def all_done(self) -> bool:
        return all(self.reasons)

    def record(self, tokens: np.ndarray, step: int) -> None:
        for b, t in enumerate(tokens.tolist()):
            self.extend(b, [t], step)

    def extend(self, b: int, tokens: list[int], step: int) -> int:
        """Record row b's tokens sampled at steps step, step + 1, ...; how many it kept."""
        kept = 0
        for i, t in enumerate(tokens):
            if self.reasons[b]:
                break
            if t in self.stop_tokens[b]:
                self.reasons[b] = STOP
                break
            self.pending[b].append(t)
            kept += 1
            if step + i == self.last_step[b]:
                self.reasons[b] = LENGTH
        return kept

    def flush(self, phase: str) -> StreamChunk:
        chunk = StreamChunk(self.pending, list(self.reasons), phase)
        self.pending = [[] for _ in self.pending]
        return chunk
