"""int4 (docs/precision.md): `gptjax bench --study int4` (its rows carry "part": model, symmetry, quality, speed) and
the suite's int8/int4 decode rows."""

from __future__ import annotations

from figures.common import Results, Row, block, find, of_kind
from figures.formats import mib, num, pct, ratio, table

INT4 = "int4.jsonl"  # the study's rows carry "part": model, symmetry, quality, speed

def _int4(results: Results, part: str) -> list[Row]:
    return [r for r in results[INT4] if r.get("kind") == "study" and r["part"] == part]


@block("int4-environment")
def int4_environment(results: Results) -> str:
    """Where the int4 study ran: the model, the windows and the load."""
    env, [model] = of_kind(results[INT4], "environment")["env"], _int4(results, "model")
    c, speed = model["checkpoint_config"], _int4(results, "speed")
    loads = [r[k] for r in speed for k in ("load_avg_before", "load_avg_after")]
    return (f"{c['n_layer']} layers, width {c['n_embd']}, context {c['n_positions']}, {model['windows']} validation "
            f"windows of {model['window_tokens']} bytes; Python {env['python']}, {env['cores']} cores, CPU kernels "
            f"{env['cpu_kernels']}; 1-minute load average {min(loads):.1f} to {max(loads):.1f} during the speed run")


@block("int4-symmetry")
def int4_symmetry(results: Results) -> str:
    """Symmetric vs asymmetric int4 per group size: reconstruction error and bits/byte."""
    body = [[str(r["group_size"]), r["scheme"], f"{r['relative_rms_error']:.4f}", f"{r['bits_per_byte']:.4f}",
             f"{100 * r['bits_per_byte_change']:+.2f}%"] for r in _int4(results, "symmetry")]
    return table(["G", "rounding", "relative RMS error", "bits/byte", "vs fp32"], body)


@block("int4-quality")
def int4_quality(results: Results) -> str:
    """The int4 mode per group size and head storage against fp32 (int8 for reference)."""
    body = []
    for r in _int4(results, "quality"):
        label = r["precision"] + (f" g{r['group_size']}" if r["group_size"] else "")
        body.append([label, r["head"], mib(r["weight_bytes"]), f"{r['bits_per_byte']:.4f}",
                     f"{100 * r['perplexity_change']:+.2f}%", pct(r["top1_agreement"]), pct(r["greedy_agreement"])])
    return table(["mode", "head", "weights MiB", "bits/byte", "Δ perplexity", "top-1 = fp32", "greedy = fp32"], body)


@block("int4-speed")
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

@block("int4-suite")
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
