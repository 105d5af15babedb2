"""The readable oracle: GPT-2 as pure NumPy functions over the canonical param dict (after picoGPT).

Constants are Python floats: a NumPy float64 scalar would silently promote float32 activations to float64.

Legend: B batch, T time, D width, H heads, K head dim, F MLP width, V vocab. Weights are Conv1D [in, out].
"""

from __future__ import annotations

import math

import numpy as np

from gptjax.backends.base import Backend
from gptjax.config import GPTConfig
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


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Scaled dot-product attention; mask is additive (0 or -inf-like)."""
    scores = q @ k.swapaxes(-1, -2) / math.sqrt(q.shape[-1]) + mask  # [B, H, T, K] x [B, H, K, T] -> [B, H, T, T]
    return softmax(scores) @ v  # [B, H, T, T] x [B, H, T, K] -> [B, H, T, K]


def causal_self_attention(x: np.ndarray, p: Params, h: str, n_head: int) -> np.ndarray:
    """Multi-head causal self-attention of block h."""
    B, T, D = x.shape
    qkv = linear(x, p[h + "attn.c_attn.weight"], p[h + "attn.c_attn.bias"])  # [B, T, D] -> [B, T, 3D]
    heads = qkv.reshape(B, T, 3, n_head, D // n_head).transpose(2, 0, 3, 1, 4)  # -> [3, B, H, T, K]
    mask = np.triu(np.full((T, T), -1e10, dtype=x.dtype), k=1)  # [T, T], -1e10 above the diagonal
    out = attention(heads[0], heads[1], heads[2], mask)  # -> [B, H, T, K]
    out = out.transpose(0, 2, 1, 3).reshape(B, T, D)  # [B, H, T, K] -> [B, T, D]
    return linear(out, p[h + "attn.c_proj.weight"], p[h + "attn.c_proj.bias"])  # [B, T, D] -> [B, T, D]


def block(x: np.ndarray, p: Params, h: str, n_head: int, eps: float) -> np.ndarray:
    """Pre-LayerNorm transformer block: x + attn(ln_1(x)), then + mlp(ln_2(x))."""
    x = x + causal_self_attention(layer_norm(x, p[h + "ln_1.weight"], p[h + "ln_1.bias"], eps), p, h, n_head)
    return x + mlp(layer_norm(x, p[h + "ln_2.weight"], p[h + "ln_2.bias"], eps), p, h)  # [B, T, D]


def gpt2(tokens: np.ndarray, p: Params, n_layer: int, n_head: int, eps: float, last_only: bool) -> np.ndarray:
    """Logits for int tokens [B, T]: [B, T, V], or [B, V] at the last position."""
    T = tokens.shape[1]
    x = p["wte.weight"][tokens] + p["wpe.weight"][:T]  # [B, T] -> [B, T, D]
    for i in range(n_layer):
        x = block(x, p, f"h.{i}.", n_head, eps)  # [B, T, D] -> [B, T, D]
    if last_only:
        x = x[:, -1]  # [B, T, D] -> [B, D]
    x = layer_norm(x, p["ln_f.weight"], p["ln_f.bias"], eps)
    return x @ p.get("lm_head.weight", p["wte.weight"]).T  # [..., D] x [D, V] -> [..., V]


class NumpyBackend(Backend):
    """Pure NumPy, float32 (or float64 with dtype="float64" for reference checks)."""

    name = "numpy"
    options = {"dtype": ("float32", "float64")}

    def __init__(self, config: GPTConfig, **options: str) -> None:
        super().__init__(config, **options)
        self.dtype = np.dtype(options.get("dtype", "float32"))

    def _convert(self, params: Params) -> Params:
        return {k: np.asarray(v, dtype=self.dtype) for k, v in params.items()}

    def _forward(self, weights: Params, tokens: np.ndarray, last_only: bool) -> np.ndarray:
        c = self.config
        logits = gpt2(tokens, weights, c.n_layer, c.n_head, c.layer_norm_epsilon, last_only)
        return logits.astype(np.float32)
