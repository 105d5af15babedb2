"""Reduced precision as a conversion step: bfloat16 casts and symmetric int8/int4/fp8 quantisation of canonical params.

int8 weights: each output channel (a column of a Conv1D [in, out] kernel; a row of the [V, D] embedding used
as the LM head) gets one float32 scale = max|w| / 127, values round(w / scale) in [-127, 127]; with a group
size G the scale is per output channel and per group of G inputs. Dequantised values are within scale / 2 of
the original. An all-zero channel gets scale 1 and values 0, so it round-trips exactly.

int4 weights: per output channel and group of G inputs (G in 32, 64, 128), symmetric with all 16 levels as
llama.cpp's q4_0: the value of largest magnitude m in a group maps to -8 exactly (scale = m / -8, signed), the
others to round(w / scale) in [-8, 7]. The values are stored as nibbles q + 8, two per byte along the contracted
axis (the even index in the low nibble, the odd one in the high), so a Conv1D [in, out] kernel is stored
uint8 [in / 2, out] and the [V, D] table uint8 [V, D / 2]; with keep_head the table is int8 per row instead.

fp8 weights: float8_e4m3fn values (1 sign, 4 exponent and 3 mantissa bits, finite up to 448, no infinity) with one
float32 scale = max|w| / 448 per output channel (or group), values w / scale rounded to the nearest e4m3 number:
within 1/16 of each value (2^-4, half a step of 3 mantissa bits), and within scale / 2^10 near zero (subnormals).

Quantised params keep the canonical key of each quantised weight for its int8 values and add
`<key>_scale`; `precision_of` tells the storage of a param dict, and `for_precision` is the conversion step
every backend runs on the params it is given (a run mode of gptjax.precision). CONVERTERS holds the conversion
of float32 params into each storage the registry declares.
"""

from __future__ import annotations

from functools import partial

import ml_dtypes
import numpy as np

from gptjax import precision as registry
from gptjax.config import GPTConfig
from gptjax.errors import GptjaxError
from gptjax.precision import default_kv_cache, storage  # noqa: F401 (re-exported: the names callers knew here)

Params = dict[str, np.ndarray]  # canonical params (gptjax.weights re-exports it; weights builds on this module)
SCALE_SUFFIX = "_scale"  # int8 weights' scales: `<key>_scale`
FP8_MAX = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)  # 448: float8_e4m3fn has no infinity

_SCALED = "/".join(s.name for s in registry.STORAGES.values() if s.scaled)  # "int8/int4/fp8"


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
    a, scale = _symmetric(w, axis, group_size, 127.0)
    return np.clip(np.rint(a), -127, 127).astype(np.int8), scale


def _symmetric(w: np.ndarray, axis: int, group_size: int | None, top: float) -> tuple[np.ndarray, np.ndarray]:
    """w / scale (float32, w's shape) and the float32 scales max|w| / top per output channel (and group of
    group_size inputs along axis); an all-zero channel gets scale 1."""
    w = np.asarray(w, np.float32)
    grouped = _group(w, axis, group_size)  # [..., groups, G, ...] with G at axis + 1
    reduce_axis = axis + 1 if group_size else axis
    amax = np.abs(grouped).max(axis=reduce_axis, keepdims=True)
    scale = np.where(amax > 0, amax / top, 1.0).astype(np.float32)
    return (grouped / scale).reshape(w.shape), np.squeeze(scale, axis=reduce_axis)


def quantize_fp8(w: np.ndarray, axis: int, group_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(float8_e4m3fn values, float32 scales) of w, symmetric, one scale per output channel (and input group):
    scale = max|w| / 448, values w / scale rounded to the nearest e4m3 number (3 mantissa bits: within 1/16 of
    each value, and within scale / 2^10 near zero)."""
    a, scale = _symmetric(w, axis, group_size, FP8_MAX)
    return np.clip(a, -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn), scale  # past 448 the cast gives NaN


def quantize_int4(w: np.ndarray, axis: int, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(packed uint8 values, float32 scales) of w, symmetric, one scale per output channel and group of
    group_size inputs along axis: scale = m / -8 for the group's value m of largest magnitude."""
    w = np.asarray(w, np.float32)
    grouped = _group(w, axis, group_size)  # [..., groups, G, ...] with G at axis + 1
    m = np.take_along_axis(grouped, np.abs(grouped).argmax(axis + 1, keepdims=True), axis + 1)
    scale = np.where(m != 0, m / -8.0, 1.0).astype(np.float32)  # an all-zero group: scale 1, values 0
    q = np.clip(np.rint(grouped / scale), -8, 7).astype(np.int8)
    return pack_int4(q.reshape(w.shape), axis), np.squeeze(scale, axis=axis + 1)


def pack_int4(q: np.ndarray, axis: int) -> np.ndarray:
    """int4 values q in [-8, 7] as uint8 nibbles q + 8, two per byte along axis (even index low): axis halves."""
    q = np.asarray(q)
    if q.shape[axis] % 2:
        raise GptjaxError(f"int4 packing pairs values along axis {axis}, whose length {q.shape[axis]} is odd")
    if q.size and (q.min() < -8 or q.max() > 7):
        raise GptjaxError(f"int4 values must be in [-8, 7], got [{q.min()}, {q.max()}]")
    nibbles = (np.moveaxis(q, axis, -1).astype(np.int16) + 8).astype(np.uint8)  # [..., n]
    packed = nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)  # [..., n / 2]
    return np.ascontiguousarray(np.moveaxis(packed, -1, axis))


def unpack_int4(packed: np.ndarray, axis: int) -> np.ndarray:
    """The int8 values in [-8, 7] of uint8 bytes packed by pack_int4 (axis doubles)."""
    b = np.moveaxis(np.asarray(packed, np.uint8), axis, -1)
    pairs = np.stack([b & 0xF, b >> 4], -1).reshape(*b.shape[:-1], 2 * b.shape[-1])  # [..., 2n]
    return np.moveaxis(pairs.astype(np.int8) - 8, -1, axis).astype(np.int8)


def unpacked(a: np.ndarray, axis: int) -> np.ndarray:
    """The values of stored weights: packed sub-byte ones (int4's uint8) unpacked along axis, others as stored."""
    storage = _scaled_storage(np.asarray(a).dtype)
    return unpack_int4(a, axis) if storage is not None and storage.bits < 8 else a


def dequantize_int4(packed: np.ndarray, scale: np.ndarray, axis: int, group_size: int) -> np.ndarray:
    """float32 values of packed int4 weights with the scales quantize_int4 returned."""
    return dequantize(unpack_int4(packed, axis), scale, axis, group_size)


def dequantize_int8(q: np.ndarray, scale: np.ndarray, axis: int, group_size: int | None = None) -> np.ndarray:
    """float32 values of int8 q with the scales quantize_int8 returned."""
    return dequantize(q, scale, axis, group_size)


def dequantize(q: np.ndarray, scale: np.ndarray, axis: int, group_size: int | None = None) -> np.ndarray:
    """float32 values of (unpacked) scaled values q with their scales, per output channel (and input group)."""
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
    """The storage params are in: the reduced one whose dtype they hold (the last declared first: int4 params
    may hold an int8 head, int8 ones keep float32 too), else "fp32"."""
    dtypes = {np.asarray(v).dtype.name for v in params.values()}
    reduced = [s for s in registry.STORAGES.values() if s.name != "fp32"]
    return next((s.name for s in reversed(reduced) if s.dtype in dtypes), "fp32")


def storage_of(a: np.ndarray) -> registry.Storage:
    """The storage whose values have a's dtype (float32 -> fp32, int8 -> int8, packed int4's uint8 -> int4, ...)."""
    dtype = np.asarray(a).dtype
    found = next((s for s in registry.STORAGES.values() if np.dtype(s.dtype) == dtype), None)
    if found is None:
        raise GptjaxError(f"dtype {dtype} is no storage of gptjax.precision; allowed: "
                          f"{', '.join(s.dtype for s in registry.STORAGES.values())}")
    return found


def _scaled_storage(dtype: np.dtype) -> registry.Storage | None:
    """The scaled storage whose values have this dtype, or None (a float dtype)."""
    return next((s for s in registry.STORAGES.values() if s.scaled and np.dtype(s.dtype) == dtype), None)


def convert(params: Params, config: GPTConfig, mode: str, *, group_size: int | None = None,
            keep_head: bool = False) -> Params:
    """Canonical float params in storage `mode`: bf16 casts every array; int8 quantises the matmul weights (and
    the tied embedding/head unless keep_head) and keeps the rest float32."""
    if mode not in registry.STORAGES:
        raise GptjaxError(f"precision {mode!r}; allowed: {', '.join(registry.STORAGES)}")
    current = precision_of(params)
    if current != "fp32":
        raise GptjaxError(f"params are already {current}; convert from float32 weights")
    if not registry.STORAGES[mode].scaled and (group_size is not None or keep_head):
        raise GptjaxError(f"group_size/keep_head apply to {_SCALED} quantisation, not to {mode}")
    return CONVERTERS[mode](params, config, group_size, keep_head)


def _to_bf16(params: Params, config: GPTConfig, group_size: None, keep_head: bool) -> Params:
    """Every array cast to bfloat16."""
    return {k: np.asarray(v, ml_dtypes.bfloat16) for k, v in params.items()}


def _to_scaled(storage: str, params: Params, config: GPTConfig, group_size: int | None, keep_head: bool) -> Params:
    """The matmul weights quantised by the storage's quantiser (values + `<key>_scale`, per output channel and group
    of G inputs), the tied embedding/head in the storage's head_storage under keep_head (float32 or another scaled
    storage, per row), the rest float32."""
    G = registry.group_size(storage, group_size, (config.n_embd, config.mlp_width))  # int4: its default if None
    head = registry.STORAGES[storage].head_storage
    out: Params = {}
    targets = quantized_keys(config)
    for key, value in params.items():
        axis = targets.get(key)
        into, groups = (head, None) if keep_head and axis == 1 else (storage, G)  # axis 1: the [V, D] table
        if axis is None or into not in QUANTISERS:
            out[key] = np.asarray(value, np.float32)
        else:
            out[key], out[key + SCALE_SUFFIX] = QUANTISERS[into](value, axis, groups)
    return out


def stored_shape(config: GPTConfig, key: str, shape: tuple[int, ...], dtype: np.dtype) -> tuple[int, ...]:
    """The shape params[key] has in its storage: a packed (sub-byte: int4's uint8) matmul weight shrinks its
    contracted axis (int4: halves it)."""
    axis, storage = quantized_keys(config).get(key), _scaled_storage(np.dtype(dtype))
    if axis is None or storage is None or storage.bits >= 8:
        return tuple(shape)
    return tuple(n * storage.bits // 8 if i == axis else n for i, n in enumerate(shape))


# each scaled storage of gptjax.precision: w, the axis its matmul contracts, group size -> (values, float32 scales)
QUANTISERS = {"int8": quantize_int8, "int4": quantize_int4, "fp8": quantize_fp8}
# float32 params -> each storage of gptjax.precision: f(params, config, group_size, keep_head)
CONVERTERS = {"fp32": lambda params, *_: dict(params), "bf16": _to_bf16,
              **{name: partial(_to_scaled, name) for name in QUANTISERS}}


def for_precision(params: Params, config: GPTConfig, precision: str, *, group_size: int | None = None,
                  keep_head: bool = False) -> Params:
    """params as `precision` runs them: float32 weights are converted; weights already in that storage (a
    quantised checkpoint) are used as they are, never quantised twice; other combinations are an error."""
    target, current = storage(precision), precision_of(params)
    scaled = registry.STORAGES[target].scaled
    if not scaled and (group_size is not None or keep_head):
        raise GptjaxError(f"group_size/keep_head apply to {_SCALED} quantisation, not to {target}")
    if current == target:
        if scaled and (group_size is not None or keep_head):
            raise GptjaxError("group_size/keep_head apply when quantising float32 weights; these params are "
                              f"already {target} (a quantised checkpoint) and are used as stored")
        return params
    if current != "fp32":
        raise GptjaxError(f"params are {current}; run them with precision="
                          f"{' or '.join(repr(m) for m in registry.MODES if storage(m) == current)} "
                          f"(precision={precision!r} needs float32 weights)")
    return convert(params, config, target, group_size=group_size, keep_head=keep_head)


def check_quantized(config: GPTConfig, params: Params, shapes: dict[str, tuple[int, ...]]) -> None:
    """Raise naming the first scaled (int8/int4...) weight without a valid scale (or stray scale) in quantised
    params."""
    for key, value in params.items():
        storage = _scaled_storage(np.asarray(value).dtype)
        if storage is None or (key.endswith(SCALE_SUFFIX) and key[: -len(SCALE_SUFFIX)] in shapes):
            continue
        if key not in quantized_keys(config):
            raise GptjaxError(f"param {key!r} is {storage.dtype}, but only matmul weights may be quantised")
        if key + SCALE_SUFFIX not in params:
            raise GptjaxError(f"param {key!r} is {_kind(storage)} but {key + SCALE_SUFFIX!r} (its scales) is missing")
    for key in params:
        if key.endswith(SCALE_SUFFIX) and key[: -len(SCALE_SUFFIX)] in shapes:
            _check_scale(config, params, key, shapes)


def _check_scale(config: GPTConfig, params: Params, key: str, shapes: dict[str, tuple[int, ...]]) -> None:
    """A `<weight>_scale`: float32 [out] or [groups, out] ([out, groups] for a table), groups dividing the input
    width (a packed storage's among INT4_GROUP_SIZES), for a scaled matmul weight."""
    weight = key[: -len(SCALE_SUFFIX)]
    axis = quantized_keys(config).get(weight)
    scale, storage = np.asarray(params[key]), _scaled_storage(np.asarray(params[weight]).dtype)
    if axis is None or storage is None:
        raise GptjaxError(f"param {key!r} is a scale, but {weight!r} is not an {_SCALED} matmul weight")
    out, width = shapes[weight][1 - axis], shapes[weight][axis]
    groups = scale.size // out if scale.size % out == 0 else 0
    allowed = [(groups, out) if axis == 0 else (out, groups)] + ([(out,)] if groups == 1 else [])
    if scale.dtype != np.float32 or not groups or width % groups or scale.shape not in allowed:
        raise GptjaxError(f"param {key!r} has shape {scale.shape} and dtype {scale.dtype}; expected float32 "
                          f"[{out}] (per channel) or groups dividing {width}")
    if storage.bits < 8 and width // groups not in registry.INT4_GROUP_SIZES:
        raise GptjaxError(f"param {key!r}: {storage.name} groups of {width // groups} inputs; allowed: "
                          f"{', '.join(map(str, registry.INT4_GROUP_SIZES))}")


def _kind(storage: registry.Storage) -> str:
    return storage.name if storage.bits == 8 else f"{storage.name} (packed {storage.dtype})"


def weight_bytes(params: Params) -> int:
    """Bytes the params occupy: the sum of their arrays' nbytes."""
    return sum(np.asarray(v).nbytes for v in params.values())
