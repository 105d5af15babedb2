"""The quick suite on the gpt2 shape against HF (docs/model.md, decode.md, benchmarks.md): its environment and
ceilings, the fp32 comparison, the full table and the roofline."""

from __future__ import annotations

from typing import Any

from figures.common import Results, Row, block, find, log_axis, of_kind, plot, si
from figures.formats import mfu, mib, ms, num, pct, ratio, shape, table

KERNELS = "quick-gpt2-cpu.jsonl"  # `gptjax bench --preset gpt2 --peer hf`, gptjax's CPU kernels enabled

XLA_ONLY = "quick-gpt2-cpu-xla-only.jsonl"  # the same with GPTJAX_CPU_KERNELS=0: XLA's own formulations


MODES = ("fp32", "bf16", "int8", "w8a8")

@block("environment")
def environment(results: Results) -> str:
    """One line naming where and on what the quick suite ran."""
    env = of_kind(results[KERNELS], "environment")["env"]
    return (f"git {env['git']}; jax {env['jax']}, flax {env['flax']}, torch {env['torch']}, "
            f"transformers {env['transformers']}, Python {env['python']}; {env['cpu']}, {env['cores']} cores; "
            f"load average at start {env['load_avg_1m']:.1f}")


@block("ceilings")
def ceilings(results: Results) -> str:
    """The ceilings both runs measured (through JAX, best of 5)."""
    body = []
    for label, name in (("kernels run", KERNELS), ("XLA-only run", XLA_ONLY)):
        c = of_kind(results[name], "ceiling")
        n = c["matmul_n"]
        body.append([label] + [f"{c['matmul_flops'][d] / 1e12:.3f}" for d in ("fp32", "bf16", "int8")]
                    + [f"{c['bandwidth']['read'] / 1e9:.1f}", f"{c['bandwidth']['copy'] / 1e9:.1f}"])
    return table(["run", f"matmul fp32 {n}³ TFLOP/s", "bf16", "int8", "read GB/s", "copy GB/s"], body)


def _versus_hf(r: Row, rows: list[Row]) -> list[str]:
    peer = find(rows, r["workload"], "hf", r["precision"], r["batch"])
    return [num(r["tokens_per_s"]), num(peer["tokens_per_s"]), ratio(r["vs_peer"]), mfu(r),
            mfu(peer)]


@block("fp32-vs-hf")
def fp32_vs_hf(results: Results) -> str:
    """gptjax (JAX backend) against HF GPT-2 on PyTorch, fp32, every workload of the quick suite."""
    rows = results[KERNELS]
    body = [[r["workload"], shape(r)] + _versus_hf(r, rows)
            for r in rows if r.get("kind") == "workload" and r["backend"] == "jax" and r["precision"] == "fp32"]
    return table(["workload", "shape", "gptjax tok/s", "HF tok/s", "gptjax / HF", "gptjax MFU", "HF MFU"], body)


@block("headline")
def headline(results: Results) -> str:
    """The README's one-line summary: fp32 ratios against HF."""
    rows = results[KERNELS]
    parts = [f"{label} {ratio(find(rows, w, 'jax', 'fp32', b)['vs_peer'])}"
             for label, w, b in (("prefill", "prefill", 1), ("decode B=1", "decode", 1), ("decode B=8", "decode", 8),
                                 ("train step", "train", None))]
    return ", ".join(parts)


@block("decode-latency")
def decode_latency(results: Results) -> str:
    """Greedy decode in fp32: throughput, TTFT, per-token latency, read-bandwidth use, against HF."""
    rows, body = results[KERNELS], []
    for b in (1, 8):
        for backend in ("jax", "hf"):
            r = find(rows, "decode", backend, "fp32", b)
            lat = r["latency_s"]
            body.append([backend, str(b), num(r["tokens_per_s"]), ms(r["ttft_s"]),
                         f"{ms(lat['p50'])} / {ms(lat['p99'])}", pct(r.get("bw_use_measured"))])
    return table(["backend", "B", "tokens/s", "TTFT ms", "per token p50 / p99 ms", "read-bandwidth use"], body)


@block("cache-bytes")
def cache_bytes(results: Results) -> str:
    """KV-cache bytes of the decode workloads (fp32 cache, gpt2 shape, 64 positions)."""
    rows = results[KERNELS]
    return ", ".join(f"{mib(find(rows, 'decode', 'jax', 'fp32', b)['memory']['cache_bytes'])} MiB at B={b}"
                     for b in (1, 8))


@block("train-modes")
def train_modes(results: Results) -> str:
    """Train step (AdamW, B=4, T=64) in fp32 and bf16 compute, against HF."""
    rows = results[KERNELS]
    body = [[mode] + _versus_hf(find(rows, "train", "jax", mode), rows) for mode in ("fp32", "bf16")]
    return table(["compute", "gptjax tok/s", "HF tok/s", "gptjax / HF", "gptjax MFU", "HF MFU"], body)


@block("suite-table")
def suite_table(results: Results) -> str:
    """Every workload row of the kernels run, gptjax and HF."""
    body = []
    for r in results[KERNELS]:
        if r.get("kind") != "workload" or r.get("status") != "ok":
            continue
        lat = r["latency_s"]
        body.append([r["workload"], shape(r), r["backend"], r["precision"], num(r["tokens_per_s"]),
                     "-" if r.get("vs_peer") is None else ratio(r["vs_peer"]),
                     f"{ms(lat['p50'])} / {ms(lat['p99'])}", mfu(r), pct(r.get("bw_use_measured"))])
    return table(["workload", "shape", "backend", "precision", "tokens/s", "vs peer", "latency p50 / p99 ms",
                  "MFU", "BW use"], body)


@block("skipped")
def skipped(results: Results) -> str:
    """The workloads the run recorded as skipped, with their message."""
    lines = [f"- {r['workload']} {shape(r)} {r['backend']} {r['precision']}: {r['message']}"
             for r in results[KERNELS] if r.get("kind") == "workload" and r.get("status") == "skipped"]
    return "\n" + "\n".join(lines) + "\n"


@plot("roofline", files=(KERNELS,), alt="roofline of the quick suite", uses=(log_axis, si))
def plot_roofline(results: Results) -> Any:
    """Each gptjax workload of the kernels run at (FLOPs per byte moved, FLOP/s) under every ceiling the run
    measured (XLA's matmuls, and the kernels' where recorded): colour = precision mode, marker = workload."""
    import matplotlib.pyplot as plt
    import numpy as np

    rows = [r for r in results[KERNELS]
            if r.get("kind") == "workload" and r.get("status") == "ok" and r["backend"] == "jax"]
    c = of_kind(results[KERNELS], "ceiling")
    fig, ax = plt.subplots(figsize=(8, 5))
    xs = np.logspace(-1, 4, 100)
    roofs = [(f"XLA {d}", c["matmul_flops"][d], "k", style) for d, style in zip(("fp32", "bf16", "int8"),
                                                                              ("--", "-.", ":"))]
    roofs += [(f"kernel {d}", f, "tab:gray", style)  # the kernels' roofs in grey: told apart from XLA's by colour
              for (d, f), style in zip((c.get("kernel_flops") or {}).items(), ("-", "--", "-.", ":"))]
    for label, peak, colour, style in roofs:
        ax.plot(xs, np.minimum(peak, c["bandwidth"]["read"] * xs), color=colour, ls=style, lw=1,
                label=f"roof: {label} {peak / 1e12:.2f} TFLOP/s")
    colours = dict(zip(MODES, ("C0", "C1", "C2", "C3")))  # the modes this chapter compares; others not drawn
    rows = [r for r in rows if r["precision"] in colours]
    markers = {"prefill": "s", "decode": "o", "train": "^"}
    for r in rows:
        ax.scatter(r["flops"] / r["bytes_moved"], r["flops_per_s"], color=colours[r["precision"]],
                   marker=markers[r["workload"]], s=45, zorder=3)
    for mode, colour in colours.items():
        ax.scatter([], [], color=colour, marker="D", label=f"mode {mode}")
    for workload, marker in markers.items():
        ax.scatter([], [], color="grey", marker=marker, label=workload)
    log_axis(ax, "x")
    log_axis(ax, "y")
    ax.set(xlabel="FLOPs per byte moved", ylabel="achieved FLOP/s",
           title=f"roofline of the quick suite, gpt2 shape (read bandwidth {c['bandwidth']['read'] / 1e9:.1f} GB/s)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig
