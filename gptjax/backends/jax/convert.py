"""The conversion step of the JAX backend: params in a run mode's storage (gptjax.quantize.for_precision) ->
the NNX model built with that mode's weight modules, split into a graph definition and device arrays.

The weight modules come from one factory, ModeLayers, driven by the mode's registry entry (gptjax.precision.Mode):
each weight's storage (read off its dtype), the mode's activations (compute_dtype, and per_token_above for long
passes) and the CPU-kernel choice select a formulation in lowp.FORMULATIONS; float weights become model.py's
modules, scaled ones a ScaledDense / ScaledTable (layers.py). A new weight-only storage needs no code here.

Whether gptjax's CPU kernels run is decided here, once (`cpu_kernels_for`): they read out-major bfloat16, int8
and packed int4 weights, run the causal self-attention of a pass without a cache (every mode, float32 included)
and, during decode, read bfloat16 and int8 KV caches (kv.KV_FORMATS); everything else, and every platform or mesh
where they cannot run, keeps XLA's dots. The model itself never asks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from flax import nnx

from gptjax.backends import cpu_kernels
from gptjax.backends.jax import lowp
from gptjax.backends.jax.layers import OutMajorDense, ScaledDense, ScaledTable, out_major
from gptjax.backends.jax.model import GPT, Dense, Embedding, FloatLayers, Positions
from gptjax.config import GPTConfig
from gptjax.precision import MODES, PER_TOKEN, STORAGES, Mode, mode
from gptjax.quantize import SCALE_SUFFIX, storage_of
from gptjax.sharding import shard_state
from gptjax.weights import Params

Axes = tuple[str | None, ...]
WEIGHT_ONLY = "fp32"  # a scaled token table's activations, whatever the mode's (Mode: the head stays weight-only)


@dataclass(frozen=True)
class ModeLayers(FloatLayers):
    """The weight modules of a run mode, from its registry entry: each weight's stored values (+ scales) and the
    formulation lowp.formulation gives for (its storage, the mode's activations, the CPU-kernel choice). On gptjax's
    CPU kernels, the causal self-attention without a cache (prefill, scoring) is the kernel's too."""

    mode: Mode = MODES["fp32"]
    cpu_kernels: bool = False

    def attention(self) -> Any:
        return cpu_kernels.causal_attention if self.cpu_kernels else super().attention()

    def dense(self, p: dict[str, Any], key: str, axes: Axes, shape: tuple[int, ...], n_out: int) -> nnx.Module:
        w, scale = p[key], p.get(key + SCALE_SUFFIX)
        kernels = self.cpu_kernels and w.ndim == 2  # out-major weights only on unstacked layers
        if scale is None:
            f = self._float(w, kernels)
            if f.out_major:
                return OutMajorDense(out_major(w.reshape(shape), n_out), f.dense)
            return Dense(w.reshape(*w.shape[:-2], *shape), axes, n_out, dot=f.dense)
        return self._scaled_dense(w, scale, axes, shape, n_out, kernels)

    def _scaled_dense(self, w: Any, scale: Any, axes: Axes, shape: tuple[int, ...], n_out: int, kernels: bool
                      ) -> ScaledDense:
        """Values [*lead, *shape] (packed: [*lead, I/2, O], unsplit) with scales [*lead, G, *out]."""
        storage, lead = storage_of(w), w.shape[:-2]
        if storage.bits < 8:  # a packed pair of inputs cannot be split by head
            shape, n_out, axes = w.shape[-2:], 1, (*axes[:len(lead)], None, None)
        f = lowp.formulation(storage, self.mode.compute_dtype, kernels)
        above = self.mode.per_token_above
        prefill = None if above is None else lowp.formulation(storage, PER_TOKEN, kernels)
        if prefill is not None and prefill.out_major != f.out_major:
            raise ValueError(f"{storage.name}: the {PER_TOKEN} and {self.mode.compute_dtype} formulations store their "
                             "weights in different layouts")
        scale = scale.reshape(*lead, -1, *shape[-n_out:])  # [*lead, G, *out]
        matmuls = (f.dense, prefill and prefill.dense, above)
        if f.out_major:
            return ScaledDense(out_major(w.reshape(shape), n_out), out_major(scale, n_out), (None, None), 1, *matmuls)
        return ScaledDense(w.reshape(*lead, *shape), scale, axes, n_out, *matmuls)

    def embedding(self, p: dict[str, Any], key: str, axes: Axes) -> nnx.Module:
        table, scale = p[key], p.get(key + SCALE_SUFFIX)
        if scale is None:
            f = self._float(table, self.cpu_kernels)
            return Embedding(table, axes, head_dot=f.head, lookup=f.lookup)
        storage = storage_of(table)  # the mode's, or its head_storage (keep_head)
        f = lowp.formulation(storage, WEIGHT_ONLY, self.cpu_kernels)
        return ScaledTable(table, scale, axes if storage.bits == 8 else (axes[0], None), f.lookup, f.head)

    def positions(self, table: Any) -> nnx.Module:
        return Positions(self._float(table, self.cpu_kernels).lookup)

    def _float(self, w: Any, kernels: bool) -> lowp.Formulation:
        storage = storage_of(w)  # a float storage computes in its own dtype
        return lowp.formulation(storage, storage.name, kernels)


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
    return GPT(config, params, scan_layers=scan_layers, layers=ModeLayers(mode(precision), cpu_kernels))


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
