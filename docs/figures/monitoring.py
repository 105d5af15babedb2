"""Monitoring (docs/monitoring.md): the three signals under a mixed load and a served request's trace waterfall,
from `gptjax bench --study monitoring`."""

from __future__ import annotations

import json
from typing import Any

from figures.common import PLOTS, Results, Row, block, log_axis, plot, si
from figures.formats import ms, num, pct, table

SIGNALS = "monitoring-signals.jsonl"  # `gptjax bench --study monitoring`: Prometheus's query_range of the signals

TRACE = "monitoring-trace.jsonl"  # ... and the spans of one served completion, as an OTLP receiver got them

@block("monitoring-signals")
def monitoring_signals(results: Results) -> str:
    """The three signals' picture and what produced it."""
    rows = results[SIGNALS]
    run = rows[0]
    phases = ", ".join(f"{p['clients']} for {p['end'] - p['start']:.0f} s" for p in run["phases"])
    statuses = {}
    for p in run["phases"]:
        for code, n in p["statuses"].items():
            statuses[code] = statuses.get(code, 0) + n
    return (f"\n![throughput, TTFT and TPOT percentiles and errors by class over a load run](img/"
            f"{PLOTS['monitoring-signals'].file_name(results)})\n\n`gptjax bench --study monitoring` at commit "
            f"{run['commit']} (checkpoint {run['args']['checkpoint'] or run['args']['preset']}, max_tokens "
            f"{run['args']['max_tokens']}): clients {phases}; responses by status {json.dumps(statuses)}. Each line "
            "is a series of deploy/rules/recording.yml as Prometheus 2.42 recorded it every 5 s; at the end of "
            "each phase (its last minute):\n" + _phase_table(rows))


def _phase_table(rows: list[Row]) -> str:
    """Each signal's value at the end of each load phase (the recording rules' 1-min window then covers it)."""
    def at(query: str, t: float, label: str = "") -> float:
        for labels, ts, vs in _series(rows, query):
            if labels == label:
                return float(vs[abs(ts - (t - rows[0]["start"])).argmin()])
        return float("nan")

    body = []
    for p in rows[0]["phases"]:
        t = p["end"]
        body.append([str(p["clients"]), num(at("gptjax:generated_tokens:rate1m", t), 0)]
                    + [ms(at(f"gptjax:{m}_seconds:{q}_1m", t)) for m in ("time_to_first_token", "time_per_output_token")
                       for q in ("p50", "p95")] + [pct(at("gptjax:completion_errors:ratio_rate1m", t, "4xx"))])
    return table(["clients", "generated tokens/s", "TTFT p50 ms", "TTFT p95 ms", "TPOT p50 ms", "TPOT p95 ms",
                  "4xx share"], body)


@block("monitoring-trace")
def monitoring_trace(results: Results) -> str:
    """The served request's waterfall and what produced it."""
    rows = results[TRACE]
    spans = [r for r in rows if r.get("kind") == "span"]
    return (f"\n![the spans of one served completion](img/{PLOTS['monitoring-trace'].file_name(results)})\n\n"
            f"{len(spans)} spans of trace `{rows[0]['trace_id']}` (commit {rows[0]['commit']}), as the in-process "
            "OTLP receiver got them from `gptjax serve --trace otlp`.\n")


def _series(rows: list[Row], query: str) -> list[tuple[str, Any, Any]]:
    """(label text, seconds since the run started, values) of each series the query returned."""
    import numpy as np

    start = rows[0]["start"]
    out = []
    for r in rows:
        if r.get("kind") == "series" and r["query"] == query:
            t, v = np.array([[float(x), float(y)] for x, y in r["values"]]).T
            out.append((",".join(x for k, x in sorted(r["labels"].items()) if k != "__name__"), t - start, v))
    return out


def _phases(ax: Any, run: Row) -> None:
    """Each load phase shaded and labelled with its client count."""
    for i, p in enumerate(run["phases"]):
        a, b = p["start"] - run["start"], p["end"] - run["start"]
        ax.axvspan(a, b, color="grey", alpha=0.12 if i % 2 else 0.05, lw=0)
        ax.text((a + b) / 2, 1.0, f"{p['clients']} client{'s' if p['clients'] > 1 else ''}", fontsize=8,
                ha="center", va="top", transform=ax.get_xaxis_transform())


@plot("monitoring-signals", files=(SIGNALS,), alt="throughput, TTFT and TPOT percentiles and errors by class over a load run",
      uses=(_series, _phases, log_axis, si))
def plot_signals(results: Results) -> Any:
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
            for labels, t, v in _series(rows, query):
                ax.plot(t, v * scale, label=label.format(labels), marker=".", ms=3)
        if scale == 1e3:  # latency: p50 and p95 lie 10x apart
            log_axis(ax)
        else:
            ax.set_ylim(bottom=0)
        ax.set(ylabel=ylabel)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # beside the plot, off the phases
    axes[0].set_title("gptjax serve under a mixed load: deploy/'s rules as Prometheus recorded them", fontsize=10)
    axes[-1].set(xlabel="seconds since the load started")
    return fig


def _span_note(s: Row) -> str:
    """A span's duration and the attributes worth reading beside its bar."""
    a, ms = s["attributes"], (s["end_ns"] - s["start_ns"]) / 1e6
    note = f"{ms:.1f} ms"
    if "gptjax.seq_len" in a and s["name"] in ("gptjax.prefill", "gptjax.decode"):
        note += f", seq_len {a['gptjax.seq_len']}" + (", compiled" if a.get("gptjax.compiled") else "")
    if "gen_ai.usage.output_tokens" in a:
        note += f", {a['gen_ai.usage.input_tokens']} in / {a['gen_ai.usage.output_tokens']} out"
    return note
@plot("monitoring-trace", files=(TRACE,), alt="the spans of one served completion", uses=(_span_note,))
def plot_trace(results: Results) -> Any:
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
        ax.text(b, y, "  " + _span_note(s), va="center", fontsize=8)
        ax.text(-0.5 + 0.025 * depth, y, s["name"], va="center", ha="left", fontsize=8,
                transform=ax.get_yaxis_transform())  # indented under its parent
    ax.set(yticks=[], xlabel="ms since the request's first span started", ylim=(len(spans) - 0.5, -0.5))
    ax.set_title(f"one completion through gptjax serve, trace {rows[0]['trace_id'][:8]}… (| = a generated token)",
                 fontsize=9)
    ax.set_xlim(0, 1.45 * (max(s["end_ns"] for s in spans) - t0) / 1e6)  # room for the notes right of the bars (8 pt)
    return fig
