"""Training: the loss, a jitted train step over a pure (params, optimizer state, step) pytree, evaluation,
and the loop behind `gptjax train` with orbax checkpoints, exact resume and TensorBoard logs.

The model is the JAX backend's Flax NNX GPT (layers unrolled by default: 2,367 vs 2,034 tokens/s scanned on
the 6L/384 benchmark shape here; `scan_layers=True` keeps compile time flat for deep models); `nnx.split`
gives the graph (static) and the parameters (a pytree the optimizer and orbax handle).
Weights stay float32 (the master copy, as does the AdamW state); with compute_dtype="bf16" the forward and
backward passes run on a bfloat16 copy of them, with LayerNorm statistics, softmax and logits in float32, their
matmuls on gptjax's CPU bf16 kernel where it runs (backends/jax/bf16_train.py), else in XLA's dots. The gradients
are the copy's, bfloat16, until the update reads them (summed in float32 over micro-batches when there are several).
"""

from __future__ import annotations

import dataclasses
import errno
import gc
import glob
import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from opentelemetry import trace
from tqdm import tqdm

from gptjax import data
from gptjax import precision as registry
from gptjax.backends import get_backend
from gptjax.backends.jax import GPT, adamw, to_params
from gptjax.backends.jax.bf16_train import training_layers
from gptjax.bench.ceilings import matmul_flops
from gptjax.config import GPTConfig
from gptjax.errors import GptjaxError, os_cause
from gptjax.quantize import precision_of
from gptjax.sampling import SamplingParams
from gptjax.sharding import check_config, check_divisible, logical_to_spec, mesh_description, shard_batch, shard_state
from gptjax.tokenizer import has_tokenizer
from gptjax.tracing import forward_span, record_error, start_parent
from gptjax.weights import Params, init_params, load_checkpoint, load_config, save_checkpoint

log = logging.getLogger("gptjax.train")

_DECAYED = ("kernel", "embedding", "wpe")  # matrices (wte and lm_head are Embedding.embedding); not biases or LN


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and run settings; validated at construction (names match `key=value` overrides)."""

    batch_size: int = 32
    seq_len: int | None = None  # None: the model's context
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 30
    max_steps: int = 300
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    dropout: float = 0.0
    compute_dtype: str = "fp32"
    eval_every: int = 100
    eval_batches: int = 8
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    val_fraction: float = 0.05
    tokenizer: str = "byte"
    scan_layers: bool = False  # True: lax.scan over stacked layers (flat compile time; 14% slower here)

    def __post_init__(self) -> None:
        for name in ("batch_size", "grad_accum", "max_steps", "eval_every", "eval_batches", "checkpoint_every",
                     "keep_checkpoints", "log_every"):
            _require(name, getattr(self, name), lambda v: isinstance(v, int) and v >= 1, "an integer >= 1")
        _require("seq_len", self.seq_len, lambda v: v is None or (isinstance(v, int) and v >= 1),
                 "an integer >= 1 (or unset: the model's context)")
        for name in ("warmup_steps", "seed"):
            _require(name, getattr(self, name), lambda v: isinstance(v, int) and v >= 0, "an integer >= 0")
        for name in ("lr", "min_lr", "weight_decay", "grad_clip"):
            _require(name, getattr(self, name), lambda v: _is_num(v) and v >= 0, "a number >= 0")
        for name in ("beta1", "beta2", "dropout"):
            _require(name, getattr(self, name), lambda v: _is_num(v) and 0 <= v < 1, "a number in [0, 1)")
        _require("val_fraction", self.val_fraction, lambda v: _is_num(v) and 0 < v < 1, "a number in (0, 1)")
        _require("compute_dtype", self.compute_dtype, lambda v: v in registry.training_modes(),
                 " or ".join(repr(m) for m in registry.training_modes()))


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _require(name: str, value: Any, ok: Callable[[Any], bool], rule: str) -> None:
    if isinstance(value, bool) or not ok(value):
        raise GptjaxError(f"{name}={value!r} must be {rule}")


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


def _train_step(loss: Callable[..., jax.Array], graphdef: Any, tc: TrainConfig, state: TrainState,
                inputs: jax.Array, targets: Any, has_aux: bool = False) -> tuple[TrainState, StepMetrics]:
    """One optimizer update minimising `loss` (loss_fn's signature) from grad_accum micro-batches [A, B, T]
    (targets: [A, B, T], or any pytree with that leading A an objective's loss takes; with has_aux the loss
    returns (loss, dict of scalars), averaged into metrics.aux).
    A non-finite loss or gradient norm leaves the state unchanged except the step count."""
    optimizer, schedule = make_optimizer(tc)
    key = jax.random.fold_in(jax.random.key(tc.seed), state.step)
    grad = jax.value_and_grad(loss, has_aux=has_aux)
    weights = compute_copy(state.params, tc.compute_dtype)  # differentiated as is: bf16 compute, bf16 gradients

    def micro(i: jax.Array, x: jax.Array, y: Any) -> tuple:
        k = jax.random.fold_in(key, i) if tc.dropout else None
        out, g = grad(weights, graphdef, x, y, tc.compute_dtype, tc.dropout, k)
        loss, aux = out if has_aux else (out, None)
        return loss, g, aux

    A = inputs.shape[0]
    if A == 1:  # no accumulator: the gradients stay in the pass's dtype up to the update
        loss, grads, aux = micro(jnp.int32(0), inputs[0], jax.tree.map(lambda t: t[0], targets))
        aux = jax.tree.map(lambda a: a[None], aux)
    else:  # summed in float32 over the micro-batches
        def body(acc: tuple, xs: tuple) -> tuple:
            loss, g, aux = micro(*xs)
            return (acc[0] + loss, jax.tree.map(lambda a, b: a + b.astype(a.dtype), acc[1], g)), aux

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        (loss, grads), aux = jax.lax.scan(body, (jnp.float32(0), zeros), (jnp.arange(A), inputs, targets))
        loss, grads = loss / A, jax.tree.map(lambda g: g / A, grads)
    grad_norm = optax.tree.norm(jax.tree.map(lambda g: g.astype(jnp.float32), grads))
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    if adamw.runs_on_kernels(state.params):  # optax's update in one kernel call per parameter (CPU, no mesh)
        params, opt_state = adamw.fused_update(tc, schedule, grads, grad_norm, finite, state.params, state.opt_state,
                                               decayed(state.params))
        new_state = TrainState(params, opt_state, state.step + 1)
    else:
        grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)  # optax updates float32 weights by float32
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        keep = partial(jax.tree.map, lambda new, old: jnp.where(finite, new, old))
        new_state = TrainState(keep(params, state.params), keep(opt_state, state.opt_state), state.step + 1)
    aux = jax.tree.map(lambda a: a.mean(0), aux)  # [A] per micro-batch -> their mean
    return new_state, StepMetrics(loss, grad_norm, schedule(state.step), finite, aux)


def make_train_step(loss: Callable[..., jax.Array] = loss_fn, has_aux: bool = False
                    ) -> Callable[..., tuple[TrainState, StepMetrics]]:
    """The jitted step train_step(graphdef, tc, state, inputs, targets) -> (state, metrics) for an objective
    with loss_fn's signature (the state is donated: its buffers are reused for the new one)."""
    return jax.jit(partial(_train_step, loss, has_aux=has_aux), static_argnames=("graphdef", "tc"),
                   donate_argnames=("state",))


train_step = make_train_step()  # the step `gptjax train` takes: next-token cross-entropy


def step_function(step: int) -> Callable[..., tuple[TrainState, StepMetrics]]:
    """The jitted step the loop takes as its 1-based step `step`: train_step. The tests' seam: they replace
    this function (monkeypatch) to make chosen steps non-finite, outside the step itself."""
    return train_step


@partial(jax.jit, static_argnames=("graphdef",))
def eval_loss(graphdef: Any, weights: Any, inputs: jax.Array, targets: jax.Array) -> jax.Array:
    """Summed cross-entropy (nats) over a batch, for exact averaging across batches."""
    logits = nnx.merge(graphdef, weights)(inputs)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).sum()


def evaluate(graphdef: Any, weights: Any, batches: Iterator[tuple[np.ndarray, np.ndarray]]) -> tuple[float, int]:
    """(mean loss in nats/token, tokens scored) over the batches."""
    total, n = 0.0, 0
    for x, y in batches:
        total += float(eval_loss(graphdef, weights, x, y))
        n += y.size
    return total / max(n, 1), n


def evaluate_params(config: GPTConfig, params: Params, batches: Iterator[tuple[np.ndarray, np.ndarray]]
                    ) -> tuple[float, int]:
    """evaluate()'s (mean loss, tokens scored) of canonical params (a checkpoint's), from the JAX backend's
    score (in the precision the params are stored in) of each window: inputs [B, T] and their last target,
    for targets [B, T] that are the inputs shifted by one (as data.eval_batches gives them)."""
    backend = get_backend("jax", config, precision=precision_of(params))
    weights = backend.prepare(params)
    total, n = 0.0, 0
    for x, y in batches:
        if x.shape != y.shape or not np.array_equal(x[:, 1:], y[:, :-1]):
            raise GptjaxError(f"evaluate_params needs targets that are the inputs shifted by one, got inputs "
                              f"{x.shape} and targets {y.shape} that are not")
        windows = np.concatenate([x, y[:, -1:]], axis=1)  # [B, T + 1]
        total -= sum(s.total() for s in backend.score(weights, windows))
        n += y.size
    return total / max(n, 1), n


def export_params(graphdef: Any, weights: Any) -> Params:
    """Canonical GPT-2 params of a training state, for save_checkpoint and the inference backends (gathered
    from every process when the state is sharded across hosts)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        weights = multihost_utils.process_allgather(weights, tiled=True)
    return to_params(nnx.merge(graphdef, weights))


def config_from_overrides(config: GPTConfig, tc: TrainConfig, overrides: list[str]
                          ) -> tuple[GPTConfig, TrainConfig]:
    """Apply `key=value` overrides to the model or training config, parsing each value as its field's type."""
    model_fields = {f.name: f for f in dataclasses.fields(GPTConfig)}
    train_fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    model_changes, train_changes = {}, {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise GptjaxError(f"override {item!r} must look like key=value")
        if key in model_fields:
            model_changes[key] = _parse(key, raw, model_fields[key].type)
        elif key in train_fields:
            train_changes[key] = _parse(key, raw, train_fields[key].type)
        else:
            raise GptjaxError(f"unknown override key {key!r}; model keys: {sorted(model_fields)}; "
                              f"training keys: {sorted(train_fields)}")
    return config.replace(**model_changes), dataclasses.replace(tc, **train_changes)


def _parse(key: str, raw: str, annotation: Any) -> Any:
    kinds = str(annotation)
    if raw.lower() in ("none", "null") and "None" in kinds:
        return None
    for kind, parse in (("bool", _parse_bool), ("int", int), ("float", float), ("str", str)):
        if kinds.startswith(kind):
            try:
                return parse(raw)
            except ValueError:
                raise GptjaxError(f"override {key}={raw!r}: expected {kind}") from None
    return raw


def _parse_bool(raw: str) -> bool:
    if raw.lower() in ("true", "1", "yes"):
        return True
    if raw.lower() in ("false", "0", "no"):
        return False
    raise ValueError(raw)


def save_run_config(path: Path, config: GPTConfig, tc: TrainConfig, extra: dict) -> None:
    """The resolved model + training config of a run, as JSON (atomically)."""
    payload = {"model": dataclasses.asdict(config), "train": dataclasses.asdict(tc)} | extra
    tmp = path.with_suffix(".tmp")
    try:
        tmp.write_text(json.dumps(payload, indent=2))
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)  # a disk that filled mid-write leaves no half-written file behind
        raise


def load_run_config(path: Path) -> tuple[GPTConfig, TrainConfig, dict]:
    """Read a run's saved config (for --resume)."""
    try:
        payload = json.loads(path.read_text())
        return GPTConfig(**payload.pop("model")), TrainConfig(**payload.pop("train")), payload
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise GptjaxError(f"cannot read the run config {path}: {e}") from None


# ---- the loop behind `gptjax train` ----------------------------------------------------------------------------
class TrainingStopped(GptjaxError):
    """Training could not continue (a non-finite loss or gradient without skip_nonfinite)."""


class WriteFailed(GptjaxError):
    """A checkpoint or the exported model could not be written (disk full, read-only, no permission); what it
    had written is removed and the checkpoints committed before it are intact."""


_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")  # how tensorstore (orbax's array writer) reports errno


def write_cause(e: BaseException) -> str | None:
    """The OS-level cause of a failed write in one phrase ('No space left on device (ENOSPC)'): from an OSError,
    or orbax's error carrying tensorstore's errno, anywhere in e's chain; None when e is no OS failure."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno:
            return os_cause(e)
        found = _OS_ERROR_CODE.search(str(e)) if isinstance(e, ValueError) else None
        if found and int(found.group(1)) in errno.errorcode:
            code = int(found.group(1))
            return os_cause(OSError(code, os.strerror(code)))
        e = e.__cause__ or e.__context__
    return None


def _wait_for_abandoned_writes(timeout: float) -> None:
    """Wait for tensorstore writes still running: orbax stops waiting at a save's first failed array write and
    leaves the others running, and they would recreate the directories a clean-up removes. They are only
    reachable through the garbage collector (the coroutines that awaited them were dropped with their loop)."""
    import tensorstore as ts

    deadline = time.time() + timeout
    kinds = (ts.Future, ts.WriteFutures)  # type(), not isinstance: some objects warn when asked their __class__
    for future in [f for f in gc.get_objects() if type(f) in kinds and not f.done()]:
        try:
            future.exception(deadline=deadline)  # its failure is the one being reported, or a sibling of it
        except TimeoutError:
            log.warning("a checkpoint write still runs after %.0f s; its directory may reappear", timeout)
            return


@contextmanager
def _writing(what: str) -> Iterator[None]:
    """Re-raise an OS-level failure inside the block as WriteFailed('cannot write <what>: <cause>')."""
    try:
        yield
    except (OSError, ValueError) as e:
        cause = None if isinstance(e, GptjaxError) else write_cause(e)
        if cause is None:
            raise
        raise WriteFailed(f"cannot write {what}: {cause}") from e


def remove_partial_checkpoints(directory: str | os.PathLike, timeout: float = 60.0) -> list[Path]:
    """Delete the temporary directories of uncommitted orbax saves in a checkpoint directory (what a failed
    save leaves), once the writes the failed save abandoned have ended (at most `timeout` s); the paths removed."""
    _wait_for_abandoned_writes(timeout)
    partial = [d for d in Path(directory).glob("*.orbax-checkpoint-tmp*") if d.is_dir()]
    for d in partial:
        shutil.rmtree(d, ignore_errors=True)
    return partial


@dataclass
class TrainResult:
    """What a run did: steps taken, training losses per step, the last evaluation, where things are."""

    steps: int
    losses: list[float]
    val_loss: float | None
    val_bpb: float | None
    unigram_loss: float
    skipped_steps: list[int]
    sample: str
    out_dir: Path
    stop_reason: str


@dataclass
class _Data:
    tokenizer: Any
    train: np.ndarray
    val: np.ndarray
    val_bytes: int


def _prepare_data(spec: str | None, tc: TrainConfig, out: Path, tokenizer_spec: str) -> _Data:
    """Corpus → split → tokenizer → token files in the run directory (re-encoded only when the source changes)."""
    train_docs, val_docs = data.split_docs(data.resolve_corpus(spec), tc.val_fraction)
    tokenizer = data.make_tokenizer(tokenizer_spec, [t for _, t in train_docs], out)
    train = data.encode_to_memmap(train_docs, tokenizer, out / "data" / "train.bin")
    val = data.encode_to_memmap(val_docs, tokenizer, out / "data" / "val.bin")
    return _Data(tokenizer, train, val, data.corpus_bytes(val_docs))


@dataclass(frozen=True)
class Objective:
    """What a run minimises in place of next-token cross-entropy (gptjax.distill's seam): its jitted step
    (make_train_step of its loss), the targets that loss takes, extra validation metrics, and the settings
    run.json records (a resumed run must be given the same)."""

    name: str
    settings: dict[str, Any]
    step: Callable[..., tuple[TrainState, StepMetrics]]
    targets: Callable[[Any, Any], Any]  # (inputs [A, B, T], targets [A, B, T]) -> the loss's targets pytree
    val_metrics: Callable[[Any, Any, Iterator], dict[str, float]] | None = None  # (graphdef, weights, batches)

    def record(self) -> dict[str, Any]:
        """What run.json keeps of it."""
        return {"name": self.name} | self.settings


@dataclass(frozen=True)
class TrainOptions:
    """How train() runs (what it trains is the GPTConfig and TrainConfig): the corpus, resuming, limits,
    MFU denominator, progress bar, fine-tuning source, metrics registry and device mesh."""

    data_spec: str | None = None  # gptjax.data.resolve_corpus's spec (default: the stdlib)
    resume: bool = False  # continue the run in out_dir from its latest checkpoint
    max_time: float | None = None  # seconds; then evaluate, checkpoint and export
    skip_nonfinite: bool = False  # skip updates with a non-finite loss or gradient (default: stop)
    profile_steps: int = 0  # capture a jax.profiler trace of this many steps (after compilation)
    peak_flops: float | None = None  # MFU denominator, FLOP/s (default: measured now)
    progress: bool = True  # a progress bar
    sample_prompt: str = "def "  # the prompt of the sample shown at each evaluation
    stop_at_step: int | None = None  # end this invocation early (checkpointed, resumable), schedule unchanged
    init_from: str | os.PathLike | None = None  # fine-tune this checkpoint (its config, weights, tokenizer files)
    metrics: Any = None  # a gptjax.tracing.Metrics: step durations, tokens/s and MFU, as TensorBoard gets
    mesh: Any = None  # a gptjax.sharding.make_mesh mesh: data/FSDP/tensor parallel training
    objective: Objective | None = None  # what to minimise (default: next-token cross-entropy)
    start_params: Any = None  # canonical params of the config's shape to start from (not on --resume)
    max_time_after_compile: bool = False  # max_time counts from the end of the first (compiling) step


def train(config: GPTConfig | None, tc: TrainConfig | None, out_dir: str | os.PathLike,
          options: TrainOptions | None = None) -> TrainResult:
    """Train (or resume) a run in out_dir: data, checkpoints, TensorBoard logs, and the exported model.

    With options.resume, config and tc may be None (the run's saved ones) and may differ only in max_steps;
    with options.init_from, the checkpoint's config replaces `config` (its tokenizer files are used unless
    tc.tokenizer says otherwise)."""
    # orbax and tensorboardX take seconds to import: only a training run pays for them, not eval or the bench
    import orbax.checkpoint as ocp
    from tensorboardX import SummaryWriter

    o = options or TrainOptions()
    data_spec, resume, init_from = o.data_spec, o.resume, o.init_from
    out = Path(out_dir)
    run_file = out / "run.json"
    if resume:
        config, tc, data_spec = _resumed_config(run_file, config, tc)
        _check_objective(run_file, o.objective)
    elif (out / "checkpoints").exists() and any((out / "checkpoints").iterdir()):
        raise GptjaxError(f"{out} already holds a run: pass --resume to continue it, or another --out")
    check_inputs(data_spec, None if resume else init_from)
    if data_spec not in (None, "stdlib") and os.path.exists(data_spec):
        data_spec = os.path.abspath(data_spec)  # so --resume from another directory reads the same corpus
    out.mkdir(parents=True, exist_ok=True)
    start_params = None if resume else o.start_params
    if init_from is not None and not resume:
        config, start_params = load_checkpoint(init_from)
        if tc.tokenizer == "byte" and has_tokenizer(init_from):
            tc = dataclasses.replace(tc, tokenizer=str(init_from))
    tokenizer_spec = str(out) if resume and tc.tokenizer != "byte" else tc.tokenizer
    if tc.tokenizer == "byte":
        (out / "tokenizer.json").unlink(missing_ok=True)  # left by an earlier, failed BPE run in this directory
    d = _prepare_data(data_spec, tc, out, tokenizer_spec)
    if start_params is not None and d.tokenizer.vocab_size != config.vocab_size:
        raise GptjaxError(f"the tokenizer has {d.tokenizer.vocab_size} tokens but {init_from} was trained with "
                          f"{config.vocab_size}; fine-tune with the checkpoint's own tokenizer")
    if config.vocab_size != d.tokenizer.vocab_size:
        log.info("vocab_size %d -> %d to match the tokenizer", config.vocab_size, d.tokenizer.vocab_size)
        config = config.replace(vocab_size=d.tokenizer.vocab_size)
    T = tc.seq_len or config.n_positions
    if T > config.n_positions:
        raise GptjaxError(f"seq_len={T} exceeds the model context n_positions={config.n_positions}")
    # every process draws the same global batch and keeps its rows (multi-host data parallelism)
    batcher = data.Batcher(d.train, tc.batch_size, T, seed=tc.seed, process_index=jax.process_index(),
                           process_count=jax.process_count())
    if len(d.val) <= T:
        raise GptjaxError(f"the validation split has {len(d.val)} tokens, fewer than one window of seq_len + 1 = "
                          f"{T + 1}: raise val_fraction or give more text")
    save_run_config(run_file, config, tc, {"data": data_spec} | ({"objective": o.objective.record()}
                                                                 if o.objective is not None else {}))

    if o.mesh is not None:
        check_divisible((tc.batch_size,), logical_to_spec(("batch",), o.mesh), o.mesh, "batch_size")
    graphdef, state = create_state(config, tc, start_params, o.mesh)
    kept = ocp.CheckpointManagerOptions(max_to_keep=tc.keep_checkpoints, enable_async_checkpointing=True)
    manager = ocp.CheckpointManager((out / "checkpoints").absolute(), options=kept)
    if resume:
        state = _restore(manager, state, batcher)
    unigram = data.unigram_entropy(np.asarray(d.val))
    peak = o.peak_flops or matmul_flops(tc.compute_dtype, 1024)  # the suite's ceiling for this compute dtype
    writer = SummaryWriter(str(out / "tb"))
    loop = _Loop(_Run(graphdef, tc, config, T, batcher, d, writer, manager, peak, unigram), o)
    try:
        stop_reason = loop.run(state, out)
    finally:
        loop.close_checkpoints()
        writer.close()

    exported = export_params(graphdef, loop.state.params)  # a collective: every process takes part
    if jax.process_index() == 0:
        with _writing(f"the exported model to {out / 'model'}"):  # save_checkpoint removes its temporary files
            export = save_checkpoint(config, exported, out / "model")
            if tc.tokenizer != "byte" and (out / "tokenizer.json").exists():
                (export / "tokenizer.json").write_bytes((out / "tokenizer.json").read_bytes())
    return TrainResult(int(loop.state.step), loop.losses, loop.val_loss, loop.val_bpb, unigram, loop.skipped,
                       loop.sample, out, stop_reason)


def check_inputs(data_spec: str | None, init_from: str | os.PathLike | None = None) -> None:
    """Raise if the corpus path or the checkpoint to fine-tune does not exist: checked before a run directory
    is created, so a typo leaves nothing behind (reading them waits until the run needs them)."""
    local = data_spec not in (None, "stdlib") and data_spec not in data.DOWNLOADS
    if local and not os.path.exists(data_spec) and not glob.has_magic(data_spec):
        data.local_corpus(data_spec)  # raises its "does not exist" error, having read nothing
    if init_from is not None:
        load_config(init_from)  # the directory and its config.json (no weights read)


def _resumed_config(run_file: Path, config: GPTConfig | None, tc: TrainConfig | None
                    ) -> tuple[GPTConfig, TrainConfig, str | None]:
    """The saved config of a run; a caller's config may only change max_steps (anything else is an error,
    since exact resumption needs the same model, data and optimizer settings)."""
    saved_config, saved_tc, extra = load_run_config(run_file)
    changed = []
    if config is not None:
        changed += [f.name for f in dataclasses.fields(GPTConfig) if f.name != "vocab_size"
                    and getattr(config, f.name) != getattr(saved_config, f.name)]
    if tc is not None:
        changed += [f.name for f in dataclasses.fields(TrainConfig) if f.name != "max_steps"
                    and getattr(tc, f.name) != getattr(saved_tc, f.name)]
        if tc.max_steps != saved_tc.max_steps:
            log.warning("resuming with max_steps %d instead of %d: the learning-rate schedule changes from here",
                        tc.max_steps, saved_tc.max_steps)
            saved_tc = dataclasses.replace(saved_tc, max_steps=tc.max_steps)
    if changed:
        raise GptjaxError(f"--resume continues the run as it was configured; these settings differ from "
                          f"{run_file}: {changed} (only max_steps may change)")
    return saved_config, saved_tc, extra.get("data")


def _check_objective(run_file: Path, objective: Objective | None) -> None:
    """A resumed run minimises what it minimised before (with the same settings)."""
    saved = load_run_config(run_file)[2].get("objective")
    given = objective.record() if objective is not None else None
    if saved != given:
        raise GptjaxError(f"--resume continues the run as it was configured: {run_file} records objective "
                          f"{saved or 'cross-entropy'}, this resume gives {given or 'cross-entropy'}"
                          + (f" (resume it with `gptjax {saved['name']} --resume`)" if saved else ""))


def _restore(manager: Any, state: TrainState, batcher: Any) -> TrainState:
    """The latest committed checkpoint into state's structure, and the data generator's state."""
    import orbax.checkpoint as ocp

    step = manager.latest_step()
    if step is None:
        raise GptjaxError(f"--resume: no checkpoint in {manager.directory}")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                             data=ocp.args.JsonRestore()))
    batcher.set_state(restored["data"]["batcher"])
    log.info("resumed from step %d", step)
    return jax.tree.unflatten(jax.tree.structure(state), jax.tree.leaves(restored["state"]))


@dataclass
class _Run:
    """What the loop works with: the model graph, the settings, data, writers and the MFU denominator."""

    graphdef: Any
    tc: TrainConfig
    config: GPTConfig
    T: int  # window length
    batcher: Any  # gptjax.data.Batcher over the training tokens
    data: _Data
    writer: Any  # TensorBoard SummaryWriter
    manager: Any  # orbax CheckpointManager
    peak: float  # FLOP/s
    unigram: float  # the validation split's unigram entropy (nats/token): the baseline to beat


class _Loop:
    """The step loop: batches in, state forward, metrics out to the progress bar and TensorBoard,
    evaluations and checkpoints on schedule."""

    def __init__(self, run: _Run, options: TrainOptions) -> None:
        self.graphdef, self.tc, self.config, self.T = run.graphdef, run.tc, run.config, run.T
        self.batcher, self.data, self.writer, self.manager = run.batcher, run.data, run.writer, run.manager
        self.peak, self.unigram, self.options = run.peak, run.unigram, options
        self.metrics = options.metrics  # a gptjax.tracing.Metrics, or None
        self.mesh = options.mesh  # a jax Mesh, or None
        self.objective = options.objective  # an Objective, or None: cross-entropy
        self.losses: list[float] = []
        self.skipped: list[int] = []
        self.val_loss = self.val_bpb = None
        self.sample = ""
        self.flops_per_token = run.config.train_flops_per_token(run.T)
        self.parent = None  # the run's gptjax.train span, set by run()
        self.profiling = False
        self.saving: int | None = None  # the step of the last checkpoint save started
        self.save_failed = False  # a save failed (and was raised): the manager would raise it again

    def run(self, state: TrainState, out: Path) -> str:
        """Train from state to max_steps (or the options' stop_at_step or max_time); why it stopped."""
        tc, start = self.tc, int(state.step)
        self.state = state
        self.parent = start_parent("gptjax.train", lambda: self._attributes("train") | {
            "gptjax.train.start_step": start, "gptjax.train.max_steps": tc.max_steps})
        try:
            with trace.use_span(self.parent, end_on_exit=False):  # logs and the sample nest under the run
                reason = self._run(start, out)
        except BaseException as e:
            record_error(self.parent, e)
            if self.metrics is not None:
                self.metrics.errors.labels(error_type=type(e).__qualname__).inc()
            raise
        finally:
            if self.profiling:
                jax.profiler.stop_trace()
                self.profiling = False
            self.parent.set_attribute("gptjax.train.steps", int(self.state.step) - start)
            self.parent.end()
        return reason

    def _run(self, start: int, out: Path) -> str:
        tc, o = self.tc, self.options
        max_time, profile_steps, stop_at = o.max_time, o.profile_steps, o.stop_at_step or tc.max_steps
        bar = tqdm(total=tc.max_steps, initial=start, disable=not o.progress, unit="step", dynamic_ncols=True)
        t_start, window_t, window_tokens, reason = time.perf_counter(), time.perf_counter(), 0, "max_steps"
        profile_at = start + 2 if profile_steps else -1  # after the compiling step
        for step in range(start, tc.max_steps):
            if step == profile_at:
                jax.profiler.start_trace(str(out / "profile"))
                self.profiling = True
            t0 = time.perf_counter()
            metrics = self._step(step)
            loss = float(metrics.loss)  # waits for the step: honest step times
            step_time = time.perf_counter() - t0
            if step == start and o.max_time_after_compile:
                t_start = time.perf_counter()  # equal training time for models whose compile times differ
            if self.profiling and step == profile_at + profile_steps - 1:
                jax.profiler.stop_trace()
                self.profiling = False
            window_tokens += tc.grad_accum * tc.batch_size * self.T
            if self.metrics is not None:
                self.metrics.observe_forward("train", "jax", step_time, tc.grad_accum * tc.batch_size * self.T)
            if not bool(metrics.finite):
                self._nonfinite(step, loss, float(metrics.grad_norm))
            else:
                self.losses.append(loss)
            bar.update(1)
            if (step + 1) % tc.log_every == 0 or step == start:
                tok_s = window_tokens / (time.perf_counter() - window_t)
                self._log_train(step + 1, loss, metrics, tok_s, step_time)
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tok_s:,.0f}")
                window_t, window_tokens = time.perf_counter(), 0
            done = step + 1 == tc.max_steps
            over_time = max_time is not None and time.perf_counter() - t_start > max_time
            if step + 1 == stop_at and not done:
                self._save(step + 1)
                reason = "stop_at_step"
                break
            if (step + 1) % tc.checkpoint_every == 0 or done or over_time:
                self._save(step + 1)  # before evaluating: an evaluation error must not cost the checkpoint
            if (step + 1) % tc.eval_every == 0 or done or over_time:
                self._evaluate(step + 1, bar)
            if over_time:
                reason = "max_time"
                break
        bar.close()
        if self.val_loss is None:  # resumed at max_steps: still report
            self._evaluate(int(self.state.step), None)
        return reason

    def _step(self, step: int) -> StepMetrics:
        tc = self.tc
        xs, ys = zip(*(next(self.batcher) for _ in range(tc.grad_accum)))
        step_fn = step_function(step + 1) if self.objective is None else self.objective.step
        before = step_fn._cache_size()
        with forward_span("gptjax.train_step", lambda: self._attributes("train") | {"gptjax.step": step + 1},
                          parent=self.parent) as span:
            x, y = np.stack(xs), np.stack(ys)  # [A, B / processes, T]: this process's rows
            if self.mesh is not None:
                x, y = shard_batch(x, self.mesh, leading=1), shard_batch(y, self.mesh, leading=1)
            if self.objective is not None:
                y = self.objective.targets(x, y)
            self.state, metrics = step_fn(self.graphdef, tc, self.state, x, y)
            span.wait_for(metrics.loss)
            span.set(lambda: {"gptjax.compiled": step_fn._cache_size() > before})
        return metrics

    def _attributes(self, phase: str) -> dict[str, Any]:
        return {"gen_ai.provider.name": "gptjax", "gptjax.backend": "jax", "gptjax.precision": self.tc.compute_dtype,
                "gptjax.batch_size": self.tc.batch_size * self.tc.grad_accum, "gptjax.seq_len": self.T,
                "gptjax.devices": jax.device_count(), "gptjax.mesh": self._mesh_text(), "gptjax.phase": phase}

    def _mesh_text(self) -> str:
        return mesh_description(self.mesh)

    def _nonfinite(self, step: int, loss: float, grad_norm: float) -> None:
        self.writer.add_scalar("train/nonfinite_step", step + 1, step + 1)
        self.writer.flush()
        if self.options.skip_nonfinite:
            log.warning("step %d: non-finite loss %s / gradient norm %s; update skipped", step + 1, loss, grad_norm)
            self.skipped.append(step + 1)
            return
        last = self.manager.latest_step()
        raise TrainingStopped(f"step {step + 1}: non-finite loss {loss} or gradient norm {grad_norm}; stopped "
                              f"(the last good checkpoint is step {last}; --skip-nonfinite skips such updates)")

    def _log_train(self, step: int, loss: float, metrics: StepMetrics, tok_s: float, step_time: float) -> None:
        w = self.writer
        w.add_scalar("train/loss", loss, step)
        w.add_scalar("train/learning_rate", float(metrics.lr), step)
        w.add_scalar("train/grad_norm", float(metrics.grad_norm), step)
        w.add_scalar("train/tokens_per_s", tok_s, step)
        w.add_scalar("train/step_time_s", step_time, step)
        w.add_scalar("train/mfu", self.flops_per_token * tok_s / self.peak, step)
        for name, value in (metrics.aux or {}).items():
            w.add_scalar(f"train/{name}", float(value), step)
        if self.metrics is not None:
            self.metrics.tokens_per_second.labels(phase="train").set(tok_s)
            self.metrics.mfu.labels(phase="train").set(self.flops_per_token * tok_s / self.peak)
            self.metrics.record_device_memory()

    def _evaluate(self, step: int, bar: Any) -> None:
        batches = data.eval_batches(self.data.val, self.tc.batch_size, self.T, self.tc.eval_batches)
        with forward_span("gptjax.eval", lambda: self._attributes("eval") | {"gptjax.step": step},
                          parent=self.parent) as span:
            t0 = time.perf_counter()
            loss, n = evaluate(self.graphdef, self.state.params, batches)
            span.set({"gptjax.eval.loss": loss, "gptjax.eval.tokens": n})
        if self.metrics is not None:
            self.metrics.observe_forward("eval", "jax", time.perf_counter() - t0, n)
        n_val = len(self.data.val)
        self.val_loss = loss
        self.val_bpb = data.bits_per_byte(loss, n_val, self.data.val_bytes)
        for name, value in (("loss", loss), ("perplexity", math.exp(min(loss, 50))), ("bits_per_byte", self.val_bpb)):
            self.writer.add_scalar(f"val/{name}", value, step)
        if self.objective is not None and self.objective.val_metrics is not None:
            batches = data.eval_batches(self.data.val, self.tc.batch_size, self.T, self.tc.eval_batches)
            for name, value in self.objective.val_metrics(self.graphdef, self.state.params, batches).items():
                self.writer.add_scalar(f"val/{name}", value, step)
        self.sample = self._sample()
        self.writer.add_text("val/sample", self.sample, step)
        self.writer.flush()
        message = (f"step {step}: val loss {loss:.4f} (unigram baseline {self.unigram:.4f}), "
                   f"perplexity {math.exp(min(loss, 50)):.2f}, {self.val_bpb:.3f} bits/byte\n"
                   f"--- sample ---\n{self.sample}\n--------------")
        log.info(message)

    def _sample(self) -> str:
        prompt = self.data.tokenizer.encode(self.options.sample_prompt)[: self.config.n_positions // 2] or [0]
        n = min(160, self.config.n_positions - len(prompt))
        params = export_params(self.graphdef, self.state.params)
        out = get_backend("jax", self.config).generate(params, [prompt], n,
                                                       sampling=SamplingParams(temperature=0.8, top_k=40, seed=0))
        return self.data.tokenizer.decode(prompt + out.tokens[0])

    def _save(self, step: int) -> None:
        import orbax.checkpoint as ocp

        if self.manager.latest_step() == step:
            return
        self.finish_saves()  # saves are asynchronous: the previous one's failure surfaces here, named as its own
        self.saving = step
        with self._checkpoint_writes(step):
            self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(self.state), data=ocp.args.JsonSave({"batcher": self.batcher.get_state()})))

    def finish_saves(self) -> None:
        """Wait for the checkpoint being written; if it failed, raise WriteFailed (its temporary files gone)."""
        if self.saving is not None and not self.save_failed:
            with self._checkpoint_writes(self.saving):
                self.manager.wait_until_finished()

    def close_checkpoints(self) -> None:
        """finish_saves(), then close the manager (after a failed save, closing would only raise it again)."""
        self.finish_saves()
        if not self.save_failed:
            self.manager.close()

    @contextmanager
    def _checkpoint_writes(self, step: int) -> Iterator[None]:
        """A failed save of `step`: its partial directory removed, WriteFailed naming it if the OS refused a write
        (orbax commits a save by renaming it, so the checkpoints before it stay intact and --resume uses them)."""
        try:
            with _writing(f"checkpoint to {Path(self.manager.directory) / str(step)}"):
                yield
        except Exception:
            self.save_failed = True
            if jax.process_index() == 0:
                remove_partial_checkpoints(self.manager.directory)
            raise
