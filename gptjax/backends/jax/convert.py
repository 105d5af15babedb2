"""The conversion step of the JAX backend: params in a run mode's storage (gptjax.quantize.for_precision) ->
the NNX model built with that mode's weight modules, split into a graph definition and device arrays.

Whether gptjax's CPU kernels run is decided here, once (`cpu_kernels_for`): they read out-major bfloat16, int8
and packed int4 weights, run the causal self-attention of a pass without a cache (every mode, float32 included)
and, during decode, read bfloat16 and int8 KV caches (kv.KV_LAYERS); everything else, and every platform or mesh
where they cannot run, keeps XLA's dots. The model itself never asks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from flax import nnx

from gptjax.backends import cpu_kernels
from gptjax.backends.jax.layers import (
    Int4Dense, Int4Embedding, Int8Dense, Int8Embedding, KernelEmbedding, KernelInt4Embedding, KernelInt8Embedding,
    KernelPositions, OutMajorDense, OutMajorInt4Dense, OutMajorInt8Dense, OutMajorW8A8Dense, W8A8Dense,
)
from gptjax.backends.jax.model import GPT, Embedding, FloatLayers
from gptjax.config import GPTConfig
from gptjax.precision import STORAGES
from gptjax.quantize import SCALE_SUFFIX
from gptjax.sharding import shard_state
from gptjax.weights import Params


@dataclass(frozen=True)
class Fp32Layers(FloatLayers):
    """float32 kernels and tables under XLA's dots; on gptjax's CPU kernels, the causal self-attention without a
    cache (prefill, scoring) is the kernel's (cpu_kernels.causal_attention). Every mode's layers derive from it."""

    cpu_kernels: bool = False

    def attention(self) -> Any:
        return cpu_kernels.causal_attention if self.cpu_kernels else super().attention()


@dataclass(frozen=True)
class Bf16Layers(Fp32Layers):
    """bfloat16 kernels and tables: XLA's dots, or out-major on gptjax's CPU kernels (unstacked layers)."""

    def dense(self, p: dict[str, Any], key: str, axes: tuple[str | None, ...], shape: tuple[int, ...], n_out: int
              ) -> nnx.Module:
        if self.cpu_kernels and p[key].ndim == 2:  # not stacked
            return OutMajorDense(p[key].reshape(shape), n_out)
        return super().dense(p, key, axes, shape, n_out)

    def embedding(self, p: dict[str, Any], key: str, axes: tuple[str | None, ...]) -> nnx.Module:
        return (KernelEmbedding if self.cpu_kernels else Embedding)(p[key], axes)

    def positions(self) -> nnx.Module:
        return KernelPositions() if self.cpu_kernels else super().positions()


@dataclass(frozen=True)
class Int8Layers(Fp32Layers):
    """int8 kernels with float32 scales [*lead, G, *out], weight-only: XLA's formulations (lowp.py), or
    out-major on gptjax's CPU kernels (unstacked layers). A table without scales (keep_head) stays float."""

    xla = Int8Dense
    out_major = OutMajorInt8Dense

    def dense(self, p: dict[str, Any], key: str, axes: tuple[str | None, ...], shape: tuple[int, ...], n_out: int
              ) -> nnx.Module:
        w = p[key]
        lead = w.shape[:-2]  # stacked layers
        scale = p[key + SCALE_SUFFIX].reshape(*lead, -1, *shape[-n_out:])  # [*lead, G, *out]
        if self.cpu_kernels and not lead:
            return self.out_major(w.reshape(shape), scale, n_out)
        return self.xla(w.reshape(*lead, *shape), scale, axes, n_out)

    def embedding(self, p: dict[str, Any], key: str, axes: tuple[str | None, ...]) -> nnx.Module:
        if key + SCALE_SUFFIX not in p:
            return super().embedding(p, key, axes)
        return (KernelInt8Embedding if self.cpu_kernels else Int8Embedding)(p[key], p[key + SCALE_SUFFIX], axes)


@dataclass(frozen=True)
class W8A8Layers(Int8Layers):
    """The int8 kernels with dynamically quantised int8 activations (the tied head stays weight-only)."""

    xla = W8A8Dense
    out_major = OutMajorW8A8Dense


@dataclass(frozen=True)
class Int4Layers(Int8Layers):
    """Packed int4 kernels [*lead, I/2, O] with float32 scales [*lead, G, O], weight-only: XLA's formulation
    (lowp.int4_matmul), or out-major [O, I/2] on gptjax's CPU int4 kernel (unstacked layers). The table is int4
    too, or int8 per row (keep_head: Int8Layers' modules)."""

    def dense(self, p: dict[str, Any], key: str, axes: tuple[str | None, ...], shape: tuple[int, ...], n_out: int
              ) -> nnx.Module:
        w = p[key]
        scale = p[key + SCALE_SUFFIX].reshape(*w.shape[:-2], -1, w.shape[-1])  # [*lead, G, O]
        if self.cpu_kernels and w.ndim == 2:
            return OutMajorInt4Dense(w, scale)
        return Int4Dense(w, scale, axes)

    def embedding(self, p: dict[str, Any], key: str, axes: tuple[str | None, ...]) -> nnx.Module:
        if np.asarray(p[key]).dtype != np.uint8:  # keep_head: an int8 table
            return super().embedding(p, key, axes)
        return (KernelInt4Embedding if self.cpu_kernels else Int4Embedding)(p[key], p[key + SCALE_SUFFIX], axes)


# The weight modules of each run mode of gptjax.precision, given the CPU-kernel choice.
LAYERS: dict[str, Any] = {"fp32": Fp32Layers, "bf16": Bf16Layers, "int8": Int8Layers, "w8a8": W8A8Layers,
                          "int4": Int4Layers}


@dataclass(frozen=True)
class JaxWeights:
    """A converted model: NNX graph definition + its state (device arrays), the config it was built for, and
    whether gptjax's CPU kernels run it (and read its KV caches)."""

    graphdef: Any
    state: Any
    config: GPTConfig
    cpu_kernels: bool = False


def cpu_kernels_for(mesh: Any) -> bool:
    """gptjax's CPU kernels (cpu_kernels.status()) on one CPU device, else XLA's dots."""
    return mesh is None and cpu_kernels.available()


def build(config: GPTConfig, params: Params, precision: str, *, cpu_kernels: bool = False,
          scan_layers: bool = False) -> GPT:
    """The model of params already in precision's storage (gptjax.quantize.for_precision)."""
    return GPT(config, params, scan_layers=scan_layers, layers=LAYERS[precision](cpu_kernels))


def jax_weights(config: GPTConfig, params: Params, precision: str, mesh: Any = None) -> JaxWeights:
    """Params in precision's storage as a split model on device, placed on the mesh if given."""
    kernels = cpu_kernels_for(mesh)
    kept = {k: np.asarray(v) if _is_stored(v) else np.asarray(v, np.float32) for k, v in params.items()}
    graphdef, state = nnx.split(build(config, kept, precision, cpu_kernels=kernels))
    if mesh is not None:
        state = shard_state(state, mesh)
    return JaxWeights(graphdef, state, config, kernels)


def _is_stored(a: Any) -> bool:
    """Arrays in a storage dtype of gptjax.precision are kept as they are; other floats become float32."""
    return np.asarray(a).dtype.name in {s.dtype for s in STORAGES.values()}
