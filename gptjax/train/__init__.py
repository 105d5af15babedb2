"""Training, behind `gptjax train` (and `gptjax distill`, through an Objective), one job per module:

- config: TrainConfig (optimisation and run settings, checked when built) and the `key=value` overrides;
- step: the pure train step (optimizer, loss, gradients over micro-batches, update) jitted over a
  (parameters, optimizer state, step) pytree;
- evaluate: the validation loss of a training state or of a checkpoint's params;
- checkpoint: run.json, orbax checkpoints with exact resume, and writes the OS refuses (WriteFailed);
- hooks: where the loop's numbers go (TensorBoard, Prometheus, OpenTelemetry spans, the profiler, the progress bar);
- loop: the step loop itself (steps, logging, checkpoints and evaluations on schedule);
- run: train(), a run from its settings to its exported model.

MFU's denominator is the machine's matmul ceiling, cached per machine by gptjax.peaks (or --peak-flops).
"""

from gptjax.peaks import matmul_flops  # what MFU's peak is measured with: the benchmark suite's ceiling
from gptjax.train.checkpoint import (
    Checkpoints,
    WriteFailed,
    load_run_config,
    remove_partial_checkpoints,
    save_run_config,
    write_cause,
)
from gptjax.train.config import TrainConfig, config_from_overrides
from gptjax.train.evaluate import eval_loss, evaluate, evaluate_params
from gptjax.train.hooks import Hook, Hooks, Timing
from gptjax.train.loop import Objective, TrainingStopped, TrainOptions, TrainResult
from gptjax.train.run import check_inputs, train
from gptjax.train.step import (
    StepMetrics,
    TrainState,
    compute_copy,
    create_state,
    decayed,
    export_params,
    loss_fn,
    make_optimizer,
    make_train_step,
    train_logits,
    train_step,
)

__all__ = ["Checkpoints", "Hook", "Hooks", "Objective", "StepMetrics", "Timing", "TrainConfig", "TrainOptions",
           "TrainResult", "TrainState", "TrainingStopped", "WriteFailed", "check_inputs", "compute_copy",
           "config_from_overrides", "create_state", "decayed", "eval_loss", "evaluate", "evaluate_params",
           "export_params", "load_run_config", "loss_fn", "make_optimizer", "make_train_step", "matmul_flops",
           "remove_partial_checkpoints", "save_run_config", "train", "train_logits", "train_step",
           "write_cause"]
