"""The training loop: each step draws grad_accum batches, takes the jitted step, waits for its loss and reports
it to the hooks; on schedule it logs, saves a checkpoint and evaluates (loss, bits per byte, a sample). What the
numbers go to (TensorBoard, Prometheus, OpenTelemetry, the profiler, the progress bar) is the hooks' business
(gptjax.train.hooks); setting a run up and exporting its model is gptjax.train.run's.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gptjax import data
from gptjax.backends import get_backend
from gptjax.config import GPTConfig
from gptjax.errors import GptjaxError
from gptjax.sampling import SamplingParams
from gptjax.sharding import shard_batch
from gptjax.train.checkpoint import Checkpoints
from gptjax.train.config import TrainConfig
from gptjax.train.evaluate import evaluate
from gptjax.train.hooks import Hook, Timing
from gptjax.train.step import StepMetrics, TrainState, export_params, train_step

log = logging.getLogger("gptjax.train")


class TrainingStopped(GptjaxError):
    """Training could not continue (a non-finite loss or gradient without skip_nonfinite)."""


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
    MFU denominator, progress bar, fine-tuning source, metrics registry, device mesh and extra hooks."""

    data_spec: str | None = None  # gptjax.data.resolve_corpus's spec (default: the stdlib)
    resume: bool = False  # continue the run in out_dir from its latest checkpoint
    max_time: float | None = None  # seconds; then evaluate, checkpoint and export
    skip_nonfinite: bool = False  # skip updates with a non-finite loss or gradient (default: stop)
    profile_steps: int = 0  # capture a jax.profiler trace of this many steps (after compilation)
    peak_flops: float | None = None  # MFU denominator, FLOP/s (default: gptjax.peaks.mfu_peak's)
    progress: bool = True  # a progress bar
    sample_prompt: str = "def "  # the prompt of the sample shown at each evaluation
    stop_at_step: int | None = None  # end this invocation early (checkpointed, resumable), schedule unchanged
    init_from: str | os.PathLike | None = None  # fine-tune this checkpoint (its config, weights, tokenizer files)
    metrics: Any = None  # a gptjax.tracing.Metrics: step durations, tokens/s and MFU, as TensorBoard gets
    mesh: Any = None  # a gptjax.sharding.make_mesh mesh: data/FSDP/tensor parallel training
    objective: Objective | None = None  # what to minimise (default: next-token cross-entropy)
    start_params: Any = None  # canonical params of the config's shape to start from (not on --resume)
    max_time_after_compile: bool = False  # max_time counts from the end of the first (compiling) step
    hooks: tuple[Hook, ...] = ()  # told what the loop does, after the built-in ones (gptjax.train.hooks)


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


def step_function(step: int) -> Callable[..., tuple[TrainState, StepMetrics]]:
    """The jitted step the loop takes as its 1-based step `step`: train_step. The tests' seam: they replace
    this function (monkeypatch) to make chosen steps non-finite, outside the step itself."""
    return train_step


@dataclass
class Run:
    """What the loop works with: the model graph, the settings, data, checkpoints and the MFU denominator."""

    graphdef: Any
    tc: TrainConfig
    config: GPTConfig
    T: int  # window length
    batcher: data.Batcher  # over the training tokens
    data: data.RunData
    checkpoints: Checkpoints
    peak: float  # FLOP/s
    unigram: float  # the validation split's unigram entropy (nats/token): the baseline to beat


class Loop:
    """The step loop of one run, and what it leaves: the training losses, the skipped steps, the last
    evaluation and its sample."""

    def __init__(self, run: Run, options: TrainOptions, hooks: Hook) -> None:
        self.graphdef, self.tc, self.config, self.T = run.graphdef, run.tc, run.config, run.T
        self.batcher, self.data, self.checkpoints = run.batcher, run.data, run.checkpoints
        self.peak, self.unigram, self.options, self.hooks = run.peak, run.unigram, options, hooks
        self.objective = options.objective  # None: cross-entropy
        self.tokens_per_step = run.tc.grad_accum * run.tc.batch_size * run.T
        self.flops_per_token = run.config.train_flops_per_token(run.T)
        self.state: TrainState | None = None
        self.last_log = (0, 0.0)  # (step, time) where the tokens/s window of the next log starts
        self.losses: list[float] = []
        self.skipped: list[int] = []
        self.val_loss = self.val_bpb = None
        self.sample = ""

    def run(self, state: TrainState) -> str:
        """Train from state to max_steps (or the options' stop_at_step or max_time); why it stopped."""
        tc, o = self.tc, self.options
        start, self.state, reason = int(state.step), state, "max_steps"
        stop_at = o.stop_at_step or tc.max_steps
        with self.hooks.run(start):
            t_start = time.perf_counter()
            self.last_log = (start, t_start)
            for step in range(start + 1, tc.max_steps + 1):  # 1-based: the step taken now
                loss, metrics, seconds = self._step(step)
                if step == start + 1 and o.max_time_after_compile:
                    t_start = time.perf_counter()  # equal training time for models whose compile times differ
                if bool(metrics.finite):
                    self.losses.append(loss)
                else:
                    self._nonfinite(step, loss, float(metrics.grad_norm))
                if step % tc.log_every == 0 or step == start + 1:
                    self._log(step, loss, metrics, seconds)
                done = step == tc.max_steps
                over_time = o.max_time is not None and time.perf_counter() - t_start > o.max_time
                if step == stop_at and not done:
                    self._save(step)
                    reason = "stop_at_step"
                    break
                if step % tc.checkpoint_every == 0 or done or over_time:
                    self._save(step)  # before evaluating: an evaluation error must not cost the checkpoint
                if step % tc.eval_every == 0 or done or over_time:
                    self._evaluate(step)
                if over_time:
                    reason = "max_time"
                    break
            if self.val_loss is None:  # resumed at max_steps, or stopped before an evaluation: still report
                self._evaluate(int(self.state.step))
        return reason

    def _step(self, step: int) -> tuple[float, StepMetrics, float]:
        """Step `step` on grad_accum fresh batches: its loss (waited for: honest step times), metrics, seconds."""
        tc = self.tc
        step_fn = step_function(step) if self.objective is None else self.objective.step
        before = step_fn._cache_size()
        with self.hooks.step(step):
            t0 = time.perf_counter()
            xs, ys = zip(*(next(self.batcher) for _ in range(tc.grad_accum)))
            x, y = np.stack(xs), np.stack(ys)  # [A, B / processes, T]: this process's rows
            if self.options.mesh is not None:
                x, y = shard_batch(x, self.options.mesh, leading=1), shard_batch(y, self.options.mesh, leading=1)
            if self.objective is not None:
                y = self.objective.targets(x, y)
            self.state, metrics = step_fn(self.graphdef, tc, self.state, x, y)
            loss = float(metrics.loss)
            seconds = time.perf_counter() - t0
            self.hooks.step_done(Timing(step, seconds, self.tokens_per_step, step_fn._cache_size() > before))
        return loss, metrics, seconds

    def _nonfinite(self, step: int, loss: float, grad_norm: float) -> None:
        """Skip the step (skip_nonfinite; its update was not applied) or stop the run naming it."""
        self.hooks.nonfinite(step)
        if self.options.skip_nonfinite:
            log.warning("step %d: non-finite loss %s / gradient norm %s; update skipped", step, loss, grad_norm)
            self.skipped.append(step)
            return
        last = self.checkpoints.latest_step()
        raise TrainingStopped(f"step {step}: non-finite loss {loss} or gradient norm {grad_norm}; stopped "
                              f"(the last good checkpoint is step {last}; --skip-nonfinite skips such updates)")

    def _log(self, step: int, loss: float, metrics: StepMetrics, seconds: float) -> None:
        """The training scalars of step `step` to the hooks (tokens/s and MFU over the steps since the last log)."""
        since, t0 = self.last_log
        tok_s = (step - since) * self.tokens_per_step / (time.perf_counter() - t0)
        scalars = {"loss": loss, "learning_rate": float(metrics.lr), "grad_norm": float(metrics.grad_norm),
                   "tokens_per_s": tok_s, "step_time_s": seconds, "mfu": self.flops_per_token * tok_s / self.peak}
        self.hooks.logged(step, scalars | {name: float(value) for name, value in (metrics.aux or {}).items()})
        self.last_log = (step, time.perf_counter())  # the next window starts after the hooks wrote this one

    def _save(self, step: int) -> None:
        self.checkpoints.save(step, self.state, self.batcher.get_state())

    def _evaluate(self, step: int) -> None:
        """The validation loss (and an objective's metrics) over eval_batches fixed batches, and a sample."""
        tc, d = self.tc, self.data
        with self.hooks.evaluation(step):
            t0 = time.perf_counter()
            loss, n = evaluate(self.graphdef, self.state.params, data.eval_batches(d.val, tc.batch_size, self.T,
                                                                                  tc.eval_batches))
            self.hooks.eval_done(Timing(step, time.perf_counter() - t0, n), loss)
        self.val_loss, self.val_bpb = loss, data.bits_per_byte(loss, len(d.val), d.val_bytes)
        scalars = {"loss": loss, "perplexity": math.exp(min(loss, 50)), "bits_per_byte": self.val_bpb}
        if self.objective is not None and self.objective.val_metrics is not None:
            batches = data.eval_batches(d.val, tc.batch_size, self.T, tc.eval_batches)
            scalars |= self.objective.val_metrics(self.graphdef, self.state.params, batches)
        self.sample = self._sample()
        self.hooks.evaluated(step, scalars, self.sample)
        log.info(f"step {step}: val loss {loss:.4f} (unigram baseline {self.unigram:.4f}), perplexity "
                 f"{scalars['perplexity']:.2f}, {self.val_bpb:.3f} bits/byte\n"
                 f"--- sample ---\n{self.sample}\n--------------")

    def _sample(self) -> str:
        """160 tokens (at most) the model writes after options.sample_prompt, at temperature 0.8, top-k 40."""
        prompt = self.data.tokenizer.encode(self.options.sample_prompt)[: self.config.n_positions // 2] or [0]
        n = min(160, self.config.n_positions - len(prompt))
        params = export_params(self.graphdef, self.state.params)
        out = get_backend("jax", self.config).generate(params, [prompt], n,
                                                       sampling=SamplingParams(temperature=0.8, top_k=40, seed=0))
        return self.data.tokenizer.decode(prompt + out.tokens[0])
