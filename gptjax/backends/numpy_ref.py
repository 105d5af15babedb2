"""The readable oracle: GPT-2 as pure NumPy functions over the canonical param dict (after picoGPT).

Constants are Python floats: a NumPy float64 scalar would silently promote float32 activations to float64.

Legend: B batch, T time, D width, H heads, K head dim, F MLP width, V vocab. Weights are Conv1D [in, out].
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from functools import partial

import numpy as np

from gptjax.backends.base import Backend
from gptjax.config import GPTConfig
from gptjax.generate import LENGTH, STOP, GenerationRequest, RowSettings, StreamChunk, left_pad, sample_token
from gptjax.weights import Params

Cache = tuple[np.ndarray, np.ndarray]  # one layer's keys and values, [B, H, S, K] each


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


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Scaled dot-product attention; mask is additive (0 where allowed, -1e10 where not)."""
    scores = q @ k.swapaxes(-1, -2) / math.sqrt(q.shape[-1]) + mask  # [B, H, T, K] x [B, H, K, S] -> [B, H, T, S]
    return softmax(scores) @ v  # [B, H, T, S] x [B, H, S, K] -> [B, H, T, K]


def self_attention(x: np.ndarray, p: Params, h: str, n_head: int, mask: np.ndarray,
                   cache: Cache | None = None, start: int = 0) -> np.ndarray:
    """Multi-head self-attention of block h. With a cache ([B, H, S, K] keys and values of this layer), the new
    keys/values are written at index start and the queries attend over the whole cache, as the mask allows."""
    B, T, D = x.shape
    qkv = linear(x, p[h + "attn.c_attn.weight"], p[h + "attn.c_attn.bias"])  # [B, T, D] -> [B, T, 3D]
    q, k, v = qkv.reshape(B, T, 3, n_head, D // n_head).transpose(2, 0, 3, 1, 4)  # -> 3 x [B, H, T, K]
    if cache is not None:
        cache[0][:, :, start:start + T] = k  # written in place: the cache is preallocated to S
        cache[1][:, :, start:start + T] = v
        k, v = cache  # [B, H, S, K]
    out = attention(q, k, v, mask)  # -> [B, H, T, K]
    out = out.transpose(0, 2, 1, 3).reshape(B, T, D)  # [B, H, T, K] -> [B, T, D]
    return linear(out, p[h + "attn.c_proj.weight"], p[h + "attn.c_proj.bias"])  # [B, T, D] -> [B, T, D]


def block(x: np.ndarray, p: Params, h: str, n_head: int, eps: float, mask: np.ndarray,
          cache: Cache | None = None, start: int = 0) -> np.ndarray:
    """Pre-LayerNorm transformer block: x + attn(ln_1(x)), then + mlp(ln_2(x))."""
    a = self_attention(layer_norm(x, p[h + "ln_1.weight"], p[h + "ln_1.bias"], eps), p, h, n_head, mask, cache,
                       start)
    x = x + a  # [B, T, D]
    return x + mlp(layer_norm(x, p[h + "ln_2.weight"], p[h + "ln_2.bias"], eps), p, h)  # [B, T, D]


def causal_mask(T: int, dtype: np.dtype) -> np.ndarray:
    """Additive mask [T, T]: position t sees positions <= t."""
    return np.triu(np.full((T, T), -1e10, dtype=dtype), k=1)


def gpt2(tokens: np.ndarray, p: Params, n_layer: int, n_head: int, eps: float, last_only: bool,
         positions: np.ndarray | None = None, mask: np.ndarray | None = None,
         cache: list[Cache] | None = None, start: int = 0) -> np.ndarray:
    """Logits for int tokens [B, T]: [B, T, V], or [B, V] at the last position.

    Without a cache this is the plain causal forward pass. With one (a [B, H, S, K] key/value pair per
    layer), tokens sit at cache index start.. with their own positions [B, T] and additive mask [B, 1, T, S].
    """
    T = tokens.shape[1]
    pos = np.arange(T) if positions is None else positions  # [T] or [B, T]
    x = p["wte.weight"][tokens] + p["wpe.weight"][pos]  # [B, T] -> [B, T, D]
    mask = causal_mask(T, x.dtype) if mask is None else mask
    for i in range(n_layer):
        x = block(x, p, f"h.{i}.", n_head, eps, mask, None if cache is None else cache[i], start)  # [B, T, D]
    if last_only:
        x = x[:, -1]  # [B, T, D] -> [B, D]
    x = layer_norm(x, p["ln_f.weight"], p["ln_f.bias"], eps)
    return x @ p.get("lm_head.weight", p["wte.weight"]).T  # [..., D] x [D, V] -> [..., V]


def ragged_mask(pad: np.ndarray, first: int, T: int, S: int, dtype: np.dtype) -> np.ndarray:
    """Additive mask [B, 1, T, S] for queries at cache indices first..first+T-1 of left-padded rows:
    a query reads cache entries at or before its own index and not in its row's padding."""
    s = np.arange(S)  # [S]
    t = first + np.arange(T)[:, None]  # [T, 1]
    allowed = (s <= t)[None] & (s >= pad[:, None, None])  # [B, T, S]
    return np.where(allowed, 0, -1e10).astype(dtype)[:, None]  # -> [B, 1, T, S]


class NumpyBackend(Backend):
    """Pure NumPy, float32 (or float64 with dtype="float64" for reference checks)."""

    name = "numpy"
    options = {"dtype": ("float32", "float64")}

    def __init__(self, config: GPTConfig, *, metrics: object = None, trace_sync: bool = True, **options: str) -> None:
        super().__init__(config, metrics=metrics, trace_sync=trace_sync, **options)
        self.dtype = np.dtype(options.get("dtype", "float32"))

    def _convert(self, params: Params) -> Params:
        return {k: np.asarray(v, dtype=self.dtype) for k, v in params.items()}

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
        cache = [(np.zeros((B, c.n_head, S, K), self.dtype), np.zeros((B, c.n_head, S, K), self.dtype))
                 for _ in range(c.n_layer)]
        run = partial(gpt2, p=weights, n_layer=c.n_layer, n_head=c.n_head, eps=c.layer_norm_epsilon,
                      last_only=True, cache=cache)
        positions = np.maximum(np.arange(Tp)[None] - pad[:, None], 0)  # [B, Tp]
        logits = run(tokens, positions=positions, mask=ragged_mask(pad, 0, Tp, S, self.dtype), start=0)
        rngs = [np.random.default_rng([r.sampling.seed, r.key_index]) for r in rows_settings]
        rows = _Rows(rows_settings)
        for step in range(request.max_new_tokens):
            next_tokens = np.array([sample_token(logits[b], r.sampling, rngs[b])
                                    for b, r in enumerate(rows_settings)])  # [B]
            rows.record(next_tokens, step)
            if step == 0 or rows.all_done or (chunk_size and step % chunk_size == 0):
                yield rows.flush("prefill" if step == 0 else "decode")
            if rows.all_done:
                return
            index = Tp + step  # cache index of the token just sampled
            logits = run(next_tokens[:, None], positions=(index - pad)[:, None],
                         mask=ragged_mask(pad, index, 1, S, self.dtype), start=index)


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
            if self.reasons[b]:
                continue
            if t in self.stop_tokens[b]:
                self.reasons[b] = STOP
                continue
            self.pending[b].append(t)
            if step == self.last_step[b]:
                self.reasons[b] = LENGTH

    def flush(self, phase: str) -> StreamChunk:
        chunk = StreamChunk(self.pending, list(self.reasons), phase)
        self.pending = [[] for _ in self.pending]
        return chunk
