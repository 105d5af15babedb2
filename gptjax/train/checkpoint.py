"""A run's files besides its logs: run.json (the resolved settings, read by --resume and `gptjax eval`), orbax
checkpoints of the train state and the batch generator, and what a write the OS refuses becomes.

Orbax saves in the background and commits a save by renaming its temporary directory, so the checkpoints before a
failed save stay intact and --resume uses them. A failed save surfaces at the next save or at the end of the run as
WriteFailed naming the step's directory and the OS's cause (a full disk, a read-only or unwritable directory); its
temporary directory is removed once orbax has raised the failure (wait_until_finished joins orbax's save thread, and
a save's array writes share one tensorstore transaction, which fails as a whole: no write of it is left running),
and orbax removes any a killed process left when the run is resumed (cleanup_tmp_directories).
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import gc
import json
import logging
import os
import re
import shutil
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import jax

from gptjax.config import GPTConfig
from gptjax.data import write_atomic
from gptjax.errors import GptjaxError, os_cause, read_json
from gptjax.train.config import TrainConfig
from gptjax.train.step import TrainState

log = logging.getLogger("gptjax.train")


# ---- run.json ------------------------------------------------------------------------------------------------
def save_run_config(path: Path, config: GPTConfig, tc: TrainConfig, extra: dict) -> None:
    """The resolved model + training config of a run, as JSON (atomically)."""
    payload = {"model": dataclasses.asdict(config), "train": dataclasses.asdict(tc)} | extra
    write_atomic(path, json.dumps(payload, indent=2).encode())  # a disk that fills mid-write leaves no half file


def load_run_config(path: Path) -> tuple[GPTConfig, TrainConfig, dict]:
    """Read a run's saved config (for --resume)."""
    payload = read_json(path)  # names the file: missing, not JSON, or a setting given twice (not "the last wins")
    try:
        return GPTConfig(**payload.pop("model")), TrainConfig(**payload.pop("train")), payload
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise GptjaxError(f"cannot read the run config {path}: {e}") from None


def resumed_config(run_file: Path, config: GPTConfig | None, tc: TrainConfig | None
                   ) -> tuple[GPTConfig, TrainConfig, str | None]:
    """The saved config of a run and its data spec; a caller's config may only change max_steps (anything else is
    an error, since exact resumption needs the same model, data and optimizer settings)."""
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


def check_objective(run_file: Path, given: dict[str, Any] | None) -> None:
    """A resumed run minimises what it minimised before, with the same settings (`given`: the objective's
    run.json record, None for cross-entropy)."""
    saved = load_run_config(run_file)[2].get("objective")
    if saved != given:
        raise GptjaxError(f"--resume continues the run as it was configured: {run_file} records objective "
                          f"{saved or 'cross-entropy'}, this resume gives {given or 'cross-entropy'}"
                          + (f" (resume it with `gptjax {saved['name']} --resume`)" if saved else ""))


# ---- writes the OS refuses -----------------------------------------------------------------------------------
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


@contextmanager
def writing(what: str) -> Iterator[None]:
    """Re-raise an OS-level failure inside the block as WriteFailed('cannot write <what>: <cause>')."""
    try:
        yield
    except (OSError, ValueError) as e:
        cause = None if isinstance(e, GptjaxError) else write_cause(e)
        if cause is None:
            raise
        raise WriteFailed(f"cannot write {what}: {cause}") from e


_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}  # errors only a write gets


def refused_write(e: BaseException, directory: Path) -> bool:
    """Whether e is the OS refusing a write in directory: an OSError naming directory, a path in it or a parent
    it needed created, or naming no file with a cause only writes have (a full disk, a read-only file system)."""
    if not isinstance(e, OSError) or not e.errno:
        return False
    if not isinstance(e.filename, (str, os.PathLike)):
        return e.errno in _FULL
    path, root = Path(os.path.abspath(e.filename)), Path(os.path.abspath(directory))
    return path == root or root in path.parents or path in root.parents


@contextmanager
def refused_writes(directory: Path) -> Iterator[None]:
    """Re-raise the OS refusing a write in a run directory (refused_write) as WriteFailed('cannot write
    <directory>: <cause>'): what `gptjax train` and `gptjax distill` print as their one line."""
    try:
        yield
    except OSError as e:
        if not refused_write(e, directory):
            raise
        raise WriteFailed(f"cannot write {directory}: {os_cause(e)}") from e


@contextmanager
def quiet_failed_saves() -> Iterator[None]:
    """While a save is in flight, keep a write the OS refuses to the one WriteFailed that Checkpoints raises: orbax
    logs the error's traceback from several threads and asyncio may log the sibling writes as "never retrieved"
    (filtered from those two loggers), and tensorstore reports the sibling writes that end after orbax closed its
    event loop as unraisable errors (dropped from sys.unraisablehook). Those come from orbax 0.12.8 itself: its
    asyncio.gather of a save's array writes (one tensorstore transaction, which fails as a whole) returns at the
    first failure and closes the loop the others still call back into; 31 to 98 such reports per failed save here,
    all before wait_until_finished raised in the saves timed, and none of orbax's options, futures or close()
    prevents them. Checkpoints holds this block open while a save is in flight (a failed one: until close());
    the previous hook and the loggers' filters are restored when it ends, so nothing outlives the saves."""
    previous = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        if not (unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == "Event loop is closed"
                and unraisable.object is None):
            previous(unraisable)

    loggers = [logging.getLogger(name) for name in ("absl", "asyncio")]
    for logger in loggers:
        logger.addFilter(_not_a_failed_write)
    sys.unraisablehook = hook
    try:
        yield
    finally:
        if sys.unraisablehook is hook:  # unless someone installed another since (then theirs stays)
            sys.unraisablehook = previous
        for logger in loggers:
            logger.removeFilter(_not_a_failed_write)


def _retrieve_failed_writes() -> None:
    """Retrieve the errors of a failed save's finished asyncio tasks (orbax's loop is closed: nobody else will),
    the ones WriteFailed reported: a task whose error was never retrieved logs it when it is collected, which
    happens once the exception chain holding it is dropped, after the save's quieting ended (3 such log lines after
    the one line in 1 of 14 failed saves here, when close() ran gc.collect() instead)."""
    # type(), not isinstance(): isinstance reads __class__, which wakes lazy proxies (torch warns of one)
    for task in [t for t in gc.get_objects() if issubclass(type(t), asyncio.Task)]:
        if task.done() and not task.cancelled() and task.get_loop().is_closed():
            task.exception()  # marks it retrieved


def _not_a_failed_write(record: logging.LogRecord) -> bool:
    """False for a logged traceback whose error is a write the OS refused (Checkpoints raises it as WriteFailed)."""
    return not (record.exc_info and record.exc_info[1] is not None and write_cause(record.exc_info[1]))


def remove_partial_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Delete the temporary directories of uncommitted orbax saves in a checkpoint directory (what a failed or
    interrupted save leaves); the paths removed. Call it once orbax has finished with them."""
    partial = [d for d in Path(directory).glob("*.orbax-checkpoint-tmp*") if d.is_dir()]
    for d in partial:
        shutil.rmtree(d, ignore_errors=True)
    return partial


# ---- the checkpoints -----------------------------------------------------------------------------------------
class Checkpoints:
    """The run's orbax checkpoints: the train state and the batch generator's state per saved step, the newest
    `keep` kept, saved in the background; a failed save raises WriteFailed once, at the next save or at close."""

    def __init__(self, directory: Path, keep: int) -> None:
        import orbax.checkpoint as ocp  # seconds to import: only a training run pays for it

        self.directory = directory.absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True,
                                               cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self.saving: int | None = None  # the step of the last save started
        self.failed = False  # a save failed (and was raised): orbax would raise it again at every wait
        self.in_flight = ExitStack()  # quiet_failed_saves() while a save runs, until it is waited for or closed

    def latest_step(self) -> int | None:
        """The newest committed step."""
        return self.manager.latest_step()

    def save(self, step: int, state: TrainState, batcher_state: dict) -> None:
        """Start saving `step` (unless it is saved already), once the previous save has finished."""
        import orbax.checkpoint as ocp

        if self.manager.latest_step() == step:
            return
        self.finish()  # saves are asynchronous: the previous one's failure surfaces here, named as its own
        self.saving = step
        self.in_flight.enter_context(quiet_failed_saves())
        with self._writes(step):
            self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=ocp.args.JsonSave({"batcher": batcher_state})))

    def restore(self, state: TrainState) -> tuple[TrainState, dict]:
        """The latest committed checkpoint in state's structure (shapes, dtypes, shardings), and the batch
        generator's state saved with it."""
        import orbax.checkpoint as ocp

        step = self.manager.latest_step()
        if step is None:
            raise GptjaxError(f"--resume: no checkpoint in {self.directory}")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                      data=ocp.args.JsonRestore()))
        log.info("resumed from step %d", step)
        leaves = jax.tree.leaves(restored["state"])
        return jax.tree.unflatten(jax.tree.structure(state), leaves), restored["data"]["batcher"]

    def finish(self) -> None:
        """Wait for the save in flight; if it failed, raise WriteFailed (its temporary directory removed)."""
        if self.saving is not None and not self.failed:
            with self._writes(self.saving):
                self.manager.wait_until_finished()
            self.in_flight.close()  # (a failed save stays quiet until close(): the run ends there)

    def close(self) -> None:
        """finish(), then close the manager (after a failed save, closing would only raise it again)."""
        try:
            self.finish()
            if not self.failed:
                self.manager.close()
        finally:
            if self.failed:
                _retrieve_failed_writes()
            self.in_flight.close()

    @contextmanager
    def _writes(self, step: int) -> Iterator[None]:
        """A failed save of `step`: its temporary directory removed, WriteFailed naming it if the OS refused a
        write."""
        try:
            with writing(f"checkpoint to {self.directory / str(step)}"):
                yield
        except Exception:
            self.failed = True
            if jax.process_index() == 0:
                remove_partial_checkpoints(self.directory)
            raise
