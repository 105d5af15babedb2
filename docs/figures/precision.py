"""The precision modes (docs/precision.md): decode and prefill per mode with and without the CPU kernels, the
GEMM run, the train-step reruns, int8 prefill quality, bf16 training curves, and the decode picture."""

from __future__ import annotations

import itertools
from typing import Any

from figures.common import Results, Row, block, find, find_or_none, of_kind, plot
from figures.formats import mib, num, ratio, table
from figures.suite import KERNELS, MODES, XLA_ONLY

GEMM = "gemm-gpt2-cpu.jsonl"  # the suite after the GEMM kernels: prefill T128/T512 and the train step against HF
TRAIN_RERUNS = "train-gpt2-cpu-reruns.jsonl"  # two more train-step runs against HF at the same commit

INT8_PREFILL = "int8-prefill-quality.jsonl"  # `gptjax quantize --report` in 64- and 128-token windows

BF16_CURVES = "bf16-train-curves.jsonl"  # benchmarks/bf16_loss_curves.py: the quickstart run, fp32 and bf16 compute

@block("precision-decode")
def precision_decode(results: Results) -> str:
    """Decode tokens/s per precision mode: with gptjax's CPU kernels, with XLA alone, and HF's peer."""
    k, x = results[KERNELS], results[XLA_ONLY]
    body = []
    for mode in MODES:
        r = find(k, "decode", "jax", mode, 1)
        row = [mode, mib(r["memory"]["params_bytes"])]
        for b in (1, 8):
            fast, slow = find(k, "decode", "jax", mode, b), find(x, "decode", "jax", mode, b)
            base = find(k, "decode", "jax", "fp32", b)["tokens_per_s"]
            row += [f"{num(fast['tokens_per_s'])} ({ratio(fast['tokens_per_s'] / base)})",
                    f"{num(slow['tokens_per_s'])}", ratio(fast["vs_peer"])]
        body.append(row)
    return table(["mode", "weights MiB", "B=1 kernels (x fp32)", "B=1 XLA only", "B=1 vs HF",
                  "B=8 kernels (x fp32)", "B=8 XLA only", "B=8 vs HF"], body)


@block("precision-prefill")
def precision_prefill(results: Results) -> str:
    """Prefill (B=1, T=128) tokens/s per precision mode, kernels and XLA alone, against HF."""
    k, x = results[KERNELS], results[XLA_ONLY]
    body = []
    for mode in MODES:
        fast, slow = find(k, "prefill", "jax", mode), find(x, "prefill", "jax", mode)
        peer = find_or_none(k, "prefill", "hf", mode)  # none for w8a8 since the peers run: vs its width's best
        body.append([mode, num(fast["tokens_per_s"]), num(slow["tokens_per_s"]),
                     num(peer["tokens_per_s"]) if peer else "-", ratio(fast["vs_peer"])])
    return table(["mode", "kernels tok/s", "XLA only tok/s", "HF tok/s", "kernels vs HF"], body)


@block("gemm-vs-peer")
def gemm_vs_peer(results: Results) -> str:
    """Prefill (B=1, T=128 and 512) and the train step per mode after the GEMM kernels, against HF in the same run."""
    rows = results[GEMM]
    body = []
    for mode in MODES:
        r = [r for r in rows if r.get("kind") == "workload" and r["backend"] == "jax" and r["precision"] == mode
             and r["workload"] in ("prefill", "train") and r.get("status") == "ok"]
        body += [[f"{x['workload']} B{x['batch']} T{x['seq']}", mode, num(x["tokens_per_s"]), ratio(x["vs_peer"])]
                 for x in r]
    env = of_kind(rows, "environment")["env"]
    loads = [r["load_avg_1m"] for r in rows if r.get("kind") == "workload" and r.get("load_avg_1m") is not None]
    return (table(["workload", "mode", "gptjax tok/s", "gptjax / HF"], body)
            + f"\ngit {env['git']}, {env['cores']}-core {env['cpu']}, median of 5 runs interleaved with the peer; "
              f"1-minute load average {min(loads):.1f} to {max(loads):.1f} (the benchmark itself).\n")


@block("train-runs")
def train_runs(results: Results) -> str:
    """The train step against HF in the committed suite run and the reruns: median step times and ratios."""
    body = []
    for rows in [results[GEMM]] + [list(g) for _, g in itertools.groupby(results[TRAIN_RERUNS], lambda r: r["run"])]:
        env = of_kind(rows, "environment")["env"]
        for mode in ("fp32", "bf16"):
            ours, peer = find(rows, "train", "jax", mode), find(rows, "train", "hf", mode)
            body.append([f"git {env['git']}", mode, num(1e3 * ours["median_s"], 0), num(1e3 * peer["median_s"], 0),
                         ratio(ours["vs_peer"]), f"{env['load_avg_1m']:.1f}"])
    return table(["run", "compute", "gptjax step ms", "HF step ms", "gptjax / HF", "load (1 min, at start)"], body)


@block("int8-prefill-quality")
def int8_prefill_quality(results: Results) -> str:
    """fp32, int8 and w8a8 against fp32 in windows of 64 tokens (int8 weight-only) and of 128 (int8 per token)."""
    rows = [r for r in results[INT8_PREFILL] if r.get("kind") == "study" and r["mode"] in ("int8", "w8a8")]
    def activations(r: Row) -> str:
        return "two 16-bit terms" if r["mode"] == "int8" and r["window_tokens"] <= r.get("per_token_above", 64) \
            else "per token"

    body = [[f"{r['window_tokens']} ({activations(r)})", r["mode"], f"{r['max_logit_error']:.4f}",
             f"{r['mean_logit_error']:.5f}", f"{100 * r['perplexity_change']:+.2f}%", f"{100 * r['top1_agreement']:.2f}%"]
            for r in rows]
    return table(["window tokens (activations)", "mode", "max abs Δlogit", "mean abs Δlogit", "Δ perplexity",
                  "top-1 = fp32"], body)


@block("int8-weight-ratio")
def int8_weight_ratio(results: Results) -> str:
    """int8 weight bytes over fp32's, as measured by the suite's memory accounting."""
    rows = results[KERNELS]
    sizes = {m: find(rows, "decode", "jax", m, 1)["memory"]["params_bytes"] for m in ("fp32", "int8")}
    return f"{sizes['int8'] / sizes['fp32']:.3f}x"


@block("bf16-train-curves")
def bf16_train_curves(results: Results) -> str:
    """The quickstart's training loss per step in fp32 and bf16 compute (every 10th step), the gap against the
    loss's own step-to-step noise, and each mode's held-out loss."""
    rows = results[BF16_CURVES]
    run = of_kind(rows, "run")
    loss = {m: [r["loss"] for r in rows if r.get("kind") == "step" and r["mode"] == m] for m in ("fp32", "bf16")}
    final = {r["mode"]: r for r in rows if r.get("kind") == "final"}
    n = len(loss["fp32"])
    lines = ["| step | fp32 loss | bf16 loss | bf16 - fp32 |", "|---|---|---|---|"]
    for i in sorted({0, *range(9, n, 10), n - 1}):
        lines.append(f"| {i + 1} | {loss['fp32'][i]:.4f} | {loss['bf16'][i]:.4f} | {loss['bf16'][i] - loss['fp32'][i]:+.4f} |")
    tail = loss["fp32"][n // 2:]
    noise = (sum((b - a) ** 2 for a, b in itertools.pairwise(tail)) / max(len(tail) - 1, 1)) ** 0.5
    gap = max(abs(a - b) for a, b in zip(loss["fp32"][n // 2:], loss["bf16"][n // 2:]))
    return ("\n".join(lines) + f"\n\nOver the second half of the run the curves differ by at most {gap:.4f} nats, "
            f"against a step-to-step change of the fp32 loss itself of {noise:.4f} (rms). Held-out loss after {n} "
            f"steps: fp32 {final['fp32']['val_loss']:.4f}, bf16 {final['bf16']['val_loss']:.4f} nats/byte; each run "
            f"took {final['fp32']['seconds']:.0f} s (fp32) and {final['bf16']['seconds']:.0f} s (bf16), compiling "
            "included "
            f"(git {run['git']}, jax {run['jax']}, {run['cores']} cores, CPU kernels {run['cpu_kernels']}; "
            f"1-minute load average {run['load_avg_1m_start']:.1f} at the start, "
            f"{final['bf16']['load_avg_1m_end']:.1f} at the end).")


@plot("decode-by-precision", files=(KERNELS, XLA_ONLY), alt="decode tokens/s per precision mode")
def plot_decode(results: Results) -> Any:
    """Grouped bars: decode tokens/s per precision mode at B=1 and B=8, kernels vs XLA alone vs HF."""
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    series = (("gptjax, CPU kernels", KERNELS, "jax", "C0", ""), ("gptjax, XLA only", XLA_ONLY, "jax", "C1", "//"),
              ("HF (PyTorch)", KERNELS, "hf", "C2", ".."))
    for ax, b in zip(axes, (1, 8)):
        xs = np.arange(len(MODES))
        for i, (label, name, backend, colour, hatch) in enumerate(series):
            found = [find_or_none(results[name], "decode", backend, m, b) for m in MODES]
            ys = [r["tokens_per_s"] if r else np.nan for r in found]  # a mode the peer lacks: no bar
            ax.bar(xs + (i - 1) * 0.27, ys, 0.27, label=label, color=colour, hatch=hatch, edgecolor="white")
        ax.set(xticks=xs, xticklabels=MODES, title=f"greedy decode, gpt2 shape, B={b}", ylabel="tokens/s")
    axes[0].legend(fontsize=8)
    return fig
