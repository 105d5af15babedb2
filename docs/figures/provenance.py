"""Where a figure's numbers come from: each results file's stamp (commit, time, CPU, load, ceilings), the
`provenance` block a page ends with (every file its blocks and pictures read) and the `results-index` block of
benchmarks/results/README.md (every file, the piece that writes it, the pages that read it). These two blocks
are rendered per page, after the others, from what the engine recorded (a PageContext)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from figures.common import Results, Row
from figures.formats import num, table


@dataclass(frozen=True)
class Stamp:
    """What a results file says about its run; commit None: it names none (a file from before the stamps)."""

    commit: str | None  # short, "+dirty" when the tree had uncommitted changes
    full: str | None  # the full commit, where the file records it
    time: str | None  # UTC, ISO 8601
    cpu: str | None
    cores: int | None
    loads: tuple[float, float] | None  # lowest and highest 1-minute load average any row recorded
    ceiling: Row | None  # the first ceiling row: the machine's measured matmul peaks and bandwidth


def stamp(rows: list[Row]) -> Stamp:
    """The stamp of a results file: its environment rows (env.commit/clean/time, or env.git before those), or the
    monitoring study's and the loss-curve script's first row (commit, git). A file holding several runs at
    different commits has them all in `commit`, joined by " + "."""
    heads = [r for r in rows if r.get("kind") in ("environment", "run")] or rows[:1]
    env = (heads[0].get("env") or heads[0]) if heads else {}
    commits = list(dict.fromkeys(c for h in heads if (c := _commit(h.get("env") or h)[1])))
    moment = env.get("time")
    if isinstance(moment, float | int):
        moment = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(moment))
    loads = [v for r in rows for v in _loads(r)]
    ceiling = next((r for r in rows if r.get("kind") == "ceiling"), None)
    return Stamp(" + ".join(commits) or None, _commit(env)[0] if len(commits) == 1 else None, moment,
                 env.get("cpu"), env.get("cores"), (min(loads), max(loads)) if loads else None, ceiling)


def _commit(env: Row) -> tuple[str | None, str | None]:
    """(full commit or None, short commit with "+dirty" when the tree was not clean) of one environment."""
    full = env.get("commit") if len(env.get("commit") or "") == 40 else None
    return full, (full[:7] + ("" if env.get("clean") else "+dirty")) if full else env.get("git") or env.get("commit")


def _loads(row: Row) -> list[float]:
    """Every 1-minute load average a row (or its env) recorded."""
    found = [v for part in (row, row.get("env") or {}) for k, v in part.items()
             if k.startswith("load_avg") and isinstance(v, float | int)]
    return found + [v for v in row.get("load_avg_1m_range") or []]


@dataclass(frozen=True)
class PageContext:
    """What the engine recorded: the files this page's blocks and pictures read, and which pages read each file."""

    used: tuple[str, ...]
    reads: dict[str, list[str]] = field(default_factory=dict)
    pending: dict[str, str] = field(default_factory=dict)  # file -> reason, from the page's pending markers


def _ceilings(c: Row | None) -> list[str]:
    """'0.470 / 0.439 / 0.703', kernels' 'bf16 / int8', read GB/s; '-' where not measured."""
    if c is None:
        return ["-", "-", "-"]
    xla = " / ".join(f"{c['matmul_flops'][d] / 1e12:.3f}" for d in ("fp32", "bf16", "int8"))
    kernels = " / ".join(f"{v / 1e12:.3f}" for v in (c.get("kernel_flops") or {}).values()) or "-"
    return [xla, kernels, f"{c['bandwidth']['read'] / 1e9:.1f}"]


def _row(name: str, s: Stamp) -> list[str]:
    where = f"{s.cpu}, {s.cores} cores" if s.cpu else "-"
    loads = f"{s.loads[0]:.1f}-{s.loads[1]:.1f}" if s.loads else "-"
    return [f"`{name}`", s.commit or "not stamped", s.time or "not recorded", where, loads, *_ceilings(s.ceiling)]


def provenance(results: Results, page: PageContext) -> str:
    """Per results file this page reads: commit, time, CPU and cores, load range and the run's measured ceilings."""
    present = [n for n in page.used if n in results]
    stamps = {n: stamp(dict.__getitem__(results, n)) for n in present}
    commits = sorted({s.commit or "not stamped" for s in stamps.values()})
    body = [_row(n, s) for n, s in stamps.items()]
    body += [[f"`{n}`", "pending", "-", "-", "-", "-", "-", "-"] for n in page.used if n not in present]
    head = (f"Every figure on this page was measured at commit {commits[0]}." if len(commits) == 1 else
            f"The figures on this page come from {len(commits)} commits ({', '.join(commits)}): see the note above.")
    return (f"\n{head}\n" + table(["results file", "commit", "measured (UTC)", "CPU", "load (1 min)",
                                   "matmul fp32 / bf16 / int8 TFLOP/s (XLA)", "kernels bf16 / int8", "read GB/s"],
                                  body))


def results_index(results: Results, page: PageContext) -> str:
    """Every results file: the piece and command that write it, its commit, date, rows, load range, the piece's
    wall time and the pages that read it."""
    import pieces  # docs/pieces.py: the manifest of `render.py --rerun`

    by_file = {name: p for p in pieces.PIECES for name in p.results}
    body = []
    for name in sorted(results.keys()):
        rows, piece = dict.__getitem__(results, name), by_file.get(name)
        s, wall = stamp(rows), next((r["wall_s"] for r in rows if r.get("kind") == "piece"), None)
        body.append([f"[`{name}`]({name})", piece.name if piece else "-",
                     f"`{piece.command()}`" if piece else "(no piece: an archived or converted run)",
                     s.commit or "not stamped", s.time or "-", str(len(rows)),
                     f"{s.loads[0]:.1f}-{s.loads[1]:.1f}" if s.loads else "-",
                     "-" if wall is None else f"{num(wall / 60)} min",
                     ", ".join(page.reads.get(name, [])) or "no page"])
    body += [[f"`{name}`", p.name, f"`{p.command()}`", "not run yet", "-", "-", "-", f"~{num(p.minutes)} min (est.)",
              ", ".join(page.reads.get(name, [])) or "no page"] for name, p in by_file.items() if name not in results]
    return table(["file", "piece", "command", "commit", "measured (UTC)", "rows", "load (1 min)", "piece wall time",
                  "read by"], body)


# the blocks rendered per page from what the engine recorded: (results, the page's context) -> text
PAGE_BLOCKS: dict[str, Callable[[Results, PageContext], str]] = {"provenance": provenance,
                                                                  "results-index": results_index}


def describe(name: str, s: Stamp) -> str:
    """'file@commit' for messages."""
    return f"{name}@{s.commit or 'not-stamped'}"


def commit_of(rows: list[Row]) -> str:
    """The commit a file was measured at, for comparing files ('not stamped' when it names none)."""
    return stamp(rows).commit or "not stamped"

