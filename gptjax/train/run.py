"""train(): one run in a run directory, from its settings to its exported model.

    settings (new, resumed from run.json, or fine-tuning a checkpoint) -> data (corpus, tokenizer, token files)
    -> run.json -> the train state (fresh, or the latest checkpoint) -> the loop with its hooks -> model/

Every setting and input is checked before anything is compiled, and the inputs before the run directory is
created, so a typo leaves nothing behind. A write the OS refuses in the run directory (a full disk, a read-only
file system) ends the run as WriteFailed naming the directory and the cause; before the first step, what this call
created there is removed with it (the token files and their sidecars, run.json, the directory if it made it).
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import jax
import numpy as np

from gptjax import data
from gptjax.backends import cpu_kernels
from gptjax.backends.jax.bf16_train import KernelTrainingLayers, training_layers
from gptjax.config import GPTConfig
from gptjax.errors import GptjaxError
from gptjax.peaks import mfu_peak
from gptjax.sharding import check_divisible, logical_to_spec
from gptjax.tokenizer import has_tokenizer
from gptjax.train import hooks
from gptjax.train.checkpoint import (
    Checkpoints,
    WriteFailed,
    check_objective,
    refused_writes,
    resumed_config,
    save_run_config,
    writing,
)
from gptjax.train.config import TrainConfig
from gptjax.train.loop import Loop, Run, TrainOptions, TrainResult
from gptjax.train.step import create_state, export_params
from gptjax.weights import load_checkpoint, load_config, save_checkpoint

log = logging.getLogger("gptjax.train")


def train(config: GPTConfig | None, tc: TrainConfig | None, out_dir: str | os.PathLike,
          options: TrainOptions | None = None) -> TrainResult:
    """Train (or resume) a run in out_dir: data, checkpoints, TensorBoard logs, and the exported model.

    With options.resume, config and tc may be None (the run's saved ones) and may differ only in max_steps;
    with options.init_from, the checkpoint's config replaces `config` (its tokenizer files are used unless
    tc.tokenizer says otherwise)."""
    o = options or TrainOptions()
    out = Path(out_dir)
    config, tc, data_spec = _settings(config, tc, out, o)
    with _setting_up(out):
        run, state = _prepare(config, tc, out, data_spec, o)
    with refused_writes(out):  # the checkpoints and the export name their own path
        loop = Loop(run, o, hooks.Hooks(_hooks(run.tc, run.T, out, o)))
        try:
            stop_reason = loop.run(state)
        finally:
            run.checkpoints.close()
        params = export_params(run.graphdef, loop.state.params)  # a collective: every process gathers
        _export(run.config, run.tc, out, params)
    return TrainResult(int(loop.state.step), loop.losses, loop.val_loss, loop.val_bpb, run.unigram, loop.skipped,
                       loop.sample, out, stop_reason)


def _prepare(config: GPTConfig, tc: TrainConfig, out: Path, data_spec: str | None, o: TrainOptions
             ) -> tuple[Run, Any]:
    """The run directory with its data and run.json, and what the loop starts from: (the run, the train state)."""
    out.mkdir(parents=True, exist_ok=True)
    config, tc, start_params = _starting_point(config, tc, o)
    config, d = _data(config, tc, out, data_spec, o, start_params is not None)
    T = tc.seq_len or config.n_positions
    if T > config.n_positions:
        raise GptjaxError(f"seq_len={T} exceeds the model context n_positions={config.n_positions}")
    # every process draws the same global batch and keeps its rows (multi-host data parallelism)
    batcher = data.Batcher(d.train, tc.batch_size, T, seed=tc.seed, process_index=jax.process_index(),
                           process_count=jax.process_count())
    if len(d.val) <= T:
        raise GptjaxError(f"the validation split has {len(d.val)} tokens, fewer than one window of seq_len + 1 = "
                          f"{T + 1}: raise val_fraction or give more text")
    objective = {"objective": o.objective.record()} if o.objective is not None else {}
    save_run_config(out / "run.json", config, tc, {"data": data_spec} | objective)
    if o.mesh is not None:
        check_divisible((tc.batch_size,), logical_to_spec(("batch",), o.mesh), o.mesh, "batch_size")
    graphdef, state = create_state(config, tc, start_params, o.mesh)
    checkpoints = Checkpoints(out / "checkpoints", tc.keep_checkpoints)
    if o.resume:
        state, batcher_state = checkpoints.restore(state)
        batcher.set_state(batcher_state)
    peak = mfu_peak(tc.compute_dtype, o.peak_flops, kernel=_matmul_kernel(tc.compute_dtype, o.mesh))
    if o.peak_flops is None:  # given (--peak-flops), it needs no saying
        log.info("MFU peak: %.4g FLOP/s (%s)", peak.flops, peak.source)
    unigram = data.unigram_entropy(np.asarray(d.val))
    return Run(graphdef, tc, config, T, batcher, d, checkpoints, peak.flops, unigram), state


@contextmanager
def _setting_up(out: Path) -> Iterator[None]:
    """Prepare the run directory in the block; if the OS refuses a write there (a full disk, a read-only file
    system: WriteFailed), remove what the block created, so that nothing half-written is left: the directory
    itself and the parents it needed, else each new file in it (token files, sidecars, run.json)."""
    made = next((p for p in reversed([out, *out.parents]) if not p.exists()), None)  # what mkdir -p creates first
    before = set() if made is not None else set(out.rglob("*"))
    try:
        with refused_writes(out):
            yield
    except WriteFailed:
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)  # (mkdir may have failed to make it)
            raise
        for path in sorted(set(out.rglob("*")) - before, reverse=True):  # a folder's files before the folder
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        raise


def _matmul_kernel(compute_dtype: str, mesh: Any) -> Any:
    """The kernel the step's matmuls run on instead of XLA's dot (bf16 on gptjax's CPU GEMM), MFU's peak; or None."""
    return cpu_kernels.bf16_matmul if isinstance(training_layers(compute_dtype, mesh), KernelTrainingLayers) else None


def check_inputs(data_spec: str | None, init_from: str | os.PathLike | None = None) -> None:
    """Raise if the corpus path or the checkpoint to fine-tune does not exist: checked before a run directory
    is created, so a typo leaves nothing behind (reading them waits until the run needs them)."""
    local = data_spec not in (None, "stdlib") and data_spec not in data.DOWNLOADS
    if local and not os.path.exists(data_spec) and not glob.has_magic(data_spec):
        data.local_corpus(data_spec)  # raises its "does not exist" error, having read nothing
    if init_from is not None:
        load_config(init_from)  # the directory and its config.json (no weights read)


def _settings(config: GPTConfig | None, tc: TrainConfig | None, out: Path, o: TrainOptions
              ) -> tuple[GPTConfig, TrainConfig, str | None]:
    """(config, tc, data spec) of the run: as given, or as run.json saved them (--resume); inputs checked."""
    data_spec = o.data_spec
    if o.resume:
        config, tc, data_spec = resumed_config(out / "run.json", config, tc)
        check_objective(out / "run.json", o.objective.record() if o.objective is not None else None)
    elif (out / "checkpoints").exists() and any((out / "checkpoints").iterdir()):
        raise GptjaxError(f"{out} already holds a run: pass --resume to continue it, or another --out")
    check_inputs(data_spec, None if o.resume else o.init_from)
    if data_spec not in (None, "stdlib") and os.path.exists(data_spec):
        data_spec = os.path.abspath(data_spec)  # so --resume from another directory reads the same corpus
    return config, tc, data_spec


def _starting_point(config: GPTConfig, tc: TrainConfig, o: TrainOptions) -> tuple[GPTConfig, TrainConfig, Any]:
    """(config, tc, canonical params to start from or None): options.start_params, or the checkpoint to
    fine-tune with its config (and its tokenizer files, unless tc.tokenizer names another); None on --resume."""
    if o.resume:
        return config, tc, None
    if o.init_from is None:
        return config, tc, o.start_params
    config, params = load_checkpoint(o.init_from)
    if tc.tokenizer == "byte" and has_tokenizer(o.init_from):
        tc = dataclasses.replace(tc, tokenizer=str(o.init_from))
    return config, tc, params


def _data(config: GPTConfig, tc: TrainConfig, out: Path, data_spec: str | None, o: TrainOptions,
          fine_tuning: bool) -> tuple[GPTConfig, data.RunData]:
    """The run's data in out/data, and the config with the tokenizer's vocab_size."""
    tokenizer_spec = str(out) if o.resume and tc.tokenizer != "byte" else tc.tokenizer
    if tc.tokenizer == "byte":
        (out / "tokenizer.json").unlink(missing_ok=True)  # left by an earlier, failed BPE run in this directory
    d = data.prepare_run_data(data_spec, tc.val_fraction, out, tokenizer_spec)
    if fine_tuning and d.tokenizer.vocab_size != config.vocab_size:
        raise GptjaxError(f"the tokenizer has {d.tokenizer.vocab_size} tokens but {o.init_from} was trained with "
                          f"{config.vocab_size}; fine-tune with the checkpoint's own tokenizer")
    if config.vocab_size != d.tokenizer.vocab_size:
        log.info("vocab_size %d -> %d to match the tokenizer", config.vocab_size, d.tokenizer.vocab_size)
        config = config.replace(vocab_size=d.tokenizer.vocab_size)
    return config, d


def _hooks(tc: TrainConfig, T: int, out: Path, o: TrainOptions) -> list[hooks.Hook]:
    """The hooks `gptjax train` reports to: spans, the profiler, the progress bar, TensorBoard, Prometheus, and
    the options' own."""
    built = [hooks.Tracing(tc, T, o.mesh), hooks.Progress(tc.max_steps, o.progress), hooks.TensorBoard(out / "tb")]
    if o.profile_steps:
        built.append(hooks.Profiler(out / "profile", o.profile_steps))
    if o.metrics is not None:
        built.append(hooks.Prometheus(o.metrics))
    return built + list(o.hooks)


def _export(config: GPTConfig, tc: TrainConfig, out: Path, params: Any) -> None:
    """The final weights (and a BPE run's tokenizer.json) as the checkpoint out/model, written by process 0."""
    if jax.process_index() != 0:
        return
    with writing(f"the exported model to {out / 'model'}"):  # save_checkpoint removes its temporary files
        export = save_checkpoint(config, params, out / "model")
        if tc.tokenizer != "byte" and (out / "tokenizer.json").exists():
            (export / "tokenizer.json").write_bytes((out / "tokenizer.json").read_bytes())
