"""Writes that the OS refuses (issue 15 point 9, issue 31 points 4 and 5): a full disk mid-checkpoint, while the token
files are written or during the export, and a read-only or unwritable --out end in one line naming the path and the
cause, exit 1, for `gptjax train` and `gptjax distill` alike; nothing half-written is left (no temporary files, no
token files or sidecars, no run directory this invocation created), and the last good checkpoint resumes
bit-exactly."""

import errno
import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from gptjax import load_checkpoint
from gptjax.cli import main
from gptjax.train import train_step, write_cause

# a tiny run: checkpoints at steps 2, 4 and 6, one evaluation (at the end), the byte tokenizer
ARGS = ["--preset", "tiny", "--no-progress", "--peak-flops", "1e11", "n_layer=1", "n_positions=32", "batch_size=2",
        "max_steps=6", "warmup_steps=2", "checkpoint_every=2", "eval_every=100", "eval_batches=1", "log_every=100"]
LIMIT = 64 * 1024  # bytes: above every file but the checkpoint's array data (about 234 KB per save here)
TEACHER = Path(__file__).parent / "fixtures" / "trained_byte_tiny"
DISTILL_ARGS = ["--teacher", str(TEACHER), "--no-progress", "--peak-flops", "1e11", "n_layer=1", "n_head=2",
                "n_embd=32", "n_positions=32", "batch_size=2", "max_steps=2", "warmup_steps=1", "eval_every=100",
                "eval_batches=1", "log_every=100"]

# The disk fills during step 4's save: a real file-size limit (RLIMIT_FSIZE) set once step 2's save has finished
# makes the kernel refuse the array data's writes past LIMIT bytes (EFBIG) from tensorstore's threads, as a full
# disk refuses them (ENOSPC); a tmpfs small enough for that would need mount privileges CI may not have.
_FULL_DISK = """
import resource, signal, sys
import orbax.checkpoint as ocp
from gptjax.cli import main

real_save = ocp.CheckpointManager.save

def save(self, step, *args, **kwargs):
    if step == 4:
        self.wait_until_finished()  # step 2's checkpoint is committed before the limit
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), resource.RLIM_INFINITY))
    return real_save(self, step, *args, **kwargs)

ocp.CheckpointManager.save = save
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.slow
@pytest.mark.integration
def test_a_full_disk_mid_checkpoint_is_one_line_and_the_last_checkpoint_resumes_exactly(tmp_path, corpus, capsys):
    out = tmp_path / "full"
    proc = subprocess.run([sys.executable, "-c", _FULL_DISK, str(LIMIT), "train", "--out", str(out), "--data", corpus,
                           *ARGS], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.splitlines() == [
        f"gptjax train: cannot write checkpoint to {out / 'checkpoints' / '4'}: File too large (EFBIG)"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["2"]
    assert not [p for p in out.rglob("*") if "tmp" in p.name]  # no orbax-checkpoint-tmp, no run.json tmp
    assert not (out / "model").exists()

    assert main(["train", "--out", str(out), "--resume", "--no-progress", "--peak-flops", "1e11"]) == 0
    assert "done: 6 steps" in capsys.readouterr().out
    assert main(["train", "--out", str(tmp_path / "straight"), "--data", corpus, *ARGS]) == 0
    _, resumed = load_checkpoint(out / "model")
    _, straight = load_checkpoint(tmp_path / "straight" / "model")
    assert resumed.keys() == straight.keys() and all(np.array_equal(resumed[k], straight[k]) for k in straight)


def test_a_full_disk_during_the_export_is_one_line_and_leaves_no_partial_model(tmp_path, corpus, capsys,
                                                                               monkeypatch):
    def fill_the_disk(f, tensors, metadata):  # the seam: the export's one weights write fails part-way
        f.write(b"\0" * 4096)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("gptjax.weights.write_safetensors", fill_the_disk)
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--data", corpus, *ARGS]) == 1
    err = capsys.readouterr().err  # after the run's own log (the last evaluation and its sample)
    assert err.splitlines()[-1] == (f"gptjax train: cannot write the exported model to {out / 'model'}: "
                                    "No space left on device (ENOSPC)")
    assert "Traceback" not in err and err.count("gptjax train:") == 1
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "data", "run.json", "tb"]  # no partial model
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["4", "6"]  # the run itself was saved


def test_train_out_that_cannot_be_created_is_one_line(tmp_path, corpus, capsys):
    (tmp_path / "file").write_text("a regular file, where --out needs a directory")
    out = tmp_path / "file" / "run"  # a real ENOTDIR (a chmod 0555 directory would not stop root)
    before = train_step._cache_size()
    assert main(["train", "--out", str(out), "--data", corpus, *ARGS]) == 1
    assert capsys.readouterr().err == f"gptjax train: cannot write {out}: Not a directory (ENOTDIR)\n"
    assert train_step._cache_size() == before  # refused before compiling anything


# The disk fills once train.bin and its sidecar are written: val.bin's first write fails (EFBIG, a limit of 0 bytes),
# an error that names no file (it used to pass cli/train.py's filename check as a traceback)
_FULL_AT_TOKENS = """
import resource, signal, sys
import gptjax.data.tokens as tokens
from gptjax.cli import main

real_encode = tokens.encode_to_memmap

def encode(docs, tokenizer, path, *args, **kwargs):
    if path.name == "val.bin":
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.RLIM_INFINITY))
    return real_encode(docs, tokenizer, path, *args, **kwargs)

tokens.encode_to_memmap = encode
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("command, existing", [("train", False), ("train", True), ("distill", False)])
def test_a_full_disk_while_the_tokens_are_written_is_one_line_and_leaves_nothing(tmp_path, corpus, command, existing):
    out = tmp_path / "runs" / "x"
    if existing:  # the user's own directory: it stays, with what it held, and nothing of the run
        out.mkdir(parents=True)
        (out / "notes.txt").write_text("mine")
    args = ARGS if command == "train" else DISTILL_ARGS
    proc = subprocess.run([sys.executable, "-c", _FULL_AT_TOKENS, command, "--out", str(out), "--data", corpus, *args],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.splitlines() == [f"gptjax {command}: cannot write {out}: File too large (EFBIG)"]
    if existing:
        assert sorted(p.name for p in out.rglob("*")) == ["notes.txt"]
    else:
        assert not (tmp_path / "runs").exists()  # made by this invocation (mkdir -p), removed with the run


@pytest.mark.parametrize("command", ["train", "distill"])
@pytest.mark.parametrize("below", ["run", "a/run"])
def test_a_read_only_out_is_one_line(tmp_path, corpus, capsys, monkeypatch, command, below):
    read_only, real_mkdir = tmp_path / "ro", os.mkdir
    read_only.mkdir()

    def mkdir(path, *args, **kwargs):  # a read-only mount (root ignores chmod 0555, and mounting needs privileges)
        if str(path).startswith(str(read_only)):  # as the kernel answers: ENOENT first for a missing parent
            code = errno.EROFS if os.path.isdir(os.path.dirname(path)) else errno.ENOENT
            raise OSError(code, os.strerror(code), str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    out = read_only / below
    args = ARGS if command == "train" else DISTILL_ARGS
    assert main([command, "--out", str(out), "--data", corpus, *args]) == 1
    err = capsys.readouterr().err  # before: a traceback (distill: out.mkdir; train: for a missing parent of --out)
    assert err == f"gptjax {command}: cannot write {out}: Read-only file system (EROFS)\n"
    assert not any(read_only.iterdir())


def test_quantize_out_that_cannot_be_written_is_one_line(tmp_path, hf_tiny_dir, capsys):
    (tmp_path / "file").write_text("a regular file, where --out needs a directory")
    out = tmp_path / "file" / "sub" / "int8"
    assert main(["quantize", "--checkpoint", str(hf_tiny_dir), "--to", "int8", "--out", str(out)]) == 1
    assert capsys.readouterr().err == f"gptjax quantize: cannot write {out}: Not a directory (ENOTDIR)\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_the_quieting_of_failed_saves_lasts_as_long_as_a_save(tmp_path, corpus, monkeypatch):
    from gptjax.train.checkpoint import quiet_failed_saves

    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    closed = SimpleNamespace(exc_type=RuntimeError, exc_value=RuntimeError("Event loop is closed"), object=None)
    other = SimpleNamespace(exc_type=RuntimeError, exc_value=RuntimeError("a bug"), object=None)
    with quiet_failed_saves():
        sys.unraisablehook(closed)  # tensorstore's report of a sibling write ending after orbax closed its loop
        sys.unraisablehook(other)
    assert seen == [other] and sys.unraisablehook == seen.append  # the previous hook is back
    assert not logging.getLogger("absl").filters and not logging.getLogger("asyncio").filters
    assert main(["train", "--out", str(tmp_path / "run"), "--data", corpus, *ARGS]) == 0
    assert sys.unraisablehook == seen.append  # before: the CLI swapped it for the rest of the process
    assert not logging.getLogger("absl").filters and not logging.getLogger("asyncio").filters


def test_write_cause_reads_oserrors_and_tensorstores_errno():
    tensorstore = ValueError('RESOURCE_EXHAUSTED: Error writing "params.wte" in OCDBT database at local file "/x/"'
                             ": Failed to write 87798 bytes to file 9: No space left on device [os_error_code='28']")
    assert write_cause(tensorstore) == "No space left on device (ENOSPC)"
    try:
        try:
            raise OSError(30, "Read-only file system", "/x")
        except OSError as e:
            raise RuntimeError("wrapped") from e
    except RuntimeError as e:
        assert write_cause(e) == "Read-only file system (EROFS)"
    assert write_cause(ValueError("a bug, not the disk")) is None
