"""Plots of a run (matplotlib, the `bench` extra): decode tokens/s vs batch size per precision, a roofline
placing each workload against every measured ceiling, and latency CDFs (one panel per workload).

One style for all of them, so they can be read side by side: the colour says the precision mode (MODE_COLOURS,
fixed), the line style the backend (gptjax solid, each peer its own), the marker the workload; log axes carry
1-2-5 ticks with plain labels (2k, not 2×10³), every text is at least 8 pt and no point carries a label."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

FONT = 8  # pt, the smallest text of any plot
MODE_COLOURS = {"fp32": "#1f77b4", "bf16": "#ff7f0e", "int8": "#2ca02c", "w8a8": "#d62728", "int4": "#9467bd",
                "fp8": "#8c564b"}
OTHER_COLOURS = ("#e377c2", "#7f7f7f", "#bcbd22", "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39")
BACKEND_STYLES = {"jax": "-", "numpy": (0, (1, 1)), "hf": "--", "llama.cpp": "-.", "ct2": (0, (3, 1, 1, 1, 1, 1)),
                  "ort": (0, (5, 2))}
WORKLOAD_MARKERS = {"prefill": "o", "decode": "s", "train": "^"}
SHAPE_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
OURS = ("jax", "numpy")


def colour(mode: str, others: list[str]) -> str:
    """A mode's fixed colour; a peer's own variant names (q8_0, ...) take the next unused other colour."""
    if mode in MODE_COLOURS:
        return MODE_COLOURS[mode]
    if mode not in others:
        others.append(mode)
    return OTHER_COLOURS[others.index(mode) % len(OTHER_COLOURS)]


def plain_number(value: float, _pos: Any = None) -> str:
    """A tick label without exponents: 0.5, 20, 2k, 1.5M, 3G."""
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:g}{suffix}"
    return f"{value:g}"


def log_axis(ax: Any, which: str = "both") -> None:
    """Log scale with major ticks at 1, 2 and 5 of each decade, plain labels, no minor ticks."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

    for axis in ([ax.xaxis, ax.yaxis] if which == "both" else [getattr(ax, which + "axis")]):
        axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        axis.set_major_formatter(FuncFormatter(plain_number))
        axis.set_minor_locator(NullLocator())


def figures(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """{name: matplotlib Figure} of a run's rows (none without measurements or a ceiling row)."""
    import matplotlib.pyplot as plt

    work = [r for r in rows if r.get("kind") == "workload" and r.get("status") == "ok"]
    ceiling = next((r for r in rows if r.get("kind") == "ceiling"), None)
    if not work or ceiling is None:
        return {}
    out = {}
    for name, draw in (("throughput_vs_batch", _throughput), ("roofline", _roofline), ("latency_cdf", _cdf)):
        fig = plt.figure(figsize=(12, 8) if name == "latency_cdf" else (8, 5))
        draw(fig, work, ceiling)
        fig.tight_layout()
        out[name] = fig
    return out


def make_plots(rows: list[dict[str, Any]], out: str) -> str:
    """Write DIR/plots/*.png; a message saying what was written, or why plots were skipped."""
    try:  # matplotlib (the bench extra) is optional, and pyplot must come after the Agg backend is chosen
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plots skipped: matplotlib is not installed (pip install 'gptjax[bench]')"
    figs = figures(rows)
    if not figs:
        return "plots skipped: no measurements"
    os.makedirs(os.path.join(out, "plots"), exist_ok=True)
    paths = []
    for name, fig in figs.items():
        paths.append(os.path.join(out, "plots", name + ".png"))
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return "plots: " + ", ".join(paths)


def _legend(ax: Any, below: bool = False) -> None:
    """A legend (>= FONT pt) where there are several series; below the axes, off the data, when asked."""
    count = len(ax.get_legend_handles_labels()[0])
    if count > 1 and below:
        ax.legend(fontsize=FONT, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=1, frameon=False)
    elif count > 1:
        ax.legend(fontsize=FONT, ncol=2 if count > 8 else 1)


def _throughput(fig: Any, work: list[dict[str, Any]], ceiling: dict[str, Any]) -> None:
    ax, others = fig.add_subplot(), []
    series: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for r in (r for r in work if r["workload"] == "decode"):
        series.setdefault((r["backend"], r["precision"]), []).append((r["batch"], r["tokens_per_s"]))
    for (backend, mode), points in sorted(series.items()):
        xs, ys = zip(*sorted(points))
        ax.plot(xs, ys, marker="s", color=colour(mode, others), linestyle=BACKEND_STYLES.get(backend, ":"),
                label=f"{backend} {mode}")
    ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="decode tokens/s",
           title="decode throughput vs batch size (colour: precision, line: backend)")
    log_axis(ax)
    batches = sorted({b for points in series.values() for b, _ in points})
    ax.set_xticks(batches, [str(b) for b in batches])
    _legend(ax)


def roofs(ceiling: dict[str, Any]) -> dict[str, float]:
    """Every measured compute ceiling by name: XLA's dot per dtype and gptjax's kernels (as metrics.ceiling_for
    names them)."""
    found = {f"xla {d}": v for d, v in ceiling["matmul_flops"].items() if isinstance(v, (int, float))}
    return found | {f"kernel {d}": v for d, v in (ceiling.get("kernel_flops") or {}).items()
                    if isinstance(v, (int, float))}


def _roofline(fig: Any, work: list[dict[str, Any]], ceiling: dict[str, Any]) -> None:
    ax, others = fig.add_subplot(), []
    bw = ceiling["bandwidth"]["read"]
    intensity = [r["flops"] / r["bytes_moved"] if r.get("bytes_moved") else None for r in work]
    known = [i for i in intensity if i]
    xs = np.logspace(np.log10(min(known) / 4), np.log10(max(known) * 4), 100)
    label_y = 0.0
    for name, peak in sorted(roofs(ceiling).items(), key=lambda kv: kv[1]):
        ax.plot(xs, np.minimum(peak, bw * xs), color=colour(name.split()[1], others), linewidth=1,
                linestyle="--" if name.startswith("xla") else "-")  # dashed: XLA's dot, solid: gptjax's kernel
        label_y = max(peak, label_y * 1.3)  # near roofs' labels are spread apart (a factor 1.3: one line of text)
        ax.text(xs[-1], label_y, f" {name} {plain_number(peak)}FLOP/s", fontsize=FONT, va="center", ha="left")
    for r, ai in zip(work, intensity):
        if ai is None:  # a peer's row: its bytes are not known
            continue
        c = colour(r["precision"], others)
        ax.scatter(ai, r["flops_per_s"], marker=WORKLOAD_MARKERS.get(r["workload"], "o"), s=30,
                   facecolors=c if r["backend"] in OURS else "none", edgecolors=c)
    for mode in dict.fromkeys(r["precision"] for r in work):
        ax.scatter([], [], color=colour(mode, others), marker="o", label=mode)
    for workload, marker in WORKLOAD_MARKERS.items():
        ax.scatter([], [], color="0.3", marker=marker, label=workload)
    ax.set(xscale="log", yscale="log", xlabel="arithmetic intensity (FLOPs / byte moved, lower bound)",
           ylabel="achieved FLOP/s", title=f"roofline (ceilings of this run; read {plain_number(bw)}B/s)")
    log_axis(ax)
    ax.set_xlim(xs[0], xs[-1] * 15)  # room for the roofs' labels at their right ends
    _legend(ax)


def _cdf(fig: Any, work: list[dict[str, Any]], ceiling: dict[str, Any]) -> None:
    kinds = list(dict.fromkeys(r["workload"] for r in work))
    others: list[str] = []
    for n, workload in enumerate(kinds):
        ax = fig.add_subplot(1, len(kinds), n + 1)
        rows = [r for r in work if r["workload"] == workload and (r.get("per_token_s") or r.get("times_s"))]
        shapes = list(dict.fromkeys(_shape(r) for r in rows))  # the marker tells the shape apart (B1, B8, T512)
        for r in rows:
            xs = np.sort(np.asarray(r.get("per_token_s") or r["times_s"])) * 1e3
            ax.step(xs, np.arange(1, len(xs) + 1) / len(xs), where="post", color=colour(r["precision"], others),
                    linestyle=BACKEND_STYLES.get(r["backend"], ":"), marker=SHAPE_MARKERS[shapes.index(_shape(r))
                                                                                          % len(SHAPE_MARKERS)],
                    markevery=[len(xs) - 1], label=f"{_shape(r)} {r['backend']} {r['precision']}")
        ax.set(xscale="log", xlabel="latency ms", ylabel="fraction of samples", title=f"{workload} latency CDF")
        log_axis(ax, "x")
        _legend(ax, below=True)


def _shape(r: dict[str, Any]) -> str:
    return f"B{r['batch']}" if r["workload"] == "decode" else f"B{r['batch']} T{r['seq']}"
