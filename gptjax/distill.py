"""Knowledge distillation: a student GPT trained on a teacher's soft targets, behind `gptjax distill`.

    loss = α·τ²·KL(softmax(teacher/τ) ‖ softmax(student/τ)) + (1 − α)·cross-entropy(student, next token)

(Hinton et al. 2015; τ² keeps the soft term's gradient scale independent of τ). The teacher's logits come from
its jitted forward pass on each batch, in any run mode of gptjax.precision its checkpoint can run (a float
teacher in any mode; a quantised one in its own storage's modes). Everything else is
`gptjax train`'s loop (gptjax.train.train with an Objective): data, checkpoints, exact resume, TensorBoard
(train/ce, train/kl, train/top1_agreement besides train/loss; val/kl and val/top1_agreement), the mesh and
the exported model. The student may differ from the teacher in depth, width, heads and context, not in
vocabulary (it reads the teacher's tokenizer); --init-from-teacher starts it from every other teacher layer
plus the embeddings (DistilBERT / DistilGPT2), which needs the teacher's width.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from gptjax import precision as registry
from gptjax.backends.jax.convert import JaxWeights, jax_weights
from gptjax.config import GPTConfig
from gptjax.errors import GptjaxError
from gptjax.quantize import for_precision
from gptjax.sharding import check_config
from gptjax.tokenizer import has_tokenizer, load_tokenizer
from gptjax.train import (
    Objective,
    TrainConfig,
    TrainOptions,
    TrainResult,
    check_inputs,
    load_run_config,
    make_train_step,
    train,
    train_logits,
)
from gptjax.weights import Params, load_checkpoint, load_config, stored_precision

OBJECTIVE = "distill"  # the objective's name in run.json (and the command that resumes it)
IDENTITY = "teacher_identity"  # run.json's record of the teacher: its config and weights' sha256
log = logging.getLogger("gptjax.distill")


@dataclass(frozen=True)
class DistillConfig:
    """The distillation settings; validated at construction."""

    teacher: str  # checkpoint directory
    alpha: float = 0.5  # weight of the soft (KL) term; 1 - alpha weighs the cross-entropy
    temperature: float = 2.0
    teacher_precision: str | None = None  # a run mode of gptjax.precision (None: the checkpoint's storage)
    init_from_teacher: bool = False  # start from every other teacher layer + embeddings (not on --resume)

    def __post_init__(self) -> None:
        a, t = self.alpha, self.temperature
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0 <= a <= 1:
            raise GptjaxError(f"alpha={a!r} must be a number in [0, 1] (1: soft targets only, 0: cross-entropy only)")
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not (math.isfinite(t) and 0 < t <= 100):
            raise GptjaxError(f"temperature={t!r} must be a number in (0, 100]")
        if self.teacher_precision is not None:
            registry.mode(self.teacher_precision)  # names the allowed modes

    def settings(self) -> dict[str, Any]:
        """What run.json records (the teacher as an absolute path, so --resume works from anywhere)."""
        return dataclasses.asdict(self) | {"teacher": os.path.abspath(self.teacher)}


# ---- the loss ------------------------------------------------------------------------------------------------
def loss_terms(logits: jax.Array, teacher: jax.Array, labels: jax.Array, alpha: float, temperature: float
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss, {ce, kl, top1_agreement}) of student logits [B, T, V] against teacher logits [B, T, V] and
    next tokens [B, T]; means over tokens. alpha = 0 is exactly gptjax.train.loss_fn's cross-entropy."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    log_t = jax.nn.log_softmax(teacher / temperature)  # [B, T, V]
    log_s = jax.nn.log_softmax(logits / temperature)
    kl = (jnp.exp(log_t) * (log_t - log_s)).sum(-1).mean()  # KL(teacher_τ ‖ student_τ) per token
    agreement = (logits.argmax(-1) == teacher.argmax(-1)).mean()
    loss = ce if alpha == 0 else alpha * temperature**2 * kl + (1 - alpha) * ce
    return loss, {"ce": ce, "kl": kl, "top1_agreement": agreement}


def distill_loss(alpha: float, temperature: float, weights: Any, graphdef: Any, inputs: jax.Array,
                 targets: tuple[jax.Array, jax.Array], compute_dtype: str = "fp32", dropout: float = 0.0,
                 key: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """gptjax.train.loss_fn's signature with targets = (next tokens [B, T], teacher logits [B, T, V])."""
    labels, teacher = targets
    logits = train_logits(weights, graphdef, inputs, compute_dtype, dropout, key)  # float32 [B, T, V]
    return loss_terms(logits, teacher, labels, alpha, temperature)


# ---- the teacher ---------------------------------------------------------------------------------------------
@partial(jax.jit, static_argnames=("graphdef",))
def teacher_logits(graphdef: Any, state: Any, inputs: jax.Array) -> jax.Array:
    """Float32 logits [..., T, V] of a converted teacher for tokens [..., T] (any leading axes)."""
    T = inputs.shape[-1]
    with jax.default_matmul_precision("float32"):  # as the JAX backend runs it: true fp32 dots on accelerators
        logits = nnx.merge(graphdef, state)(inputs.reshape(-1, T))  # [N, T, V]
    return logits.reshape(*inputs.shape, -1)


def check_teacher(dc: DistillConfig, student: GPTConfig, tc: TrainConfig, mesh: Any = None) -> GPTConfig:
    """The teacher's config, having checked (reading no weights, creating nothing) that it exists, can run in
    dc.teacher_precision, shares the student's vocabulary and tokenizer, covers its windows, fits the mesh,
    and fits --init-from-teacher."""
    teacher = load_config(dc.teacher)
    stored = stored_precision(dc.teacher)
    chosen = dc.teacher_precision or stored
    if stored != "fp32" and registry.storage(chosen) != stored:
        runs = [m for m in registry.MODES if registry.storage(m) == stored]
        raise GptjaxError(f"teacher {dc.teacher} is stored {stored} (a quantised checkpoint): it runs with "
                          f"teacher precision {' or '.join(map(repr, runs))}, not {chosen!r}")
    if student.vocab_size != teacher.vocab_size:
        raise GptjaxError(f"the student's vocab_size={student.vocab_size} differs from the teacher's "
                          f"{teacher.vocab_size}: distillation compares their next-token distributions, so the "
                          "vocabulary must match (leave vocab_size unset)")
    _check_tokenizer(dc.teacher, teacher, tc)
    T = tc.seq_len or student.n_positions
    if T > teacher.n_positions:
        raise GptjaxError(f"windows of seq_len={T} exceed the teacher's context n_positions={teacher.n_positions}; "
                          f"set seq_len <= {teacher.n_positions}")
    if mesh is not None:
        check_config(teacher, mesh)
    if dc.init_from_teacher:
        _check_cut(dc, teacher, stored, student)
    return teacher


def teacher_tokenizer(path: str | os.PathLike) -> str:
    """The tokenizer spec the student reads: the teacher's tokenizer files, else bytes."""
    return os.path.abspath(path) if has_tokenizer(path) else "byte"


def _check_tokenizer(path: str, teacher: GPTConfig, tc: TrainConfig) -> None:
    spec = teacher_tokenizer(path)
    if tc.tokenizer not in ("byte", spec):  # "byte" is TrainConfig's default: it becomes the teacher's
        raise GptjaxError(f"tokenizer={tc.tokenizer!r}: the student reads the teacher's tokenizer ({spec}); its "
                          "vocabulary must match the teacher's (leave tokenizer unset)")
    size = load_tokenizer(path).vocab_size if spec != "byte" else 256
    if size != teacher.vocab_size:
        raise GptjaxError(f"teacher {path} has vocab_size={teacher.vocab_size} but its tokenizer ({spec}) has "
                          f"{size} tokens: the student could not be fed the teacher's tokens")


def _check_cut(dc: DistillConfig, teacher: GPTConfig, stored: str, student: GPTConfig) -> None:
    """--init-from-teacher needs float weights of the teacher's width, at most its depth and context."""
    if registry.STORAGES[stored].scaled:
        raise GptjaxError(f"--init-from-teacher copies float weights; teacher {dc.teacher} is stored {stored}")
    same = ("n_embd", "n_inner", "tie_word_embeddings")
    differ = [f"{k}={getattr(student, k)} (teacher {getattr(teacher, k)})" for k in same
              if getattr(student, k) != getattr(teacher, k)]
    if differ:
        raise GptjaxError(f"--init-from-teacher copies the teacher's layers, so the student needs its width: "
                          f"{', '.join(differ)}; drop --init-from-teacher to distill into another width")
    if student.n_layer > teacher.n_layer or student.n_positions > teacher.n_positions:
        raise GptjaxError(f"--init-from-teacher: the student's n_layer={student.n_layer} and n_positions="
                          f"{student.n_positions} must not exceed the teacher's {teacher.n_layer} and "
                          f"{teacher.n_positions}")


def teacher_identity(config: GPTConfig, params: Params) -> dict[str, Any]:
    """What makes a teacher the same teacher, as run.json records it: its config and a sha256 of its weights as
    loaded (canonical names, dtypes, shapes and values: a copied, re-saved or re-sharded checkpoint of the same
    weights matches; about 1.3 s for GPT-2 small's 498 MB at the 390 MB/s sha256 runs at here)."""
    h = hashlib.sha256()
    for key in sorted(params):
        a = np.ascontiguousarray(params[key])
        h.update(f"{key}\0{a.dtype.str}\0{a.shape}\0".encode())
        h.update(a.reshape(-1).view(np.uint8))
    return {"config": dataclasses.asdict(config), "sha256": h.hexdigest()}


def check_same_teacher(path: str, recorded: dict[str, Any] | None, sha256: str | None = None) -> None:
    """A resumed distillation learns from the teacher it started with: refuse the checkpoint at path if its config
    (or, given its weights' sha256, its weights) differs from the recorded teacher_identity, naming what differs.
    Nothing is checked for a run that recorded none."""
    if recorded is None:
        return
    if not os.path.isdir(path):
        raise GptjaxError(f"--resume: the run's teacher {path} does not exist; the run resumes with the teacher it "
                          f"started with (its config and weights sha256 {recorded['sha256'][:16]}... are recorded): "
                          "put that checkpoint back there")
    now = dataclasses.asdict(load_config(path))
    differ = [f"{k}={v!r} (the run's teacher: {recorded['config'].get(k)!r})" for k, v in now.items()
              if v != recorded["config"].get(k)]
    if differ:
        raise GptjaxError(f"--resume: the teacher {path} is not the one this run was distilled from: "
                          f"{', '.join(differ)}")
    if sha256 is not None and sha256 != recorded["sha256"]:
        raise GptjaxError(f"--resume: the teacher {path} has the config of the one this run was distilled from but "
                          f"other weights (sha256 {sha256[:16]}..., recorded {recorded['sha256'][:16]}...)")


def load_teacher(dc: DistillConfig, mesh: Any = None) -> tuple[GPTConfig, Params, JaxWeights]:
    """(config, canonical params as stored, converted weights in the teacher's run mode, on the mesh)."""
    config, params = load_checkpoint(dc.teacher)
    chosen = dc.teacher_precision or stored_precision(dc.teacher)
    return config, params, jax_weights(config, for_precision(params, config, chosen), chosen, mesh)


def student_from_teacher(teacher: GPTConfig, params: Params, student: GPTConfig) -> Params:
    """The student's canonical params cut from the teacher's: layer i from teacher layer i·L_t // L_s (every
    other one when the student is half as deep), the embeddings, the first n_positions positions, ln_f."""
    chosen = [i * teacher.n_layer // student.n_layer for i in range(student.n_layer)]
    out = {k: np.asarray(v, np.float32) for k, v in params.items() if not k.startswith("h.")}
    out["wpe.weight"] = out["wpe.weight"][: student.n_positions]
    for i, j in enumerate(chosen):
        out |= {f"h.{i}." + k[len(f"h.{j}."):]: np.asarray(v, np.float32) for k, v in params.items()
                if k.startswith(f"h.{j}.")}
    return out


# ---- the objective and the run -------------------------------------------------------------------------------
@partial(jax.jit, static_argnames=("graphdef", "teacher_graphdef", "temperature"))
def _val_terms(graphdef: Any, weights: Any, teacher_graphdef: Any, teacher_state: Any, inputs: jax.Array,
               labels: jax.Array, temperature: float) -> tuple[jax.Array, jax.Array]:
    """(summed KL, summed top-1 agreements) of a batch [B, T]."""
    logits = nnx.merge(graphdef, weights)(inputs)
    _, terms = loss_terms(logits, teacher_logits(teacher_graphdef, teacher_state, inputs), labels, 0.0, temperature)
    return terms["kl"] * labels.size, terms["top1_agreement"] * labels.size


@lru_cache(maxsize=16)
def _step(alpha: float, temperature: float) -> Any:
    """The jitted distillation step for (alpha, temperature): one per pair, so that runs in one process (a study,
    the tests, a resume) reuse its compilations as `gptjax train`'s runs reuse train_step's."""
    return make_train_step(partial(distill_loss, alpha, temperature), has_aux=True)


def objective(dc: DistillConfig, teacher: JaxWeights, identity: dict[str, Any] | None = None) -> Objective:
    """The Objective gptjax.train.train minimises: distill_loss against the teacher's logits (run.json records
    dc's settings and the teacher's identity, if given: teacher_identity's)."""
    step = _step(float(dc.alpha), float(dc.temperature))

    def targets(inputs: Any, labels: Any) -> tuple[Any, jax.Array]:  # [A, B, T] -> ([A, B, T], [A, B, T, V])
        return labels, teacher_logits(teacher.graphdef, teacher.state, inputs)

    def val_metrics(graphdef: Any, weights: Any, batches: Iterator) -> dict[str, float]:
        kl = agree = n = 0.0
        for x, y in batches:
            k, a = _val_terms(graphdef, weights, teacher.graphdef, teacher.state, x, y, float(dc.temperature))
            kl, agree, n = kl + float(k), agree + float(a), n + y.size
        return {"kl": kl / max(n, 1), "top1_agreement": agree / max(n, 1)}

    settings = dc.settings() | ({IDENTITY: identity} if identity is not None else {})
    return Objective(OBJECTIVE, settings, step, targets, val_metrics)


def distill(config: GPTConfig | None, tc: TrainConfig | None, dc: DistillConfig | None, out_dir: str | os.PathLike,
            options: TrainOptions | None = None) -> TrainResult:
    """Distil dc.teacher into a student of shape `config` in out_dir (gptjax.train.train's run directory and
    result). Every setting is checked before anything is loaded, compiled or created. With options.resume,
    config, tc and dc may be None (the run's saved ones; dc, if given, must match them)."""
    o = options or TrainOptions()
    if o.init_from is not None:
        raise GptjaxError("distillation starts from scratch or from the teacher (--init-from-teacher), not --init")
    recorded = None  # the identity of the teacher a resumed run started with
    if o.resume:
        config, tc, dc, recorded = _resumed(Path(out_dir) / "run.json", config, tc, dc)
        check_same_teacher(dc.teacher, recorded)  # its config: before anything else is checked or read
    if config is None or tc is None or dc is None:
        raise GptjaxError("distill needs the student's config, its TrainConfig and a DistillConfig (or resume)")
    teacher_config = check_teacher(dc, config, tc, o.mesh)
    check_inputs(o.data_spec)  # before the teacher's weights are read
    tc = dataclasses.replace(tc, tokenizer=teacher_tokenizer(dc.teacher))
    _, params, teacher = load_teacher(dc, o.mesh)
    identity = teacher_identity(teacher_config, params)
    check_same_teacher(dc.teacher, recorded, identity["sha256"])  # its weights
    start = None
    if dc.init_from_teacher and not o.resume:
        start = student_from_teacher(teacher_config, params, config)
    del params
    keep = identity if recorded is not None or not o.resume else None  # a run that recorded none resumes so
    return train(config, tc, out_dir, dataclasses.replace(o, objective=objective(dc, teacher, keep),
                                                          start_params=start))


def _resumed(run_file: Path, config: GPTConfig | None, tc: TrainConfig | None, dc: DistillConfig | None
             ) -> tuple[GPTConfig, TrainConfig, DistillConfig, dict[str, Any] | None]:
    """The saved student config, distillation settings and teacher identity of a run (train() checks config/tc
    changes)."""
    saved_config, saved_tc, extra = load_run_config(run_file)
    record = dict(extra.get("objective") or {})
    if record.pop("name", None) != OBJECTIVE:
        raise GptjaxError(f"{run_file} is not a distillation run: resume it with `gptjax train --resume`")
    identity = record.pop(IDENTITY, None)
    if identity is None:
        log.warning("%s records no teacher identity (an older gptjax wrote it): the teacher is not checked",
                    run_file)
    elif not (isinstance(identity, dict) and isinstance(identity.get("config"), dict)
              and isinstance(identity.get("sha256"), str)):
        raise GptjaxError(f"{run_file}: {IDENTITY} must be an object with a config and a sha256")
    saved = DistillConfig(**record)
    if dc is not None and dc.settings() != saved.settings():
        raise GptjaxError(f"--resume continues the distillation as configured in {run_file}: {saved.settings()}; "
                          f"given {dc.settings()}")
    if tc is not None and tc.max_steps != saved_tc.max_steps:
        saved_tc = dataclasses.replace(saved_tc, max_steps=tc.max_steps)
    return config or saved_config, saved_tc, saved, identity
