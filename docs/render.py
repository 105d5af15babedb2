"""Render every measured number in README.md and docs/*.md from the JSONL committed under benchmarks/results/.

A figure in the prose sits between `<!-- render:NAME -->` and `<!-- /render -->`; NAME is a function in
BLOCKS below that formats it from the results. `python docs/render.py` rewrites those blocks in place and
redraws the plots in docs/img/; `python docs/render.py --check` only says which files would change (exit 1),
which is what tests/test_docs.py asserts, so a figure cannot drift from its measurement. docs/monitoring.md's pictures
(render_monitoring.py) are named by the hash of their data and embed it: --check also fails while one is stale.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # its sibling, also when a test loads this file by path
from render_monitoring import (HASHED_PLOTS, SIGNALS, TRACE, data_hash, draw_hashed, hashed_name,  # noqa: F401
                               phase_ends, png_source, signals_text, stale_images, trace_text)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
IMG = ROOT / "docs" / "img"
BLOCK = re.compile(r"(<!-- render:([a-z0-9-]+) -->)(.*?)(<!-- /render -->)", re.S)

KERNELS = "quick-gpt2-cpu.jsonl"  # `gptjax bench --preset gpt2 --peer hf`, gptjax's CPU kernels enabled
XLA_ONLY = "quick-gpt2-cpu-xla-only.jsonl"  # the same with GPTJAX_CPU_KERNELS=0: XLA's own formulations
GEMM = "gemm-gpt2-cpu.jsonl"  # the suite after the GEMM kernels: prefill T128/T512 and the train step against HF
MODES = ("fp32", "bf16", "int8", "w8a8")
LM_EVAL = "lm-eval-byte-mini.jsonl"  # `gptjax bench --study lm-eval` on the quickstart model (docs/evaluation.md)
FRONTIER = "frontier-cpu.jsonl"  # `gptjax bench --study frontier`: the committed run (docs/smaller-models.md)
FRONTIER_BIG = "frontier-cpu-big-teacher.jsonl"  # an hour-long run whose large teacher got too few steps
INT8_PREFILL = "int8-prefill-quality.jsonl"
TRAIN_RERUNS = "train-gpt2-cpu-reruns.jsonl"  # two more train-step runs against HF at the same commit  # `gptjax quantize --report` in 64- and 128-token windows

Row = dict[str, Any]
Results = dict[str, list[Row]]


def load_results(folder: Path = RESULTS) -> Results:
    """Every results file under folder, by file name: a list of its JSON lines."""
    return {p.name: [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
            for p in sorted(folder.glob("*.jsonl"))}


def doc_files(root: Path = ROOT) -> list[Path]:
    """The markdown files whose blocks are rendered (and whose Python snippets the tests run)."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def find(rows: list[Row], workload: str, backend: str, precision: str, batch: int | None = None) -> Row:
    """The one measured row of that identity (batch None: any); a KeyError names it if it is missing."""
    for r in rows:
        if (r.get("kind") == "workload" and r["workload"] == workload and r["backend"] == backend
                and r["precision"] == precision and (batch is None or r["batch"] == batch)):
            return r
    raise KeyError(f"no {workload} {backend} {precision} B={batch} row")


def of_kind(rows: list[Row], kind: str) -> Row:
    """The first row of that kind (environment, ceiling)."""
    return next(r for r in rows if r.get("kind") == kind)


# ---- number formats ----------------------------------------------------------------------------------
def num(x: float, digits: int = 1) -> str:
    """1727.93 -> '1,727.9'."""
    return f"{x:,.{digits}f}"


def ratio(x: float) -> str:
    """2.349 -> '2.35x'."""
    return f"{x:.2f}x"


def pct(x: float | None) -> str:
    """0.636 -> '63.6%'; None -> '-'."""
    return "-" if x is None else f"{100 * x:.1f}%"


def ms(seconds: float) -> str:
    """0.0164 -> '16.4'."""
    return f"{1000 * seconds:.1f}"


def mib(n: float) -> str:
    """Bytes as MiB, one decimal."""
    return f"{n / 2**20:,.1f}"


def table(header: list[str], body: list[list[str]]) -> str:
    """A markdown table, with a blank line before and after (so it renders inside a block)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n" + "\n".join(lines) + "\n"


def shape(r: Row) -> str:
    """'B1 T128' or 'B8 P32+32'."""
    return f"B{r['batch']} T{r['seq']}" if r.get("prompt") is None else f"B{r['batch']} P{r['prompt']}+{r['new']}"


# ---- blocks: one function per marked block, (results) -> text ------------------------------------------
def environment(results: Results) -> str:
    """One line naming where and on what the quick suite ran."""
    env = of_kind(results[KERNELS], "environment")["env"]
    return (f"git {env['git']}; jax {env['jax']}, flax {env['flax']}, torch {env['torch']}, "
            f"transformers {env['transformers']}, Python {env['python']}; {env['cpu']}, {env['cores']} cores; "
            f"load average at start {env['load_avg_1m']:.1f}")


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
    return [num(r["tokens_per_s"]), num(peer["tokens_per_s"]), ratio(r["vs_peer"]), pct(r["mfu_measured"]),
            pct(peer["mfu_measured"])]


def fp32_vs_hf(results: Results) -> str:
    """gptjax (JAX backend) against HF GPT-2 on PyTorch, fp32, every workload of the quick suite."""
    rows = results[KERNELS]
    body = [[r["workload"], shape(r)] + _versus_hf(r, rows)
            for r in rows if r.get("kind") == "workload" and r["backend"] == "jax" and r["precision"] == "fp32"]
    return table(["workload", "shape", "gptjax tok/s", "HF tok/s", "gptjax / HF", "gptjax MFU", "HF MFU"], body)


def headline(results: Results) -> str:
    """The README's one-line summary: fp32 ratios against HF."""
    rows = results[KERNELS]
    parts = [f"{label} {ratio(find(rows, w, 'jax', 'fp32', b)['vs_peer'])}"
             for label, w, b in (("prefill", "prefill", 1), ("decode B=1", "decode", 1), ("decode B=8", "decode", 8),
                                 ("train step", "train", None))]
    return ", ".join(parts)


def decode_latency(results: Results) -> str:
    """Greedy decode in fp32: throughput, TTFT, per-token latency, read-bandwidth use, against HF."""
    rows, body = results[KERNELS], []
    for b in (1, 8):
        for backend in ("jax", "hf"):
            r = find(rows, "decode", backend, "fp32", b)
            lat = r["latency_s"]
            body.append([backend, str(b), num(r["tokens_per_s"]), ms(r["ttft_s"]),
                         f"{ms(lat['p50'])} / {ms(lat['p99'])}", pct(r["bw_use_measured"])])
    return table(["backend", "B", "tokens/s", "TTFT ms", "per token p50 / p99 ms", "read-bandwidth use"], body)


def cache_bytes(results: Results) -> str:
    """KV-cache bytes of the decode workloads (fp32 cache, gpt2 shape, 64 positions)."""
    rows = results[KERNELS]
    return ", ".join(f"{mib(find(rows, 'decode', 'jax', 'fp32', b)['memory']['cache_bytes'])} MiB at B={b}"
                     for b in (1, 8))


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


def precision_prefill(results: Results) -> str:
    """Prefill (B=1, T=128) tokens/s per precision mode, kernels and XLA alone, against HF."""
    k, x = results[KERNELS], results[XLA_ONLY]
    body = []
    for mode in MODES:
        fast, slow = find(k, "prefill", "jax", mode), find(x, "prefill", "jax", mode)
        peer = find(k, "prefill", "hf", mode)
        body.append([mode, num(fast["tokens_per_s"]), num(slow["tokens_per_s"]), num(peer["tokens_per_s"]),
                     ratio(fast["vs_peer"])])
    return table(["mode", "kernels tok/s", "XLA only tok/s", "HF tok/s", "kernels vs HF"], body)


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


def train_modes(results: Results) -> str:
    """Train step (AdamW, B=4, T=64) in fp32 and bf16 compute, against HF."""
    rows = results[KERNELS]
    body = [[mode] + _versus_hf(find(rows, "train", "jax", mode), rows) for mode in ("fp32", "bf16")]
    return table(["compute", "gptjax tok/s", "HF tok/s", "gptjax / HF", "gptjax MFU", "HF MFU"], body)


def int8_weight_ratio(results: Results) -> str:
    """int8 weight bytes over fp32's, as measured by the suite's memory accounting."""
    rows = results[KERNELS]
    sizes = {m: find(rows, "decode", "jax", m, 1)["memory"]["params_bytes"] for m in ("fp32", "int8")}
    return f"{sizes['int8'] / sizes['fp32']:.3f}x"


def suite_table(results: Results) -> str:
    """Every workload row of the kernels run, gptjax and HF."""
    body = []
    for r in results[KERNELS]:
        if r.get("kind") != "workload" or r.get("status") != "ok":
            continue
        lat = r["latency_s"]
        body.append([r["workload"], shape(r), r["backend"], r["precision"], num(r["tokens_per_s"]),
                     "-" if r.get("vs_peer") is None else ratio(r["vs_peer"]),
                     f"{ms(lat['p50'])} / {ms(lat['p99'])}", pct(r["mfu_measured"]), pct(r["bw_use_measured"])])
    return table(["workload", "shape", "backend", "precision", "tokens/s", "vs peer", "latency p50 / p99 ms",
                  "MFU", "BW use"], body)


def skipped(results: Results) -> str:
    """The workloads the run recorded as skipped, with their message."""
    lines = [f"- {r['workload']} {shape(r)} {r['backend']} {r['precision']}: {r['message']}"
             for r in results[KERNELS] if r.get("kind") == "workload" and r.get("status") == "skipped"]
    return "\n" + "\n".join(lines) + "\n"


SPEC_TRAINED = "speculative-trained-cpu.jsonl"  # `gptjax bench --study speculative`, two `gptjax train` runs
SPEC_GPT2 = "speculative-gpt2-ngram-cpu.jsonl"  # the same on the gpt2 shape (random weights), prompt lookup


def _speculative(rows: list[Row]) -> str:
    """A speculative study's rows: per batch and drafter, tokens/s, acceptance, tokens per pass, speed-up; then
    where it ran and the load average."""
    env = of_kind(rows, "environment")["env"]
    study = [r for r in rows if r.get("kind") == "study"]
    body = [[str(r["batch"]), r["draft"], str(r["k"] or "-"), num(r["tokens_per_s"]), pct(r["acceptance"]),
             f"{r['tokens_per_pass']:.2f}", ratio(r["speedup"]), "yes" if r["same_tokens"] else "NO"] for r in study]
    return (table(["B", "draft", "k", "tokens/s", "acceptance", "tokens per target pass", "speed-up vs plain",
                   "same tokens"], body)
            + f"\nTarget: {study[0]['target']}, {study[0]['target_params']:,} params; greedy, prompt "
            f"{study[0]['prompt']} + {study[0]['new']} new tokens; {env['cpu']}, {env['cores']} cores, jax {env['jax']}, "
            f"git {env['git']}; 1-minute load average {env['load_avg_1m']:.1f} at the start, "
            f"{study[-1]['load_avg_1m']:.1f} at the end (other work shared the machine: compare ratios, not "
            f"absolute tokens/s).\n")


def speculative_trained(results: Results) -> str:
    """Speculative decoding with a trained draft model and with prompt lookup, against plain decoding."""
    return _speculative(results[SPEC_TRAINED])


def speculative_gpt2(results: Results) -> str:
    """Prompt lookup on the gpt2 shape, against plain decoding."""
    return _speculative(results[SPEC_GPT2])


# ---- int4 (`gptjax bench --study int4`: its results.jsonl -> int4.jsonl) -----------------------------------
INT4 = "int4.jsonl"  # the study's rows carry "part": model, symmetry, quality, speed


def _int4(results: Results, part: str) -> list[Row]:
    return [r for r in results[INT4] if r.get("kind") == "study" and r["part"] == part]


def int4_environment(results: Results) -> str:
    """Where the int4 study ran: the model, the windows and the load."""
    env, [model] = of_kind(results[INT4], "environment")["env"], _int4(results, "model")
    c, speed = model["checkpoint_config"], _int4(results, "speed")
    loads = [r[k] for r in speed for k in ("load_avg_before", "load_avg_after")]
    return (f"{c['n_layer']} layers, width {c['n_embd']}, context {c['n_positions']}, {model['windows']} validation "
            f"windows of {model['window_tokens']} bytes; Python {env['python']}, {env['cores']} cores, CPU kernels "
            f"{env['cpu_kernels']}; 1-minute load average {min(loads):.1f} to {max(loads):.1f} during the speed run")


def int4_symmetry(results: Results) -> str:
    """Symmetric vs asymmetric int4 per group size: reconstruction error and bits/byte."""
    body = [[str(r["group_size"]), r["scheme"], f"{r['relative_rms_error']:.4f}", f"{r['bits_per_byte']:.4f}",
             f"{100 * r['bits_per_byte_change']:+.2f}%"] for r in _int4(results, "symmetry")]
    return table(["G", "rounding", "relative RMS error", "bits/byte", "vs fp32"], body)


def int4_quality(results: Results) -> str:
    """The int4 mode per group size and head storage against fp32 (int8 for reference)."""
    body = []
    for r in _int4(results, "quality"):
        label = r["precision"] + (f" g{r['group_size']}" if r["group_size"] else "")
        body.append([label, r["head"], mib(r["weight_bytes"]), f"{r['bits_per_byte']:.4f}",
                     f"{100 * r['perplexity_change']:+.2f}%", pct(r["top1_agreement"]), pct(r["greedy_agreement"])])
    return table(["mode", "head", "weights MiB", "bits/byte", "Δ perplexity", "top-1 = fp32", "greedy = fp32"], body)


def int4_speed(results: Results) -> str:
    """Decode B=1 tokens/s on the gpt2 shape, int8 and int4 per group size, against the bandwidth roofline."""
    rows = _int4(results, "speed")
    int8 = next(r for r in rows if r["precision"] == "int8")["decode_tokens_per_s"]
    best8 = next(r for r in rows if r["precision"] == "int8")["decode_tokens_per_s_best"]
    body = [[r["precision"] + (f" g{r['group_size']}" if r["group_size"] else ""), mib(r["weight_bytes"]),
             num(r["decode_tokens_per_s"]), ratio(r["decode_tokens_per_s"] / int8), pct(r["roofline_fraction"]),
             num(r["decode_tokens_per_s_best"]), ratio(r["decode_tokens_per_s_best"] / best8),
             pct(r["roofline_fraction_best"]), num(r["roofline_tokens_per_s"])] for r in rows]
    c = rows[0]
    return table(["mode", "weights MiB", "decode B=1 tok/s (median)", "x int8", "% of roofline", "best tok/s",
                  "x int8", "% of roofline", "roofline tok/s"], body) + (
        f"\nRead bandwidth {c['read_bandwidth'] / 1e9:.1f} GB/s before the timed runs "
        f"({c['read_bandwidth_after'] / 1e9:.1f} GB/s after); median and best of {c['runs']} interleaved runs; "
        f"1-minute load average {c['load_avg_before']:.1f} before, {c['load_avg_after']:.1f} after.\n")


INT4_SUITE = "int4-suite-gpt2-cpu.jsonl"  # gptjax bench --preset gpt2 --precision int8,int4 --workloads decode


def int4_suite(results: Results) -> str:
    """The bench suite's int8 and int4 decode rows at B=1: tokens/s, read-bandwidth use, the run's load."""
    rows = results[INT4_SUITE]
    env, c = of_kind(rows, "environment")["env"], of_kind(rows, "ceiling")
    int8 = find(rows, "decode", "jax", "int8", 1)["tokens_per_s"]
    body = [[m, mib(r["memory"]["params_bytes"]), num(r["tokens_per_s"]), ratio(r["tokens_per_s"] / int8),
             pct(r["bw_use_measured"])] for m in ("int8", "int4") for r in [find(rows, "decode", "jax", m, 1)]]
    return table(["mode", "weights MiB", "decode B=1 tok/s", "x int8", "read-bandwidth use"], body) + (
        f"\nRead ceiling {c['bandwidth']['read'] / 1e9:.1f} GB/s measured by the suite; load average at start "
        f"{env['load_avg_1m']:.1f}; CPU kernels {env['cpu_kernels']}.\n")


def lm_eval_precision(results: Results) -> str:
    """lm-eval's next-line accuracy per precision mode next to the server's tokens/s, and the load average."""
    rows = results[LM_EVAL]
    study = [r for r in rows if r.get("kind") == "study"]
    body = [[r["precision"], f"{r['acc']:.3f} ± {r['acc_stderr']:.3f}", f"{r['acc_norm']:.3f}",
             f"{r['true_line_logprob_per_byte']:.5f}", f"{r['exact_match']:.3f}", num(r["mc_tokens_per_s"], 0),
             num(r["gen_tokens_per_s"], 0)] for r in study]
    env = of_kind(rows, "environment")["env"]
    return (table(["precision", "next-line acc (4 choices)", "acc_norm", "true line log-prob / byte",
                   "greedy exact match", "scored tok/s", "generated tok/s"], body)
            + f"\n{study[0]['docs']} documents per task; lm-eval {study[0]['lm_eval']}; {env['cores']}-core "
              f"{env['cpu']}, git {env['git']}; 1-minute load average {env['load_avg_1m']:.1f} at the start, "
              f"{study[0]['load_avg_1m']:.1f} at the end: other work shared the CPU, so compare the modes' speeds "
              "only loosely.\n")


# ---- the frontier study (docs/smaller-models.md) ---------------------------------------------------------------
def _frontier(results: Results, entry: str, name: str = FRONTIER) -> list[Row]:
    return [r for r in results[name] if r.get("entry") == entry]


def _fp32(results: Results, role: str, shape: str | None = None, tokenizer: str = "byte") -> Row:
    return next(r for r in _frontier(results, "model") if r["precision"] == "fp32" and r["role"] == role
                and (shape is None or r["shape"] == shape) and r["tokenizer"] == tokenizer)


def _all(plain: list[Row], dist: list[Row], key: str, lower: str, higher: str) -> str:
    """How the distilled rows compare with the plain ones on key: lower, higher, or either by shape."""
    signs = {d[key] < p[key] for p, d in zip(plain, dist)}
    return f"{lower} or {higher} by shape" if len(signs) > 1 else (lower if signs.pop() else higher)


def _beaten(teacher: Row, plain: list[Row]) -> str:
    """'.', or which students trained alone scored better than the teacher."""
    won = [p["shape"] for p in plain if p["heldout_bpb"] < teacher["heldout_bpb"]]
    return f"; {' and '.join(won)} trained alone beat the teacher." if won else "."


def frontier_findings(results: Results) -> str:
    """The run's findings as sentences, every number from the results (fp32 rows)."""
    teacher = _fp32(results, "teacher")
    goals = [g for g in _goals(results) if g["role"] == "distilled"]
    plain = [_fp32(results, "plain", g["shape"]) for g in goals]
    dist = [_fp32(results, "distilled", g["shape"]) for g in goals]
    first = goals[0]["shape"]
    init = _fp32(results, "distilled+init", first)
    bpe = next(r for r in _frontier(results, "model") if r["precision"] == "fp32" and r["tokenizer"] != "byte")
    byte = _fp32(results, "plain", first)
    pairs = "; ".join(f"{p['shape']}: {p['train_steps']:,} steps alone, {d['train_steps']:,} distilled, "
                      f"{p['heldout_bpb']:.3f} vs {d['heldout_bpb']:.3f} bits/byte, top-1 agreement "
                      f"{pct(p['top1_agreement'])} vs {pct(d['top1_agreement'])}" for p, d in zip(plain, dist))
    better = all(p["heldout_bpb"] < teacher["heldout_bpb"] for p in plain)
    return "\n".join([
        f"- The teacher scored {teacher['heldout_bpb']:.3f} bits/byte held out; the students trained alone scored "
        f"{min(p['heldout_bpb'] for p in plain):.3f} to {max(p['heldout_bpb'] for p in plain):.3f}"
        + (": every one of them beat the teacher." if better else _beaten(teacher, plain)),
        f"- At equal time the distilled students took {_all(plain, dist, 'train_steps', 'fewer', 'more')} steps, "
        f"scored {_all(plain, dist, 'heldout_bpb', 'better', 'worse')} and agreed "
        f"{_all(plain, dist, 'top1_agreement', 'less', 'more')} with the teacher ({pairs}).",
        f"- Starting the {first} student from the teacher's layers: {init['heldout_bpb']:.3f} bits/byte "
        f"({init['train_steps']:,} steps), against {dist[0]['heldout_bpb']:.3f} distilled from scratch.",
        f"- The same {first} body with the {bpe['tokenizer']} vocabulary ({bpe['bytes_per_token']:.1f} bytes per "
        f"token) scored {bpe['heldout_bpb']:.3f} bits/byte against {byte['heldout_bpb']:.3f} with bytes, and "
        f"decoded {num(bpe['decode_b1_bytes_per_s'], 0)} bytes/s at B=1 against {num(byte['decode_b1_bytes_per_s'], 0)}.",
        f"- The largest B=1 decode speed-up of a distilled student over the teacher (fp32) was "
        f"{ratio(max(g['speedup_b1'] for g in goals))}."])


def frontier_big_teacher(results: Results) -> str:
    """What the run with a large teacher, trained within its budget, got (fp32 rows)."""
    rows = [r for r in _frontier(results, "model", FRONTIER_BIG) if r["precision"] == "fp32"]
    teacher = rows[0]
    best = min(rows[1:], key=lambda r: r["heldout_bpb"])
    args = of_kind(results[FRONTIER_BIG], "environment")["args"]
    verdict = "worse than" if teacher["heldout_bpb"] > best["heldout_bpb"] else "better than"
    return (f"its {teacher['shape']} teacher got {teacher['train_steps']} steps in "
            f"{args['budget'] * args['teacher_factor']:.0f} s and scored {teacher['heldout_bpb']:.2f} bits/byte held "
            f"out, {verdict} a {best['shape']} {best['role']} student trained for {args['budget']:.0f} s "
            f"({best['train_steps']} steps, {best['heldout_bpb']:.2f})")


def _frontier_name(r: Row) -> str:
    return f"{r['shape']} {r['role']}" + ("" if r["tokenizer"] == "byte" else f" ({r['tokenizer']})")


def frontier_run(results: Results) -> str:
    """How the frontier study ran: commit, budget, and how loaded the machine was."""
    env_row = of_kind(results[FRONTIER], "environment")
    env, rows = env_row["env"], _frontier(results, "model")
    loads = [r["load_avg_1m_measured"] for r in rows] + [r["train_load_avg_1m"] for r in rows]
    args = env_row["args"]
    loads = [x for x in loads if x is not None]
    teacher = (f"the teacher {Path(args['teacher_checkpoint']).name} trained beforehand" if args["teacher_checkpoint"]
               else f"{args['budget'] * args['teacher_factor']:.0f} s for the teacher")
    return (f"git {env['git']}, jax {env['jax']}, {env['cpu']} with {env['cores']} cores; {args['budget']:.0f} s of "
            f"training per student, {teacher}; the whole study took {rows[0]['study_wall_s'] / 60:.0f} min; "
            f"1-minute load average {min(loads):.1f} to {max(loads):.1f} on {env['cores']} cores")


def frontier_table(results: Results) -> str:
    """Every model x precision mode: size, held-out bits/byte, agreement with the teacher, decode speed."""
    body = [[_frontier_name(r), r["precision"], num(r["weight_bytes"] / 1024, 0), f"{r['heldout_bpb']:.3f}",
             pct(r["top1_agreement"]), num(r["decode_b1_bytes_per_s"], 0), num(r["decode_b8_bytes_per_s"], 0),
             str(r["train_steps"] or "-")] for r in _frontier(results, "model")]
    return table(["model (L x D x H)", "mode", "weights KiB", "held-out bits/byte", "top-1 agreement",
                  "B=1 bytes/s", "B=8 bytes/s", "train steps"], body)


def frontier_goal(results: Results) -> str:
    """Per student shape (fp32): bits/byte of teacher, student alone and distilled; gap closed; B=1 speed-up."""
    body = [[f"{g['shape']} {g['role']}", f"{g['teacher_bpb']:.3f}", f"{g['plain_bpb']:.3f}",
             f"{g['distilled_bpb']:.3f}", "-" if g["gap_closed"] is None else pct(g["gap_closed"]),
             ratio(g["speedup_b1"]), "yes" if g["meets_goal"] else "no"] for g in _goals(results)]
    return table(["student", "teacher bits/byte", "alone", "distilled", "gap closed", "B=1 speed-up over teacher",
                  "goal met (>= 3x, > 50%)"], body)


def _goals(results: Results) -> list[Row]:
    """The study's goal rows, recomputed from the model rows (so every way of distilling is counted)."""
    import gptjax.bench.studies.frontier as study

    args = of_kind(results[FRONTIER], "environment")["args"]
    return study.goals(_frontier(results, "model"), args["ladder"].split(","))


BF16_CURVES = "bf16-train-curves.jsonl"  # benchmarks/bf16_loss_curves.py: the quickstart run, fp32 and bf16 compute


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


# ---- monitoring (docs/monitoring.md): its text and pictures are render_monitoring.py's, the table is here ------
def monitoring_signals(results: Results) -> str:
    """The three signals' picture, what produced it, and each signal at the end of each load phase."""
    rows = results[SIGNALS]
    body = [[str(clients), num(tokens, 0), *map(ms, latencies), pct(share_4xx)]
            for clients, tokens, *latencies, share_4xx in phase_ends(rows)]
    return signals_text(rows) + table(["clients", "generated tokens/s", "TTFT p50 ms", "TTFT p95 ms", "TPOT p50 ms",
                                       "TPOT p95 ms", "4xx share"], body)


def monitoring_trace(results: Results) -> str:
    """The served request's waterfall and what produced it."""
    return trace_text(results[TRACE])


BLOCKS: dict[str, Callable[[Results], str]] = {
    "environment": environment, "ceilings": ceilings, "fp32-vs-hf": fp32_vs_hf, "headline": headline,
    "decode-latency": decode_latency, "cache-bytes": cache_bytes, "precision-decode": precision_decode,
    "precision-prefill": precision_prefill, "train-modes": train_modes, "int8-weight-ratio": int8_weight_ratio,
    "suite-table": suite_table, "skipped": skipped,
    "speculative-trained": speculative_trained, "speculative-gpt2": speculative_gpt2,
    "int4-environment": int4_environment,
    "int4-symmetry": int4_symmetry, "int4-quality": int4_quality, "int4-speed": int4_speed,
    "int4-suite": int4_suite,
    "lm-eval-precision": lm_eval_precision,
    "frontier-run": frontier_run, "frontier-table": frontier_table,
    "frontier-goal": frontier_goal, "frontier-big-teacher": frontier_big_teacher, "gemm-vs-peer": gemm_vs_peer,
    "int8-prefill-quality": int8_prefill_quality, "train-runs": train_runs,
    "frontier-findings": frontier_findings,
    "bf16-train-curves": bf16_train_curves,
    "monitoring-signals": monitoring_signals, "monitoring-trace": monitoring_trace,
}


def render_text(text: str, results: Results) -> str:
    """text with every marked block re-rendered; an unknown block name is an error."""
    def one(m: re.Match) -> str:
        name = m.group(2)
        if name not in BLOCKS:
            raise KeyError(f"unknown render block {name!r}; known: {sorted(BLOCKS)}")
        return m.group(1) + BLOCKS[name](results) + m.group(4)

    return BLOCK.sub(one, text)


def rendered(results: Results, root: Path = ROOT) -> dict[Path, tuple[str, str]]:
    """For each document: (its text now, its text rendered from results)."""
    return {p: (p.read_text(), render_text(p.read_text(), results)) for p in doc_files(root)}


# ---- plots (matplotlib, the bench/test extra) ----------------------------------------------------------
def plot_decode(results: Results, path: Path) -> None:
    """Grouped bars: decode tokens/s per precision mode at B=1 and B=8, kernels vs XLA alone vs HF."""
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    for ax, b in zip(axes, (1, 8)):
        xs = np.arange(len(MODES))
        series = (("gptjax, CPU kernels", KERNELS, "jax"), ("gptjax, XLA only", XLA_ONLY, "jax"),
                  ("HF (PyTorch)", KERNELS, "hf"))
        for i, (label, name, backend) in enumerate(series):
            ys = [find(results[name], "decode", backend, m, b)["tokens_per_s"] for m in MODES]
            ax.bar(xs + (i - 1) * 0.27, ys, 0.27, label=label)
        ax.set(xticks=xs, xticklabels=MODES, title=f"greedy decode, gpt2 shape, B={b}", ylabel="tokens/s")
    axes[0].legend(fontsize=8)
    _save(fig, path)


def plot_roofline(results: Results, path: Path) -> None:
    """Each gptjax workload of the kernels run at (FLOPs per byte moved, FLOP/s) under the measured ceilings:
    colour = precision mode, marker = workload."""
    import matplotlib.pyplot as plt
    import numpy as np

    rows = [r for r in results[KERNELS]
            if r.get("kind") == "workload" and r.get("status") == "ok" and r["backend"] == "jax"]
    c = of_kind(results[KERNELS], "ceiling")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = np.logspace(-1, 4, 100)
    for dtype, style in (("fp32", "k--"), ("int8", "k:")):
        ax.plot(xs, np.minimum(c["matmul_flops"][dtype], c["bandwidth"]["read"] * xs), style,
                label=f"measured {dtype} matmul / read bandwidth")
    colours = dict(zip(MODES, ("C0", "C1", "C2", "C3")))
    markers = {"prefill": "s", "decode": "o", "train": "^"}
    for r in rows:
        ax.scatter(r["flops"] / r["bytes_moved"], r["flops_per_s"], color=colours[r["precision"]],
                   marker=markers[r["workload"]], s=40)
    for mode, colour in colours.items():
        ax.scatter([], [], color=colour, marker="o", label=mode)
    for workload, marker in markers.items():
        ax.scatter([], [], color="grey", marker=marker, label=workload)
    ax.set(xscale="log", yscale="log", xlabel="FLOPs per byte moved", ylabel="achieved FLOP/s",
           title="roofline of the quick suite, gpt2 shape (gptjax, CPU kernels)")
    ax.legend(fontsize=7, loc="lower right")
    _save(fig, path)


def plot_frontier(results: Results, path: Path) -> None:
    """Held-out bits/byte against B=1 decode bytes/s for every model x mode, the Pareto frontier marked:
    colour = how it was trained, marker = precision mode."""
    import matplotlib.pyplot as plt

    import gptjax.bench.studies.frontier as study

    rows = _frontier(results, "model")
    points = [(r["decode_b1_bytes_per_s"], r["heldout_bpb"]) for r in rows]
    best = study.pareto(points)
    fig, ax = plt.subplots(figsize=(8, 5))
    colours = {"teacher": "k", "plain": "C0", "distilled": "C3", "distilled+init": "C1"}
    markers = dict(zip(MODES, ("o", "s", "^", "v")))
    for r, (x, y) in zip(rows, points):
        face = colours[r["role"]] if r["tokenizer"] == "byte" else "none"
        ax.scatter(x, y, color=face, edgecolors=colours[r["role"]], marker=markers[r["precision"]], s=40, zorder=3)
        if r["precision"] == "fp32":
            ax.annotate(_frontier_name(r).split(" ")[0] + ("" if r["tokenizer"] == "byte" else " bpe"), (x, y),
                        fontsize=6, xytext=(3, 3), textcoords="offset points")
    front = sorted(p for p, keep in zip(points, best) if keep)
    ax.step([p[0] for p in front], [p[1] for p in front], "k--", where="pre", lw=0.8, label="Pareto frontier")
    ax.scatter(*zip(*front), s=160, facecolors="none", edgecolors="grey", zorder=2)
    for role, colour in colours.items():
        ax.scatter([], [], color=colour, label=role)
    for mode, marker in markers.items():
        ax.scatter([], [], color="grey", marker=marker, label=mode)
    ax.set(xscale="log", xlabel="greedy decode bytes/s at B=1 (higher is faster)",
           ylabel="held-out bits per byte (lower is better)",
           title="size / accuracy / speed on a 2-core CPU (hollow: BPE vocabulary)")
    ax.legend(fontsize=7, ncol=2)
    _save(fig, path)


def _save(fig: Any, path: Path) -> None:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, metadata={"Software": None})  # no version stamp: the same data, the same bytes
    import matplotlib.pyplot as plt

    plt.close(fig)


PLOTS: dict[str, Callable[[Results, Path], None]] = {"decode_by_precision.png": plot_decode,
                                                     "roofline.png": plot_roofline, "frontier.png": plot_frontier}
def main(argv: list[str] | None = None) -> int:
    """Rewrite the marked blocks and the plots; with --check, report stale files and exit 1 if any."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a document is stale")
    args = parser.parse_args(argv)
    results = load_results()
    stale = {p: new for p, (now, new) in rendered(results).items() if now != new}
    if args.check:
        images = stale_images(results)
        for p in [*stale, *images]:
            print(f"stale: {p.relative_to(ROOT)} (run python docs/render.py)")
        return 1 if stale or images else 0
    for p, text in stale.items():
        p.write_text(text)
        print(f"rendered {p.relative_to(ROOT)}")
    import matplotlib

    matplotlib.use("Agg")
    for name, draw in PLOTS.items():
        draw(results, IMG / name)
    draw_hashed(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
