"""The train step as pure functions over a (parameters, optimizer state, step) pytree: the optimizer, the loss,
gradients summed over micro-batches, the update, and the jitted step that strings them together.

The model is the JAX backend's Flax NNX GPT (layers unrolled by default: 2,367 vs 2,034 tokens/s scanned on
the 6L/384 benchmark shape here; `scan_layers=True` keeps compile time flat for deep models); `nnx.split`
gives the graph (static) and the parameters (a pytree the optimizer and orbax handle).
Weights stay float32 (the master copy, as does the AdamW state); with compute_dtype="bf16" the forward and
backward passes run on a bfloat16 copy of them, with LayerNorm statistics, softmax and logits in float32, their
matmuls on gptjax's CPU bf16 kernel where it runs (backends/jax/bf16_train.py), else in XLA's dots. The gradients
are the copy's, bfloat16, until the update reads them (summed in float32 over micro-batches when there are several).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from gptjax import precision as registry
from gptjax.backends.jax import GPT, adamw, to_params
from gptjax.backends.jax.bf16_train import training_layers
from gptjax.config import GPTConfig
from gptjax.errors import GptjaxError
from gptjax.quantize import precision_of
from gptjax.sharding import check_config, shard_state
from gptjax.train.config import TrainConfig
from gptjax.weights import Params, init_params

_DECAYED = ("kernel", "embedding", "wpe")  # matrices (wte and lm_head are Embedding.embedding); not biases or LN


class TrainState(NamedTuple):
    """Everything a step changes: float32 parameters, optimizer state, step count (a pure pytree)."""

    params: Any
    opt_state: Any
    step: jax.Array


class StepMetrics(NamedTuple):
    """What one train step reports (device scalars)."""

    loss: jax.Array
    grad_norm: jax.Array
    lr: jax.Array
    finite: jax.Array
    aux: Any = None  # an objective's extra scalars (its loss's aux dict, averaged over micro-batches)


# ---- the optimizer and the state -----------------------------------------------------------------------------
def make_optimizer(tc: TrainConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Global-norm clipping, then AdamW (decay on matrices only) on a warm-up + cosine schedule."""
    warmup = min(tc.warmup_steps, tc.max_steps - 1)
    schedule = optax.warmup_cosine_decay_schedule(0.0, tc.lr, warmup, max(tc.max_steps, warmup + 1), tc.min_lr)
    return optax.chain(optax.clip_by_global_norm(tc.grad_clip) if tc.grad_clip else optax.identity(),
                       optax.adamw(schedule, tc.beta1, tc.beta2, weight_decay=tc.weight_decay,
                                   mask=decayed)), schedule


def decayed(params: Any) -> Any:
    """The tree of bools saying which parameters take weight decay (the matrices, by leaf name)."""
    return jax.tree_util.tree_map_with_path(lambda path, _: _leaf_name(path) in _DECAYED, params)


def _leaf_name(path: tuple) -> str:
    names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
    names = [n for n in names if isinstance(n, str) and n != "value"]
    return names[-1] if names else ""


def create_state(config: GPTConfig, tc: TrainConfig, params: Params | None = None, mesh: Any = None
                 ) -> tuple[Any, TrainState]:
    """(graphdef, state) for training from canonical params (GPT-2 init with tc.seed if None); with a mesh,
    parameters and optimizer state are sharded by their logical axes (FSDP, tensor parallel)."""
    stored = None if params is None else precision_of(params)
    if stored is not None and registry.STORAGES[stored].scaled:
        raise GptjaxError(f"params are {stored} (a quantised checkpoint): training needs float weights; start from "
                          "the float checkpoint it was quantised from")
    model = GPT(config, params if params is not None else init_params(config, tc.seed), scan_layers=tc.scan_layers,
                layers=training_layers(tc.compute_dtype, mesh))  # bf16 compute: on gptjax's CPU kernels where they run
    graphdef, weights = nnx.split(model)
    weights = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), weights)
    if mesh is not None:
        check_config(config, mesh)
        weights = shard_state(weights, mesh)
    optimizer, _ = make_optimizer(tc)
    return graphdef, TrainState(weights, optimizer.init(weights), jnp.int32(0))


def export_params(graphdef: Any, weights: Any) -> Params:
    """Canonical GPT-2 params of a training state, for save_checkpoint and the inference backends (gathered
    from every process when the state is sharded across hosts)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        weights = multihost_utils.process_allgather(weights, tiled=True)
    return to_params(nnx.merge(graphdef, weights))


# ---- the loss ------------------------------------------------------------------------------------------------
def train_logits(weights: Any, graphdef: Any, inputs: jax.Array, compute_dtype: str = "fp32", dropout: float = 0.0,
                 key: jax.Array | None = None) -> jax.Array:
    """The training forward pass: float32 logits [B, T, V] of inputs [B, T] (bf16 compute on a bfloat16 copy)."""
    return nnx.merge(graphdef, compute_copy(weights, compute_dtype))(inputs, dropout=dropout, key=key)


def compute_copy(weights: Any, compute_dtype: str) -> Any:
    """The weights a training pass computes with: the float32 weights themselves, or their bfloat16 copy (bf16
    compute; a copy already bfloat16 is returned as is)."""
    return jax.tree.map(lambda w: w.astype(jnp.bfloat16), weights) if compute_dtype == "bf16" else weights


def loss_fn(weights: Any, graphdef: Any, inputs: jax.Array, targets: jax.Array, compute_dtype: str = "fp32",
            dropout: float = 0.0, key: jax.Array | None = None) -> jax.Array:
    """Mean next-token cross-entropy (nats) of targets [B, T] given inputs [B, T]."""
    logits = train_logits(weights, graphdef, inputs, compute_dtype, dropout, key)  # float32 [B, T, V]
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


# ---- one step: gradients over the micro-batches, then the update ---------------------------------------------
def _gradients(loss: Callable[..., Any], graphdef: Any, tc: TrainConfig, state: TrainState, inputs: jax.Array,
               targets: Any, has_aux: bool) -> tuple[jax.Array, Any, Any]:
    """(mean loss, gradients, aux [A]) of `loss` over the micro-batches inputs [A, B, T] and targets (leading A)."""
    key = jax.random.fold_in(jax.random.key(tc.seed), state.step)
    grad = jax.value_and_grad(loss, has_aux=has_aux)
    weights = compute_copy(state.params, tc.compute_dtype)  # differentiated as is: bf16 compute, bf16 gradients

    def micro(i: jax.Array, x: jax.Array, y: Any) -> tuple:
        k = jax.random.fold_in(key, i) if tc.dropout else None
        out, g = grad(weights, graphdef, x, y, tc.compute_dtype, tc.dropout, k)
        value, aux = out if has_aux else (out, None)
        return value, g, aux

    A = inputs.shape[0]
    if A == 1:  # no accumulator: the gradients stay in the pass's dtype up to the update
        value, grads, aux = micro(jnp.int32(0), inputs[0], jax.tree.map(lambda t: t[0], targets))
        return value, grads, jax.tree.map(lambda a: a[None], aux)

    def body(acc: tuple, xs: tuple) -> tuple:  # summed in float32 over the micro-batches
        value, g, aux = micro(*xs)
        return (acc[0] + value, jax.tree.map(lambda a, b: a + b.astype(a.dtype), acc[1], g)), aux

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    (total, grads), aux = jax.lax.scan(body, (jnp.float32(0), zeros), (jnp.arange(A), inputs, targets))
    return total / A, jax.tree.map(lambda g: g / A, grads), aux


def _update(tc: TrainConfig, state: TrainState, grads: Any, grad_norm: jax.Array, finite: jax.Array
            ) -> TrainState:
    """The AdamW update of state by grads; a non-finite step leaves parameters and optimizer state as they were."""
    optimizer, schedule = make_optimizer(tc)
    if adamw.runs_on_kernels(state.params):  # optax's update in one kernel call per parameter (CPU, no mesh)
        params, opt_state = adamw.fused_update(tc, schedule, grads, grad_norm, finite, state.params, state.opt_state,
                                               decayed(state.params))
        return TrainState(params, opt_state, state.step + 1)
    grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)  # optax updates float32 weights by float32
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    keep = partial(jax.tree.map, lambda new, old: jnp.where(finite, new, old))
    return TrainState(keep(params, state.params), keep(opt_state, state.opt_state), state.step + 1)


def _train_step(loss: Callable[..., jax.Array], graphdef: Any, tc: TrainConfig, state: TrainState,
                inputs: jax.Array, targets: Any, has_aux: bool = False) -> tuple[TrainState, StepMetrics]:
    """One optimizer update minimising `loss` (loss_fn's signature) from grad_accum micro-batches [A, B, T]
    (targets: [A, B, T], or any pytree with that leading A an objective's loss takes; with has_aux the loss
    returns (loss, dict of scalars), averaged into metrics.aux).
    A non-finite loss or gradient norm leaves the state unchanged except the step count."""
    value, grads, aux = _gradients(loss, graphdef, tc, state, inputs, targets, has_aux)
    grad_norm = optax.tree.norm(jax.tree.map(lambda g: g.astype(jnp.float32), grads))
    finite = jnp.isfinite(value) & jnp.isfinite(grad_norm)
    _, schedule = make_optimizer(tc)
    metrics = StepMetrics(value, grad_norm, schedule(state.step), finite, jax.tree.map(lambda a: a.mean(0), aux))
    return _update(tc, state, grads, grad_norm, finite), metrics


def make_train_step(loss: Callable[..., jax.Array] = loss_fn, has_aux: bool = False
                    ) -> Callable[..., tuple[TrainState, StepMetrics]]:
    """The jitted step train_step(graphdef, tc, state, inputs, targets) -> (state, metrics) for an objective
    with loss_fn's signature (the state is donated: its buffers are reused for the new one)."""
    return jax.jit(partial(_train_step, loss, has_aux=has_aux), static_argnames=("graphdef", "tc"),
                   donate_argnames=("state",))


train_step = make_train_step()  # the step `gptjax train` takes: next-token cross-entropy
