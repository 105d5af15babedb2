"""Reduced precision as a conversion step: bfloat16 casts and symmetric int8 quantisation of canonical params.

int8 weights: each output channel (a column of a Conv1D [in, out] kernel; a row of the [V, D] embedding used
as the LM head) gets one float32 scale = max|w| / 127, values round(w / scale) in [-127, 127]; with a group
size G the scale is per output channel and per group of G inputs. Dequantised values are within scale / 2 of
the original. An all-zero channel gets scale 1 and values 0, so it round-trips exactly.

Quantised params keep the canonical key of each quantised weight for its int8 values and add
`<key>_scale`; `precision_of` tells the mode of a param dict. (The backends' bf16/int8 execution modes
build on these functions: the precision issue.)
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from gptjax.config import GPTConfig
from gptjax.errors import GptjaxError
from gptjax.weights import Params

MODES = ("fp32", "bf16", "int8")
SCALE_SUFFIX = "_scale"


def quantized_keys(config: GPTConfig, keep_head: bool = False) -> dict[str, int]:
    """Canonical keys of the matmul weights int8 mode quantises → the axis their matmul contracts over."""
    keys = {}
    for i in range(config.n_layer):
        for name in ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"):
            keys[f"h.{i}.{name}"] = 0  # Conv1D [in, out]: contract over in
    if not keep_head:
        keys["wte.weight"] = 1  # [V, D] as the head (x @ wte.T): contract over D, one scale per token row
        if not config.tie_word_embeddings:
            keys["lm_head.weight"] = 1
    return keys


def quantize_int8(w: np.ndarray, axis: int, group_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(int8 values, float32 scales) of w, symmetric, one scale per output channel (and input group)."""
    w = np.asarray(w, np.float32)
    grouped = _group(w, axis, group_size)  # [..., groups, G, ...] with G at axis + 1
    reduce_axis = axis + 1 if group_size else axis
    amax = np.abs(grouped).max(axis=reduce_axis, keepdims=True)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(grouped / scale), -127, 127).astype(np.int8)
    return q.reshape(w.shape), np.squeeze(scale, axis=reduce_axis)


def dequantize_int8(q: np.ndarray, scale: np.ndarray, axis: int, group_size: int | None = None) -> np.ndarray:
    """float32 values of int8 q with the scales quantize_int8 returned."""
    grouped = _group(q.astype(np.float32), axis, group_size)
    reduce_axis = axis + 1 if group_size else axis
    return (grouped * np.expand_dims(scale, reduce_axis)).reshape(q.shape).astype(np.float32)


def _group(w: np.ndarray, axis: int, group_size: int | None) -> np.ndarray:
    if group_size is None:
        return w
    n = w.shape[axis]
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1 or n % group_size:
        raise GptjaxError(f"group_size={group_size!r} must be a positive integer dividing the input width {n}")
    return w.reshape(*w.shape[:axis], n // group_size, group_size, *w.shape[axis + 1:])


def precision_of(params: Params) -> str:
    """"int8" if params hold int8 weights, "bf16" if bfloat16, else "fp32"."""
    dtypes = {np.asarray(v).dtype for v in params.values()}
    if np.dtype(np.int8) in dtypes:
        return "int8"
    if np.dtype(ml_dtypes.bfloat16) in dtypes:
        return "bf16"
    return "fp32"


def convert(params: Params, config: GPTConfig, mode: str, *, group_size: int | None = None,
            keep_head: bool = False) -> Params:
    """Canonical float params in `mode`: bf16 casts every array; int8 quantises the matmul weights (and the
    tied embedding/head unless keep_head) and keeps the rest float32."""
    if mode not in MODES:
        raise GptjaxError(f"precision {mode!r}; allowed: {', '.join(MODES)}")
    current = precision_of(params)
    if current != "fp32":
        raise GptjaxError(f"params are already {current}; convert from float32 weights")
    if mode == "fp32":
        return dict(params)
    if mode == "bf16":
        return {k: np.asarray(v, ml_dtypes.bfloat16) for k, v in params.items()}
    out: Params = {}
    targets = quantized_keys(config, keep_head)
    for key, value in params.items():
        if key in targets:
            out[key], out[key + SCALE_SUFFIX] = quantize_int8(value, targets[key], group_size)
        else:
            out[key] = np.asarray(value, np.float32)
    return out


def weight_bytes(params: Params) -> int:
    """Bytes the params occupy: the sum of their arrays' nbytes."""
    return sum(np.asarray(v).nbytes for v in params.values())
