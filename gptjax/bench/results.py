"""One run's results directory, shared by the suite and the studies: DIR/results.jsonl (the schema of
gptjax.bench.report, one line per row, appended as measured so an interrupted run keeps what it measured;
the first row records the environment) and DIR/results.md (the run's tables)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from dataclasses import dataclass
from typing import Any, NamedTuple

from gptjax.bench.env import environment
from gptjax.bench.report import SCHEMA, environment_line, write_jsonl
from gptjax.errors import GptjaxError


class Outcome(NamedTuple):
    """What a study measured: its rows (kind "study" is added), a title and markdown table, its exit status."""

    rows: list[dict[str, Any]]
    title: str
    table: str
    status: int = 0


@dataclass(frozen=True)
class Results:
    """A results directory being written: its rows share `base` (schema, run id)."""

    out: str
    base: dict[str, Any]
    env: dict[str, Any]
    extra: dict[str, Any]  # more fields of the environment row, e.g. a study's arguments

    @property
    def environment_row(self) -> dict[str, Any]:
        """The first row: the environment the run measured in."""
        return self.base | {"kind": "environment", "env": self.env} | self.extra

    @property
    def path(self) -> str:
        """DIR/results.jsonl."""
        return os.path.join(self.out, "results.jsonl")

    def write(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Append rows (each completed with the base fields first); return them as written."""
        rows = [self.base | row for row in rows]
        write_jsonl(self.path, rows)
        return rows

    def finish(self, title: str, body: str, log: Any) -> str:
        """Write DIR/results.md (title, the environment, body) and log it; return its text."""
        text = f"## {title}\n\n{environment_line(self.env)}\n\n{body}\n"
        with open(os.path.join(self.out, "results.md"), "w", encoding="utf-8") as f:
            f.write(text)
        log("\n" + text)
        log(f"results: {self.path}, {os.path.join(self.out, 'results.md')}")
        return text


def open_results(out: str, log: Any, peer_threads: int | None = None, peer: bool = False,
                 **environment_fields: Any) -> Results:
    """Create DIR (emptying its results.jsonl: one run per file), record the environment (with any extra
    fields, e.g. a study's arguments) as its first row, and warn when other work already loads the cores (and
    what that does to a peer, when `peer` was asked for)."""
    os.makedirs(out, exist_ok=True)
    open(os.path.join(out, "results.jsonl"), "w").close()
    env = environment(peer_threads)
    warn_if_busy(env, log, peer)
    log(f"environment: {env}")
    results = Results(out, {"schema": SCHEMA, "run": uuid.uuid4().hex[:12]}, env, environment_fields)
    write_jsonl(results.path, [results.environment_row])
    return results


def warn_if_busy(env: dict[str, Any], log: Any, peer: bool = False) -> None:
    """Say so when other work already loads the cores: timings are noisy then, and, when a peer was asked for,
    its OpenMP threads (spin-waiting at barriers) slow down far more than XLA's pool when a core is taken."""
    load, cores = env.get("load_avg_1m"), env.get("cores") or 1
    if env["platform"] == "cpu" and load is not None and load > 0.5 * cores:
        openmp = ("; the peer (OpenMP) suffers more than XLA (measured here: torch prefill 7x slower with 2 threads "
                  "than 1 while another process held a core); see --peer-threads") if peer else ""
        log(f"warning: 1-minute load average {load:.1f} on {cores} cores before the run: other work competes for the "
            f"CPU; timings are noisy{openmp}")


def child_result(module: str, *argv: str) -> dict[str, Any]:
    """The JSON object that `python -m module argv...` prints last: what a study measures in a fresh process
    (a tracer provider of its own, a clean peak RSS); a GptjaxError with the end of its stderr if it fails."""
    done = subprocess.run([sys.executable, "-m", module, *argv], capture_output=True, text=True)
    if done.returncode != 0:
        raise GptjaxError(f"{module} exited with status {done.returncode}: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
