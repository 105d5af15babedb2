"""What every figure module shares: the results files as loaded (reading a missing one is a named error, and
every file read is recorded), the lookups of a row, and the two registries docs/render.py renders from:
`@block("name")` (a function results -> the text of `<!-- render:name -->`) and `@plot("stem", files=...)` (a
function results -> a matplotlib figure, drawn as docs/img/stem-<hash>.png and linked by the block img-stem)."""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
Row = dict[str, Any]


class MissingResults(LookupError):
    """A block or a plot read a results file that is not in the folder."""

    def __init__(self, name: str, folder: Path) -> None:
        self.name = name
        super().__init__(f"{folder.name}/{name} does not exist: run the piece that writes it (`python docs/render.py "
                         f"--list`), or mark the page `<!-- pending: {name} REASON -->` until it runs")


class Results(dict[str, list[Row]]):
    """The results files of a folder by name (a list of rows each); `used` records every name read, so the engine
    knows which files each page and picture shows."""

    def __init__(self, files: dict[str, list[Row]], folder: Path = RESULTS) -> None:
        super().__init__(files)
        self.folder = folder
        self.used: set[str] = set()

    def __getitem__(self, name: str) -> list[Row]:
        self.used.add(name)
        if not dict.__contains__(self, name):
            raise MissingResults(name, self.folder)
        return dict.__getitem__(self, name)

    def recorder(self) -> Results:
        """The same files with an empty `used`: one per block or plot."""
        return Results(self, self.folder)


def find(rows: list[Row], workload: str, backend: str, precision: str, batch: int | None = None) -> Row:
    """The one measured row of that identity (batch None: any); a KeyError names it if it is missing."""
    for r in rows:
        if (r.get("kind") == "workload" and r["workload"] == workload and r["backend"] == backend
                and r["precision"] == precision and (batch is None or r["batch"] == batch)):
            return r
    raise KeyError(f"no {workload} {backend} {precision} B={batch} row")


def find_or_none(rows: list[Row], workload: str, backend: str, precision: str, batch: int | None = None) -> Row | None:
    """find's row, or None where the run did not measure it (e.g. HF w8a8 since the peers run: no such mode)."""
    try:
        return find(rows, workload, backend, precision, batch)
    except KeyError:
        return None


def of_kind(rows: list[Row], kind: str) -> Row:
    """The first row of that kind (environment, ceiling)."""
    return next(r for r in rows if r.get("kind") == kind)


@dataclass
class Page:
    """A document as it is and as rendered, what its blocks read, and what is wrong with it."""

    path: Path
    text: str
    new: str
    used: set[str]
    pending: dict[str, str]
    errors: list[str]


# ---- the registries ---------------------------------------------------------------------------------------
BLOCKS: dict[str, Callable[[Results], str]] = {}


@dataclass(frozen=True)
class Plot:
    """A picture: draw(results) -> figure, reading only `files`; `uses` are the helpers whose source, with
    draw's, is hashed with the data (a restyled picture is a new picture)."""

    stem: str
    draw: Callable[[Results], Any]
    files: tuple[str, ...]
    alt: str
    uses: tuple[Callable[..., Any], ...] = ()

    def data_hash(self, results: Results) -> str:
        """sha256 of the rows of its files and its drawing code (canonical JSON)."""
        code = "".join(inspect.getsource(f) for f in (self.draw, *self.uses))
        data = {"files": {name: results[name] for name in self.files}, "code": code}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()

    def file_name(self, results: Results) -> str:
        """'stem-<first 12 hex of the hash>.png': new data or code, a new name, so the page's link changes too."""
        return f"{self.stem}-{self.data_hash(results)[:12]}.png"

    def link(self, results: Results) -> str:
        """The markdown image link a page shows it with (pages sit in docs/)."""
        return f"![{self.alt}](img/{self.file_name(results)})"


PLOTS: dict[str, Plot] = {}


def block(name: str) -> Callable[[Callable[[Results], str]], Callable[[Results], str]]:
    """Register the function as the renderer of `<!-- render:name -->`."""
    def register(f: Callable[[Results], str]) -> Callable[[Results], str]:
        BLOCKS[name] = f
        return f
    return register


def plot(stem: str, files: tuple[str, ...], alt: str, uses: tuple[Callable[..., Any], ...] = ()) -> Callable:
    """Register the function as the picture docs/img/stem-<hash>.png, linked by the block `img-stem`."""
    def register(draw: Callable[[Results], Any]) -> Callable[[Results], Any]:
        PLOTS[stem] = entry = Plot(stem, draw, files, alt, uses)
        BLOCKS[f"img-{stem}"] = entry.link
        return draw
    return register


def log_axis(ax: Any, axis: str = "y") -> None:
    """A log axis ticked at 1, 2, 5 x 10^k (at 10^k alone over more than three decades) in plain numbers with SI
    suffixes (500G, not 5e+11), so even a short range has labelled ticks and a long one no crowded labels."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    getattr(ax, f"set_{axis}scale")("log")
    scale = getattr(ax, f"{axis}axis")
    low, high = sorted(getattr(ax, f"get_{axis}lim")())  # the log scale's limits: set the scale first
    scale.set_major_locator(LogLocator(subs=(1,) if high > 1000 * low else (1, 2, 5)))
    scale.set_major_formatter(FuncFormatter(lambda v, _: si(v)))
    scale.set_minor_formatter(NullFormatter())


def si(v: float) -> str:
    """1500 -> '1.5k', 5e11 -> '500G', 0.2 -> '0.2'."""
    for factor, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= factor:
            return f"{v / factor:g}{suffix}"
    return f"{v:g}"
