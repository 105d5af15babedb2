"""docs/monitoring.md's two pictures, drawn by docs/render.py: the three signals of a load run and a served
request's trace waterfall. Each is named by the hash of its data (benchmarks/results/monitoring-*.jsonl) and embeds
it as the PNG's Source text, so `python docs/render.py --check` fails while a picture is missing or stale."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

IMG = Path(__file__).resolve().parent / "img"
SIGNALS = "monitoring-signals.jsonl"  # `gptjax bench --study monitoring`: Prometheus's query_range of the signals
TRACE = "monitoring-trace.jsonl"  # ... and the spans of one served completion, as an OTLP receiver got them

Row = dict[str, Any]
Results = dict[str, list[Row]]


def data_hash(rows: list[Row]) -> str:
    """sha256 of a results file's rows (canonical JSON): what a hashed picture is named by and embeds."""
    import hashlib

    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()


def hashed_name(stem: str, rows: list[Row]) -> str:
    """'stem-<first 12 hex of the data's hash>.png': new data, a new name, so the document's link changes too."""
    return f"{stem}-{data_hash(rows)[:12]}.png"


def signals_text(rows: list[Row]) -> str:
    """The signals' picture and what produced it: the run, its phases and its responses by status."""
    run = rows[0]
    phases = ", ".join(f"{p['clients']} for {p['end'] - p['start']:.0f} s" for p in run["phases"])
    statuses: dict[str, int] = {}
    for p in run["phases"]:
        for code, n in p["statuses"].items():
            statuses[code] = statuses.get(code, 0) + n
    return (f"\n![throughput, TTFT and TPOT percentiles and errors by class over a load run](img/"
            f"{hashed_name('monitoring-signals', rows)})\n\n`gptjax bench --study monitoring` at commit "
            f"{run['commit']} (checkpoint {run['args']['checkpoint'] or run['args']['preset']}, max_tokens "
            f"{run['args']['max_tokens']}): clients {phases}; responses by status {json.dumps(statuses)}. Each line "
            "is a series of deploy/rules/recording.yml as Prometheus 2.42 recorded it every 5 s; at the end of "
            "each phase (its last minute):\n")


def phase_ends(rows: list[Row]) -> list[tuple[float, ...]]:
    """Per load phase: clients, generated tokens/s, TTFT p50/p95, TPOT p50/p95 (s) and the 4xx share at its end
    (the recording rules' 1-min window then covers the phase)."""
    def at(query: str, t: float, label: str = "") -> float:
        for labels, ts, vs in series(rows, query):
            if labels == label:
                return float(vs[abs(ts - (t - rows[0]["start"])).argmin()])
        return float("nan")

    latencies = [f"gptjax:{m}_seconds:{q}_1m" for m in ("time_to_first_token", "time_per_output_token")
                 for q in ("p50", "p95")]
    return [(p["clients"], at("gptjax:generated_tokens:rate1m", p["end"]), *(at(q, p["end"]) for q in latencies),
             at("gptjax:completion_errors:ratio_rate1m", p["end"], "4xx")) for p in rows[0]["phases"]]


def trace_text(rows: list[Row]) -> str:
    """The served request's waterfall and what produced it."""
    spans = [r for r in rows if r.get("kind") == "span"]
    return (f"\n![the spans of one served completion](img/{hashed_name('monitoring-trace', rows)})\n\n"
            f"{len(spans)} spans of trace `{rows[0]['trace_id']}` (commit {rows[0]['commit']}), as the in-process "
            "OTLP receiver got them from `gptjax serve --trace otlp`.\n")


def series(rows: list[Row], query: str) -> list[tuple[str, Any, Any]]:
    """(label text, seconds since the run started, values) of each series the query returned."""
    import numpy as np

    start = rows[0]["start"]
    out = []
    for r in rows:
        if r.get("kind") == "series" and r["query"] == query:
            t, v = np.array([[float(x), float(y)] for x, y in r["values"]]).T
            out.append((",".join(x for k, x in sorted(r["labels"].items()) if k != "__name__"), t - start, v))
    return out


def plot_signals(results: Results, path: Path) -> None:
    """Throughput, TTFT and TPOT percentiles and errors by class over the load run, phases shaded."""
    import matplotlib.pyplot as plt

    rows = results[SIGNALS]
    panels = [("tokens/s", 1, [("gptjax:generated_tokens:rate1m", "generated"), ("gptjax:prompt_tokens:rate1m",
                                                                                 "prompt")]),
              ("time to first token, ms", 1e3, [("gptjax:time_to_first_token_seconds:p50_1m", "p50"),
                                               ("gptjax:time_to_first_token_seconds:p95_1m", "p95")]),
              ("time per output token, ms", 1e3, [("gptjax:time_per_output_token_seconds:p50_1m", "p50"),
                                                 ("gptjax:time_per_output_token_seconds:p95_1m", "p95")]),
              ("share of completions, %", 100, [("gptjax:completion_errors:ratio_rate1m", "{} (1 min)"),
                                                ("gptjax:completion_server_errors:ratio_rate5m", "5xx (5 min, SLO)")])]
    fig, axes = plt.subplots(len(panels), 1, figsize=(9.5, 8.5), sharex=True)
    for ax, (ylabel, scale, queries) in zip(axes, panels):
        _phases(ax, rows[0])
        for query, label in queries:
            for labels, t, v in series(rows, query):
                ax.plot(t, v * scale, label=label.format(labels), marker=".", ms=3)
        if scale == 1e3:  # latency: p50 and p95 lie 10x apart
            _log_axis(ax)
        else:
            ax.set_ylim(bottom=0)
        ax.set(ylabel=ylabel)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # beside the plot, off the phases
    axes[0].set_title("gptjax serve under a mixed load: deploy/'s rules as Prometheus recorded them", fontsize=10)
    axes[-1].set(xlabel="seconds since the load started")
    save(fig, path, rows)


def _log_axis(ax: Any) -> None:
    """A log y axis ticked at 1, 2, 5 x 10^k in plain numbers."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _phases(ax: Any, run: Row) -> None:
    """Each load phase shaded and labelled with its client count."""
    for i, p in enumerate(run["phases"]):
        a, b = p["start"] - run["start"], p["end"] - run["start"]
        ax.axvspan(a, b, color="grey", alpha=0.12 if i % 2 else 0.05, lw=0)
        ax.text((a + b) / 2, 1.0, f"{p['clients']} client{'s' if p['clients'] > 1 else ''}", fontsize=7,
                ha="center", va="top", transform=ax.get_xaxis_transform())


def plot_trace(results: Results, path: Path) -> None:
    """A waterfall of the served request's spans: one bar per span, indented under its parent, token events
    marked on the decode chunks."""
    import matplotlib.pyplot as plt

    rows = results[TRACE]
    spans = sorted((r for r in rows if r.get("kind") == "span"), key=lambda s: s["start_ns"])
    ids, t0 = {s["span_id"]: s for s in spans}, spans[0]["start_ns"]
    fig, ax = plt.subplots(figsize=(9, 0.32 * len(spans) + 1.2))
    for y, s in enumerate(spans):
        depth, parent = 0, s["parent_id"]
        while parent in ids:
            depth, parent = depth + 1, ids[parent]["parent_id"]
        a, b = (s["start_ns"] - t0) / 1e6, (s["end_ns"] - t0) / 1e6
        colour = {"gptjax.prefill": "C2", "gptjax.decode": "C3"}.get(s["name"], "C1" if s["name"].startswith(
            "text_completion") else "C0" if s["name"].startswith("gptjax.") else "grey")
        ax.barh(y, max(b - a, 0.02), left=a, color=colour, height=0.6)
        ticks = [(e["time_ns"] - t0) / 1e6 for e in s["events"] if e["name"] == "gptjax.token"]
        ax.plot(ticks, [y] * len(ticks), "k|", ms=7)
        ax.text(b, y, "  " + _span_note(s), va="center", fontsize=7)
        ax.text(-0.5 + 0.025 * depth, y, s["name"], va="center", ha="left", fontsize=7,
                transform=ax.get_yaxis_transform())  # indented under its parent
    ax.set(yticks=[], xlabel="ms since the request's first span started", ylim=(len(spans) - 0.5, -0.5))
    ax.set_title(f"one completion through gptjax serve, trace {rows[0]['trace_id'][:8]}… (| = a generated token)",
                 fontsize=9)
    ax.margins(x=0.25)
    save(fig, path, rows)


def _span_note(s: Row) -> str:
    """A span's duration and the attributes worth reading beside its bar."""
    a, ms = s["attributes"], (s["end_ns"] - s["start_ns"]) / 1e6
    note = f"{ms:.1f} ms"
    if "gptjax.seq_len" in a and s["name"] in ("gptjax.prefill", "gptjax.decode"):
        note += f", seq_len {a['gptjax.seq_len']}" + (", compiled" if a.get("gptjax.compiled") else "")
    if "gen_ai.usage.output_tokens" in a:
        note += f", {a['gen_ai.usage.input_tokens']} in / {a['gen_ai.usage.output_tokens']} out"
    return note


def save(fig: Any, path: Path, rows: list[Row]) -> None:
    """Write the figure with its data's hash as the PNG's Source text (and no version stamp: same data, same bytes)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, metadata={"Software": None, "Source": f"sha256:{data_hash(rows)}"})
    plt.close(fig)


# stem -> (results file, plot): drawn as docs/img/stem-<hash>.png; --check fails while one is missing or stale
HASHED_PLOTS: dict[str, tuple[str, Callable[[Results, Path], None]]] = {
    "monitoring-signals": (SIGNALS, plot_signals), "monitoring-trace": (TRACE, plot_trace)}


def png_source(path: Path) -> str | None:
    """The Source text a PNG embeds ('sha256:...'), or None."""
    from PIL import Image  # matplotlib's own dependency

    with Image.open(path) as image:
        return image.text.get("Source")


def stale_images(results: Results, img: Path = IMG) -> list[Path]:
    """The hashed pictures that are missing, or embed another data hash than their results file's."""
    return [img / hashed_name(stem, results[name]) for stem, (name, _) in HASHED_PLOTS.items()
            if not (img / hashed_name(stem, results[name])).exists()
            or png_source(img / hashed_name(stem, results[name])) != f"sha256:{data_hash(results[name])}"]


def draw_hashed(results: Results, img: Path = IMG) -> None:
    """Draw each hashed picture from its data, removing its pictures of older data."""
    for stem, (name, draw) in HASHED_PLOTS.items():
        path = img / hashed_name(stem, results[name])
        for old in img.glob(f"{stem}-*.png"):
            if old != path:
                old.unlink()
        draw(results, path)
