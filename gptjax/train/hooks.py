"""What the training loop reports, and to whom: a Hook is told when a run, a step and an evaluation start and
end, and what each logged; the loop calls every hook alike. The hooks `gptjax train` runs with: TensorBoard
scalars, Prometheus metrics, OpenTelemetry spans, a jax.profiler trace and the progress bar. A new sink is a new
Hook (TrainOptions.hooks), not a branch in the loop.

The order of calls for one step: `with step(n): ... step_done(timing)`, then `nonfinite(n)` when its loss or
gradient norm was not finite, `logged(n, scalars)` every log_every steps, and on schedule
`with evaluation(n): ... eval_done(timing, loss)` followed by `evaluated(n, scalars, sample)`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from pathlib import Path
from typing import Any, NamedTuple

import jax
from opentelemetry import context as otel_context
from opentelemetry import trace
from tqdm import tqdm

from gptjax.sharding import mesh_description
from gptjax.tracing import forward_span, record_error, start_parent
from gptjax.train.config import TrainConfig


class Timing(NamedTuple):
    """One step or evaluation: its (1-based) step, seconds, tokens, and whether its function compiled first."""

    step: int
    seconds: float
    tokens: int
    compiled: bool = False


class Hook:
    """A sink for the loop's reports; every method does nothing until a hook overrides it."""

    def run(self, start: int) -> AbstractContextManager:
        """Around the whole run, which continues after step `start` (0 for a new run); sees its error."""
        return nullcontext()

    def step(self, step: int) -> AbstractContextManager:
        """Around one optimizer step: drawing its batches, the update, waiting for its loss."""
        return nullcontext()

    def step_done(self, timing: Timing) -> None:
        """The step finished (called inside step())."""

    def nonfinite(self, step: int) -> None:
        """The step's loss or gradient norm was not finite (its update was not applied)."""

    def logged(self, step: int, scalars: dict[str, float]) -> None:
        """Training scalars of a logging step: loss, learning_rate, grad_norm, tokens_per_s, step_time_s, mfu and
        an objective's extra terms."""

    def evaluation(self, step: int) -> AbstractContextManager:
        """Around the validation-loss passes of an evaluation."""
        return nullcontext()

    def eval_done(self, timing: Timing, loss: float) -> None:
        """The validation loss was computed (called inside evaluation())."""

    def evaluated(self, step: int, scalars: dict[str, float], sample: str) -> None:
        """An evaluation's scalars (loss, perplexity, bits_per_byte, an objective's metrics) and its sample."""


class Hooks(Hook):
    """Several hooks as one: each call goes to every hook in order (contexts are left in reverse order)."""

    def __init__(self, hooks: Sequence[Hook]) -> None:
        self.hooks = tuple(hooks)

    def run(self, start: int) -> AbstractContextManager:
        return _all(h.run(start) for h in self.hooks)

    def step(self, step: int) -> AbstractContextManager:
        return _all(h.step(step) for h in self.hooks)

    def step_done(self, timing: Timing) -> None:
        for h in self.hooks:
            h.step_done(timing)

    def nonfinite(self, step: int) -> None:
        for h in self.hooks:
            h.nonfinite(step)

    def logged(self, step: int, scalars: dict[str, float]) -> None:
        for h in self.hooks:
            h.logged(step, scalars)

    def evaluation(self, step: int) -> AbstractContextManager:
        return _all(h.evaluation(step) for h in self.hooks)

    def eval_done(self, timing: Timing, loss: float) -> None:
        for h in self.hooks:
            h.eval_done(timing, loss)

    def evaluated(self, step: int, scalars: dict[str, float], sample: str) -> None:
        for h in self.hooks:
            h.evaluated(step, scalars, sample)


@contextmanager
def _all(contexts: Iterable[AbstractContextManager]) -> Iterator[None]:
    with ExitStack() as stack:
        for context in contexts:
            stack.enter_context(context)
        yield


class TensorBoard(Hook):
    """TensorBoard event files in `directory`: train/* and val/* scalars, the non-finite steps, the samples."""

    def __init__(self, directory: Path) -> None:
        from tensorboardX import SummaryWriter  # seconds to import: only a training run pays for it

        self.writer = SummaryWriter(str(directory))

    @contextmanager
    def run(self, start: int) -> Iterator[None]:
        try:
            yield
        finally:
            self.writer.close()

    def nonfinite(self, step: int) -> None:
        self.writer.add_scalar("train/nonfinite_step", step, step)
        self.writer.flush()

    def logged(self, step: int, scalars: dict[str, float]) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(f"train/{name}", value, step)

    def evaluated(self, step: int, scalars: dict[str, float], sample: str) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(f"val/{name}", value, step)
        self.writer.add_text("val/sample", sample, step)
        self.writer.flush()


class Prometheus(Hook):
    """A gptjax.tracing.Metrics registry: step and evaluation durations, tokens/s, MFU, device memory, errors."""

    def __init__(self, metrics: Any) -> None:
        self.metrics = metrics

    @contextmanager
    def run(self, start: int) -> Iterator[None]:
        try:
            yield
        except BaseException as e:
            self.metrics.errors.labels(error_type=type(e).__qualname__).inc()
            raise

    def step_done(self, timing: Timing) -> None:
        self.metrics.observe_forward("train", "jax", timing.seconds, timing.tokens)

    def logged(self, step: int, scalars: dict[str, float]) -> None:
        self.metrics.tokens_per_second.labels(phase="train").set(scalars["tokens_per_s"])
        self.metrics.mfu.labels(phase="train").set(scalars["mfu"])
        self.metrics.record_device_memory()

    def eval_done(self, timing: Timing, loss: float) -> None:
        self.metrics.observe_forward("eval", "jax", timing.seconds, timing.tokens)


class Tracing(Hook):
    """OpenTelemetry spans, one trace per logging interval: `gptjax.train` is the run's own trace (its settings and
    the steps it took); every tc.log_every steps a `gptjax.train_interval` root span, linked to the run's, holds
    that interval's `gptjax.train_step` and `gptjax.eval` spans and is current until the next interval starts (so
    logs and the samples' generate spans nest under it). A run of N steps is N / log_every traces of at most
    log_every steps (and their evaluations) each, not one trace that grows with the run."""

    def __init__(self, tc: TrainConfig, T: int, mesh: Any) -> None:
        self.tc, self.T, self.mesh = tc, T, mesh
        self.parent: Any = None  # the run's span
        self.interval: Any = None  # the open interval's span ...
        self.index, self.token = -1, None  # ... its number and the context token that made it current
        self.span: Any = None  # the step's or evaluation's SpanHandle
        self.last = 0  # the last step taken

    def attributes(self, phase: str) -> dict[str, Any]:
        """The attributes every span of the run carries."""
        tc = self.tc
        return {"gen_ai.provider.name": "gptjax", "gptjax.backend": "jax", "gptjax.precision": tc.compute_dtype,
                "gptjax.batch_size": tc.batch_size * tc.grad_accum, "gptjax.seq_len": self.T,
                "gptjax.devices": jax.device_count(), "gptjax.mesh": mesh_description(self.mesh),
                "gptjax.phase": phase}

    @contextmanager
    def run(self, start: int) -> Iterator[None]:
        self.last = start
        self.parent = start_parent("gptjax.train", lambda: self.attributes("train") | {
            "gptjax.train.start_step": start, "gptjax.train.max_steps": self.tc.max_steps,
            "gptjax.train.log_every": self.tc.log_every})
        try:
            yield
        except BaseException as e:
            for span in (self.interval, self.parent):
                if span is not None:
                    record_error(span, e)
            raise
        finally:
            self._end_interval()
            self.parent.set_attribute("gptjax.train.steps", self.last - start)
            self.parent.end()

    def _enter_interval(self, step: int) -> None:
        """Make the span of step's logging interval current, ending the previous interval's if step starts a new one
        (attached here and detached at the next interval: the loop calls the hooks from one thread, in order)."""
        index = (step - 1) // self.tc.log_every
        if self.interval is not None and index == self.index:
            return
        self._end_interval()
        self.index = index
        self.interval = start_parent("gptjax.train_interval", lambda: self.attributes("train") | {
            "gptjax.train.first_step": step, "gptjax.train.interval": index}, context=otel_context.Context(),
            links=[self.parent])
        self.token = otel_context.attach(trace.set_span_in_context(self.interval))

    def _end_interval(self) -> None:
        if self.interval is not None:
            otel_context.detach(self.token)
            self.interval.set_attribute("gptjax.train.last_step", self.last)
            self.interval.end()
            self.interval = None

    @contextmanager
    def step(self, step: int) -> Iterator[None]:
        self._enter_interval(step)
        with forward_span("gptjax.train_step", lambda: self.attributes("train") | {"gptjax.step": step},
                          parent=self.interval) as self.span:
            yield

    def step_done(self, timing: Timing) -> None:
        self.last = timing.step
        self.span.set(lambda: {"gptjax.compiled": timing.compiled})

    def logged(self, step: int, scalars: dict[str, float]) -> None:
        if self.interval is not None and self.interval.is_recording():
            self.interval.set_attributes({f"gptjax.train.{name}": value for name, value in scalars.items()})

    @contextmanager
    def evaluation(self, step: int) -> Iterator[None]:
        self._enter_interval(max(step, 1))
        with forward_span("gptjax.eval", lambda: self.attributes("eval") | {"gptjax.step": step},
                          parent=self.interval) as self.span:
            yield

    def eval_done(self, timing: Timing, loss: float) -> None:
        self.span.set({"gptjax.eval.loss": loss, "gptjax.eval.tokens": timing.tokens})


class Profiler(Hook):
    """A jax.profiler trace of `steps` steps into `directory`, from the third step of the run on (after the
    compiling step and one more), stopped early if the run ends first."""

    def __init__(self, directory: Path, steps: int) -> None:
        self.directory, self.steps = directory, steps
        self.first = 0  # the step the trace starts at
        self.profiling = False

    @contextmanager
    def run(self, start: int) -> Iterator[None]:
        self.first = start + 3
        try:
            yield
        finally:
            self._stop()

    @contextmanager
    def step(self, step: int) -> Iterator[None]:
        if step == self.first:
            jax.profiler.start_trace(str(self.directory))
            self.profiling = True
        yield
        if step == self.first + self.steps - 1:
            self._stop()

    def _stop(self) -> None:
        if self.profiling:
            jax.profiler.stop_trace()
            self.profiling = False


class Progress(Hook):
    """A tqdm progress bar over the run's steps, with the last logged loss and tokens/s."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled = total, enabled
        self.bar: Any = None

    @contextmanager
    def run(self, start: int) -> Iterator[None]:
        self.bar = tqdm(total=self.total, initial=start, disable=not self.enabled, unit="step", dynamic_ncols=True)
        try:
            yield
        finally:
            self.bar.close()

    def step_done(self, timing: Timing) -> None:
        self.bar.update(1)

    def logged(self, step: int, scalars: dict[str, float]) -> None:
        self.bar.set_postfix(loss=f"{scalars['loss']:.3f}", tok_s=f"{scalars['tokens_per_s']:,.0f}")
