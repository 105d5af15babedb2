"""Plots of a run (matplotlib, the `bench` extra): decode tokens/s vs batch size per precision, a roofline
placing each workload against the measured ceilings, and latency CDFs."""

from __future__ import annotations

import os
from typing import Any

import numpy as np


def make_plots(rows: list[dict[str, Any]], out: str) -> str:
    """Write DIR/plots/*.png; a message saying what was written, or why plots were skipped."""
    try:  # matplotlib (the bench extra) is optional, and pyplot must come after the Agg backend is chosen
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plots skipped: matplotlib is not installed (pip install 'gptjax[bench]')"
    work = [r for r in rows if r.get("kind") == "workload" and r.get("status") == "ok"]
    ceiling = next((r for r in rows if r.get("kind") == "ceiling"), None)
    if not work or ceiling is None:
        return "plots skipped: no measurements"
    os.makedirs(os.path.join(out, "plots"), exist_ok=True)
    paths = []
    for name, draw in (("throughput_vs_batch", _throughput), ("roofline", _roofline), ("latency_cdf", _cdf)):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        draw(ax, work, ceiling)
        fig.tight_layout()
        path = os.path.join(out, "plots", name + ".png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return "plots: " + ", ".join(paths)


def _throughput(ax: Any, work: list[dict[str, Any]], ceiling: dict[str, Any]) -> None:
    series: dict[str, list[tuple[int, float]]] = {}
    for r in (r for r in work if r["workload"] == "decode"):
        series.setdefault(f"{r['backend']} {r['precision']}", []).append((r["batch"], r["tokens_per_s"]))
    for label, points in sorted(series.items()):
        xs, ys = zip(*sorted(points))
        ax.plot(xs, ys, marker="o", label=label)
    ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="decode tokens/s",
           title="decode throughput vs batch size")
    batches = sorted({b for points in series.values() for b, _ in points})
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.minorticks_off()
    ax.legend(fontsize=8)


def _roofline(ax: Any, work: list[dict[str, Any]], ceiling: dict[str, Any]) -> None:
    bw = ceiling["bandwidth"]["read"]
    intensity = [r["flops"] / r["bytes_moved"] for r in work]
    xs = np.logspace(np.log10(min(intensity) / 4), np.log10(max(intensity) * 4), 100)
    for dtype, peak in ceiling["matmul_flops"].items():
        if isinstance(peak, (int, float)) and dtype != "int8":
            ax.plot(xs, np.minimum(peak, bw * xs), "--", label=f"measured {dtype} matmul / read bandwidth")
    for r, ai in zip(work, intensity):
        ax.scatter(ai, r["flops_per_s"], marker="o" if r["backend"] != "hf" else "x")
        ax.annotate(f"{r['workload']} B{r['batch']} {r['backend']} {r['precision']}", (ai, r["flops_per_s"]),
                    fontsize=6)
    ax.set(xscale="log", yscale="log", xlabel="arithmetic intensity (FLOPs / byte moved, lower bound)",
           ylabel="achieved FLOP/s", title="roofline (ceilings measured in this run)")
    ax.legend(fontsize=7)


def _cdf(ax: Any, work: list[dict[str, Any]], ceiling: dict[str, Any]) -> None:
    for r in work:
        samples = r.get("per_token_s") or r.get("times_s") or []
        if samples:
            xs = np.sort(np.asarray(samples)) * 1e3
            kind = "per token" if r.get("per_token_s") else "per call"
            ax.step(xs, np.arange(1, len(xs) + 1) / len(xs), where="post",
                    label=f"{r['workload']} B{r['batch']} {r['backend']} {r['precision']} ({kind})")
    ax.set(xscale="log", xlabel="latency ms", ylabel="fraction of samples", title="latency CDFs")
    ax.legend(fontsize=6)
