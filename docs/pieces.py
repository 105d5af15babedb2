"""The pieces of `python docs/render.py --rerun`: every command whose results the docs render, in the order a full
regeneration runs them (short pieces first, the frontier and what needs its models last), and the runner.

Each piece is an ordinary documented command (a reader can reproduce one figure by hand); it runs in its own
process in runs/docs-<commit>/<piece>/, and its results file is copied into benchmarks/results/ only when it
exits 0, with a `piece` row (argv, wall time, load at start and end) appended, so an interrupted run keeps every
finished piece (`--resume` skips the pieces whose committed files are already stamped with HEAD). In argv, {out}
is the piece's own directory and {NAME} the directory of the piece NAME (a checkpoint it trained)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from figures.provenance import stamp
from gptjax.bench.report import SCHEMA  # the results files' schema, which --compare checks on every row

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = "{readme}/run/model"  # the checkpoint the README's `gptjax train` writes, used by later pieces


@dataclass(frozen=True)
class Piece:
    """One command of the regeneration and the results file(s) it writes into benchmarks/results/."""

    name: str
    argv: tuple[str, ...]
    files: tuple[tuple[str, str], ...]  # (file the command writes in {out}, name under benchmarks/results/)
    minutes: float  # estimated on a quiet 2-core machine (the committed runs' own timings; plan 30, 1a/2b)
    needs: tuple[str, ...] = ()  # pieces whose output (a checkpoint) this one reads
    quiet: bool = True  # timing-sensitive: waits for a quiet machine unless --busy-ok
    env: dict[str, str] = field(default_factory=dict)
    requires: tuple[str, ...] = ()  # text its command's --help must show (a flag or capability still to come)
    stamped: bool = True  # the command writes its own environment row (every `gptjax bench`); else the runner does

    @property
    def results(self) -> tuple[str, ...]:
        """The names it writes under benchmarks/results/."""
        return tuple(dest for _, dest in self.files)

    def command(self) -> str:
        """The command line as a reader would type it."""
        env = " ".join(f"{k}={v}" for k, v in self.env.items())
        return (env + " " if env else "") + " ".join(a if " " not in a else repr(a) for a in self.argv)


def _bench(name: str, results: str, minutes: float, *flags: str, **kw) -> Piece:
    """A `gptjax bench` piece writing {out}/results.jsonl."""
    return Piece(name, ("gptjax", "bench", *flags, "--out", "{out}"), (("results.jsonl", results),), minutes, **kw)


def _study(name: str, results: str, minutes: float, study: str, *flags: str, **kw) -> Piece:
    """A `gptjax bench --study` piece writing {out}/results.jsonl (--out goes before the study's name)."""
    return Piece(name, ("gptjax", "bench", "--out", "{out}", "--study", study, *flags), (("results.jsonl", results),),
                 minutes, **kw)


FRONTIER = ("--budget", "120", "--teacher-factor", "8", "--teacher", "4x256x4", "--ladder", "1x256x4,2x128x2,1x64x2",
            "--vocab", "bpe:1024", "--precisions", "fp32,bf16,int8,w8a8")
PIECES: tuple[Piece, ...] = (
    Piece("readme", ("gptjax", "train", "--out", "{out}/run", "--no-progress"), (("results.jsonl", "readme-quickstart.jsonl"),),
          6, stamped=False),
    _bench("suite", "quick-gpt2-cpu.jsonl", 3, "--preset", "gpt2", "--peer", "hf"),
    _bench("suite-xla", "quick-gpt2-cpu-xla-only.jsonl", 3, "--preset", "gpt2", "--peer", "hf",
           env={"GPTJAX_CPU_KERNELS": "0"}),
    _bench("gemm", "gemm-gpt2-cpu.jsonl", 2.5, "--preset", "gpt2", "--peer", "hf", "--precision", "fp32,bf16,int8,w8a8",
           "--seq", "128,512", "--workloads", "prefill,train"),
    _bench("int4-suite", "int4-suite-gpt2-cpu.jsonl", 1, "--preset", "gpt2", "--precision", "int8,int4",
           "--workloads", "decode", "--batch", "1"),
    _bench("peers", "peers-gpt2-cpu.jsonl", 15, "--preset", "gpt2", "--peer", "llama.cpp,ct2,ort,hf",
           "--workloads", "decode,prefill"),
    _bench("train-reruns", "train-gpt2-cpu-reruns.jsonl", 1.5, "--preset", "gpt2", "--peer", "hf", "--workloads", "train",
           "--precision", "fp32,bf16", "--runs", "7"),
    _study("train-curves", "bf16-train-curves.jsonl", 9.5, "train-curves", "--steps", "300"),
    _study("quality", "int8-prefill-quality.jsonl", 4, "quality", "--checkpoint", QUICKSTART, "--seq-lens", "64,128",
           needs=("readme",), quiet=False),
    _study("int4", "int4.jsonl", 5, "int4", "--checkpoint", QUICKSTART, needs=("readme",)),
    _study("lm-eval", "lm-eval-byte-mini.jsonl", 8, "lm-eval", "--checkpoint", QUICKSTART, "--docs", "100",
           needs=("readme",)),
    Piece("attention", ("gptjax", "attention", "--checkpoint", QUICKSTART, "--prompt", "def add(a, b):\n    return a + b\n",
                        "--json", "{out}/attention.json", "--out", "{out}/attention.png"),
          (("attention.json", "attention-quickstart.jsonl"),), 1, needs=("readme",), quiet=False, stamped=False),
    _study("scaling", "scaling-byte-mini-cpu.jsonl", 5, "scaling", "--meshes", "1x1x1,8x1x1,1x8x1,1x1x8,2x2x2,2x1x4,4x2x1",
           requires=("collectives",)),
    _study("tracing-overhead", "tracing-overhead-cpu.jsonl", 5, "tracing-overhead"),
    Piece("monitoring", ("gptjax", "bench", "--out", "{out}", "--study", "monitoring"),
          (("signals.jsonl", "monitoring-signals.jsonl"), ("trace.jsonl", "monitoring-trace.jsonl")), 6),
    _study("speculative-gpt2", "speculative-gpt2-ngram-cpu.jsonl", 6, "speculative", "--target", "gpt2", "--drafts",
           "ngram", "--ks", "2,4,8", "--batches", "1,4", "--prompts", "8", "--new", "128"),
    _study("frontier", "frontier-cpu.jsonl", 35, "frontier", *FRONTIER),
    _study("frontier-big", "frontier-cpu-big-teacher.jsonl", 55, "frontier", "--budget", "270", "--teacher-factor", "3",
           "--teacher", "6x384x6", "--ladder", "2x384x6,3x192x3,2x128x2", "--vocab", "bpe:1024", "--precisions",
           "fp32,bf16,int8,w8a8,int4"),
    _study("speculative", "speculative-trained-cpu.jsonl", 7, "speculative", "--target", "{frontier-big}/runs/teacher/model",
           "--drafts", "ngram,{frontier-big}/runs/distilled-2x128x2/model,{frontier-big}/runs/distilled-3x192x3/model",
           "--ks", "2,4,8", "--batches", "1,4", "--prompts", "16", "--new", "96", needs=("frontier-big",)),
)


# ---- --list: which pieces can run today ------------------------------------------------------------------------
def executable(argv: Iterable[str]) -> list[str]:
    """argv with `gptjax` run as this interpreter's `python -m gptjax.cli` (the tree render.py sits in)."""
    argv = list(argv)
    return [sys.executable, "-m", "gptjax.cli", *argv[1:]] if argv[:1] == ["gptjax"] else argv


def help_argv(piece: Piece) -> list[str] | None:
    """The --help call that shows whether its command exists with its flags (None: not a gptjax command)."""
    if piece.argv[:1] != ("gptjax",):
        return None
    if "--study" in piece.argv:
        i = piece.argv.index("--study")
        return ["gptjax", "bench", "--study", piece.argv[i + 1], "--help"]
    return [*piece.argv[:2], "--help"]


def missing(piece: Piece, helps: dict[tuple[str, ...], tuple[int, str]]) -> str | None:
    """'what it needs' when its command, a flag of its argv or a `requires` text is not in the command's --help."""
    call = help_argv(piece)
    if call is None:
        return None
    code, text = helps[tuple(call)]
    if code != 0:
        return f"`{' '.join(call[:-1])}` (not a command yet)"
    wanted = [a for a in piece.argv if a.startswith("--") and a not in ("--out", "--study")] + list(piece.requires)
    absent = [w for w in wanted if w not in text]
    return f"{', '.join(absent)} in `{' '.join(call[:-1])}`" if absent else None


def run_helps(pieces: Iterable[Piece]) -> dict[tuple[str, ...], tuple[int, str]]:
    """Each distinct --help call's (exit status, output), run once."""
    out = {}
    for call in {tuple(c) for p in pieces if (c := help_argv(p))}:
        done = subprocess.run(executable(call), check=False, cwd=ROOT, capture_output=True, text=True, timeout=120)
        out[call] = (done.returncode, done.stdout + done.stderr)
    return out


def listing(pieces: Iterable[Piece], folder: Path) -> list[str]:
    """One line per piece: number, name, minutes, quiet, what it writes and the commit of that file now, and
    "ready" or "needs: ...". Then the total."""
    pieces = list(pieces)
    helps, lines = run_helps(pieces), []
    for i, p in enumerate(pieces, 1):
        have = [_file_state(folder / n) for n in p.results]
        need = missing(p, helps)
        lines.append(f"{i:2} {p.name:<17}{p.minutes:5.1f} min  {'quiet' if p.quiet else 'any  '}  "
                     f"{', '.join(have)}  {'needs: ' + need if need else 'ready'}")
    lines.append(f"total {sum(p.minutes for p in pieces):.0f} min on a quiet 2-core machine")
    return lines


def _file_state(path: Path) -> str:
    """'name@commit (N files changed in gptjax/ since)', or 'name (missing)'."""
    if not path.exists():
        return f"{path.name} (missing)"
    commit = stamp(read_rows(path)).commit
    if commit is None:
        return f"{path.name}@not-stamped"
    since = commit.split(" + ")[-1].removesuffix("+dirty")
    done = subprocess.run(["git", "diff", "--name-only", since, "HEAD", "--", "gptjax"], check=False, cwd=ROOT,
                          capture_output=True, text=True)
    behind = f", {len(done.stdout.split())} files of gptjax/ changed since" if done.returncode == 0 else ""
    return f"{path.name}@{commit}{behind}"


# ---- --rerun -----------------------------------------------------------------------------------------------------
def read_rows(path: Path) -> list[dict]:
    """The rows of a JSONL file."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def select(targets: list[str], page_files: dict[str, set[str]], pieces: tuple[Piece, ...] = PIECES) -> list[Piece]:
    """The pieces to run for `--rerun all | PAGE.md | PIECE...`, in manifest order, with the pieces they need."""
    by_name, chosen = {p.name: p for p in pieces}, set()
    for t in targets:
        if t == "all":
            chosen |= set(by_name)
        elif t.endswith(".md"):
            if t not in page_files:
                raise SystemExit(f"--rerun {t}: no such page; pages: {', '.join(sorted(page_files))}")
            chosen |= {p.name for p in pieces if set(p.results) & page_files[t]}
        elif t in by_name:
            chosen.add(t)
        else:
            raise SystemExit(f"--rerun {t!r}: not a piece or page; pieces: {', '.join(by_name)}, or all, or PAGE.md")
    for p in reversed(pieces):  # a piece's needs run before it
        if p.name in chosen:
            chosen |= set(p.needs)
    return [p for p in pieces if p.name in chosen]


def wait_quiet(load: Callable[[], float | None], wait_s: float, log: Callable[[str], None]) -> bool:
    """Wait (up to wait_s) for the 1-minute load to fall below 0.5 per core; False if it did not."""
    limit, deadline = 0.5 * (os.cpu_count() or 1), time.monotonic() + wait_s
    while (now := load() or 0.0) >= limit:
        if time.monotonic() >= deadline:
            return False
        log(f"load {now:.1f} >= {limit:.1f}: waiting for a quiet machine before a timing piece")
        time.sleep(min(30.0, wait_s))
    return True


def run_piece(piece: Piece, runs: Path, folder: Path, load: Callable[[], float | None],
              log: Callable[[str], None]) -> int:
    """Run one piece in runs/<name>/; on exit 0 copy its files (a piece row appended) into folder."""
    out = runs / piece.name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    fill = {"out": str(out)} | {p.name: str(runs / p.name) for p in PIECES}
    argv = [re.sub(r"\{([a-z0-9-]+)\}", lambda m: fill.get(m.group(1), m.group(0)), a) for a in piece.argv]
    log(f"{piece.name}: {piece.command()}")
    before, start = load(), time.perf_counter()
    with open(out / "log.txt", "w") as f:
        code = subprocess.run(executable(argv), check=False, cwd=ROOT, env=os.environ | piece.env, stdout=f,
                              stderr=subprocess.STDOUT).returncode
    # a row like the bench's (schema and all): --compare reads every row of the file it lands in
    row = {"schema": SCHEMA, "kind": "piece", "name": piece.name, "argv": argv,
           "wall_s": round(time.perf_counter() - start, 1),
           "load_avg_1m": [before, load()], "status": "ok" if code == 0 else f"exit {code}"}
    if code != 0:
        log(f"{piece.name} failed (exit {code}); its log: {out / 'log.txt'}; the pieces before it are kept")
        return code
    for i, (source, dest) in enumerate(piece.files):
        rows = _environment_rows(out) + [_output(out)] if not piece.stamped and i == 0 else []
        rows += read_rows(out / source) if (out / source).exists() else []
        _write_atomic(folder / dest, rows + ([row] if i == 0 else []))
        log(f"{piece.name}: wrote {folder / dest} ({row['wall_s']:.0f} s)")
    return 0


def _environment_rows(out: Path) -> list[dict]:
    """The environment row for a command that writes none (gptjax train, gptjax attention)."""
    from gptjax.bench.results import open_results

    return read_rows(Path(open_results(str(out / "env"), lambda _: None).path))


def _output(out: Path, lines: int = 20) -> dict:
    """The last lines the command printed (gptjax train's `done:` line): what the README quotes."""
    return {"kind": "output", "tail": (out / "log.txt").read_text().splitlines()[-lines:]}


def _write_atomic(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)


def rerun(pieces: list[Piece], folder: Path, runs: Path, commit: str, resume: bool = False, busy_ok: bool = False,
          load: Callable[[], float | None] | None = None, wait_s: float = 600, log: Callable[[str], None] = print) -> int:
    """Run the pieces in order; stop at the first failure (or a machine that stays busy), keeping finished ones."""
    from gptjax.timing import load_average

    load = load or load_average
    for piece in pieces:
        done = [folder / n for n in piece.results]
        if resume and all(p.exists() and stamp(read_rows(p)).commit == commit[:7] for p in done):  # clean, at HEAD
            log(f"{piece.name}: already stamped with {commit[:7]}, skipped (--resume)")
            continue
        if piece.quiet and not busy_ok and not wait_quiet(load, wait_s, log):
            log(f"stopped before {piece.name}: the machine stayed busy (rerun later with --resume, or --busy-ok)")
            return 1
        if code := run_piece(piece, runs, folder, load, log):
            return code
    return 0
