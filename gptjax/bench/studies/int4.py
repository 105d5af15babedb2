"""int4 weight-only against int8 and fp32: rounding scheme, quality per group size, decode speed at B=1.

    gptjax bench --study int4 --checkpoint runs/<quickstart>/model      # the figures of docs/precision.md
    gptjax bench --study int4 --parts speed --preset gpt2 --runs 15     # speed only (random weights)

Three parts, each a row per variant ("part" says which; a "model" row records the checkpoint and windows):
symmetry: symmetric (llama.cpp q4_0: each group's extreme -> -8) vs asymmetric (min/max, a zero point) per group
size, and symmetric clipped to [-7, 7]: weight reconstruction error (relative RMS over every quantised weight)
and bits/byte of the trained model with its weights rounded that way (fp32 compute). quality: the int4 mode per
group size, head int4 or int8 (keep_head), and int8 for reference: bits/byte, perplexity change, top-1 and
greedy agreement with fp32 (gptjax.precision_report.quality). speed: greedy decode tokens/s at B=1 on --preset
(random weights), int8 and int4 per group size interleaved round by round (median and best), the weight bytes
each reads per token, and the read-bandwidth ceiling measured before and after in the same run.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import numpy as np

from gptjax import get_backend, get_preset, init_params
from gptjax import precision as registry
from gptjax.bench.ceilings import memory_bandwidth
from gptjax.bench.report import grid
from gptjax.bench.results import Outcome
from gptjax.errors import GptjaxError
from gptjax.heldout import validation_windows
from gptjax.precision import INT4_GROUP_SIZES
from gptjax.precision_report import Mode, quality
from gptjax.quantize import convert, for_precision, quantized_keys, weight_bytes
from gptjax.sampling import GREEDY
from gptjax.timing import interleaved_runs, load_average, median, stamps
from gptjax.weights import load_checkpoint, load_config

PARTS = ("symmetry", "quality", "speed")
SCHEMES = ("symmetric", "symmetric [-7, 7]", "asymmetric")
PROMPT = NEW = 32  # tokens of the speed part's prompt and greedy decode

FLAGS = {"--checkpoint": (None, "the trained model (gptjax train's runs/*/model) for symmetry and quality"),
         "--windows": (128, "validation windows of the model's context, for symmetry and quality"),
         "--parts": (",".join(PARTS), "comma list of the parts to run"),
         "--group-sizes": (",".join(map(str, INT4_GROUP_SIZES)), "comma list of int4 group sizes"),
         "--preset": ("gpt2", "the shape the speed part decodes with (random weights)"),
         "--runs": (15, "timed decode rounds of the speed part, variants interleaved")}


def _parts(text: str) -> list[str]:
    parts = text.split(",")
    if not all(p in PARTS for p in parts):
        raise GptjaxError(f"--parts {text!r}; give a comma list of {', '.join(PARTS)}")
    return parts


def _group_sizes(text: str) -> list[int]:
    try:
        sizes = [int(x) for x in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or not all(g in INT4_GROUP_SIZES for g in sizes):
        raise GptjaxError(f"--group-sizes {text!r}; give a comma list of {', '.join(map(str, INT4_GROUP_SIZES))}")
    return sizes


def _fits(config: Any, sizes: list[int], what: str) -> None:
    """A GptjaxError when a group size does not divide the model's input widths (int4 groups along them)."""
    widths = (config.n_embd, config.mlp_width)
    if bad := [g for g in sizes if any(n % g for n in widths)]:
        raise GptjaxError(f"--group-sizes {','.join(map(str, bad))} must divide {what}'s input widths "
                          f"{', '.join(map(str, widths))}")


def prepare(args: argparse.Namespace) -> None:
    """A GptjaxError for values the study cannot run with."""
    parts, sizes = _parts(args.parts), _group_sizes(args.group_sizes)
    if args.windows < 1 or args.runs < 1:
        raise GptjaxError(f"--windows {args.windows} and --runs {args.runs} must be >= 1")
    if {"symmetry", "quality"} & set(parts):
        if args.checkpoint is None:
            raise GptjaxError("the symmetry and quality parts need --checkpoint (a trained model directory)")
        _fits(load_config(args.checkpoint), sizes, f"--checkpoint {args.checkpoint}")
    if "speed" in parts:
        config = get_preset(args.preset)
        if config.n_positions < PROMPT + NEW:
            raise GptjaxError(f"--preset {args.preset}: context {config.n_positions} < the speed part's "
                              f"{PROMPT} + {NEW} tokens")
        _fits(config, sizes, f"--preset {args.preset}")


def run(args: argparse.Namespace, log: Any) -> Outcome:
    """The parts asked for, in order: their rows, tagged with "part"."""
    parts, sizes, rows = _parts(args.parts), _group_sizes(args.group_sizes), []
    if {"symmetry", "quality"} & set(parts):
        config, params, windows = _model(args.checkpoint, args.windows)
        rows.append({"part": "model", "checkpoint": args.checkpoint, "checkpoint_config": config.to_hf_dict(),
                     "windows": len(windows), "window_tokens": int(windows.shape[1] - 1)})
        rows += symmetry_rows(config, params, windows, sizes, log) if "symmetry" in parts else []
        rows += quality_rows(config, params, windows, sizes, log) if "quality" in parts else []
    rows += speed_rows(args.preset, sizes, args.runs, log) if "speed" in parts else []
    return Outcome(rows, f"gptjax bench --study int4: {', '.join(parts)}", table(rows))


def _model(checkpoint: str, count: int) -> tuple[Any, Any, np.ndarray]:
    """(config, params, validation windows [N, T+1]) of a trained checkpoint, on the split `gptjax train` held out."""
    config, params = load_checkpoint(checkpoint)
    return config, params, validation_windows(checkpoint, config, count)


def rounded(w: np.ndarray, group_size: int, scheme: str) -> np.ndarray:
    """w [..., n] with each group of group_size along the last axis rounded to 4 bits by scheme, dequantised."""
    g = w.reshape(*w.shape[:-1], -1, group_size)
    if scheme == "asymmetric":  # scale (max - min) / 15, zero point round(-min / scale): levels 0..15
        lo, hi = g.min(-1, keepdims=True), g.max(-1, keepdims=True)
        d = np.where(hi > lo, (hi - lo) / 15, 1.0)
        z = np.clip(np.rint(-lo / d), 0, 15)
        return ((np.clip(np.rint(g / d) + z, 0, 15) - z) * d).reshape(w.shape)
    if scheme == "symmetric [-7, 7]":  # scale max|w| / 7: 15 levels
        d = np.abs(g).max(-1, keepdims=True) / 7
        d = np.where(d > 0, d, 1.0)
        return (np.clip(np.rint(g / d), -7, 7) * d).reshape(w.shape)
    m = np.take_along_axis(g, np.abs(g).argmax(-1)[..., None], -1)  # gptjax's int4: the extreme -> -8
    d = np.where(m != 0, m / -8.0, 1.0)
    return (np.clip(np.rint(g / d), -8, 7) * d).reshape(w.shape)


def bits_per_byte(config: Any, params: Any, windows: np.ndarray) -> float:
    """Mean next-byte loss in bits of params on the fp32 JAX backend."""
    backend, nll, count = get_backend("jax", config), 0.0, 0
    for start in range(0, len(windows), 8):
        batch = windows[start: start + 8]
        logits = backend.forward(params, batch[:, :-1]).astype(np.float64)  # [B, T, V]
        logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        nll += float((logz - np.take_along_axis(logits, batch[:, 1:, None], -1)[..., 0]).sum())
        count += batch[:, 1:].size
    return nll / count / math.log(2)


def symmetry_rows(config: Any, params: Any, windows: np.ndarray, sizes: list[int], log: Any) -> list[dict[str, Any]]:
    """Reconstruction error and bits/byte per group size and rounding scheme (every quantised weight rounded)."""
    base = bits_per_byte(config, params, windows)
    rows = []
    for G in sizes:
        for scheme in SCHEMES:
            out, err, total = dict(params), 0.0, 0.0
            for key, axis in quantized_keys(config).items():
                w = params[key]
                r = np.moveaxis(rounded(np.moveaxis(w, axis, -1), G, scheme), -1, axis).astype(np.float32)
                err, total = err + float(((r - w) ** 2).sum()), total + float((w ** 2).sum())
                out[key] = r
            bpb = bits_per_byte(config, out, windows)
            rows.append({"part": "symmetry", "group_size": G, "scheme": scheme,
                         "relative_rms_error": math.sqrt(err / total), "bits_per_byte": bpb,
                         "bits_per_byte_fp32": base, "bits_per_byte_change": bpb / base - 1})
            log(f"int4 symmetry: {rows[-1]}")
    return rows


def quality_rows(config: Any, params: Any, windows: np.ndarray, sizes: list[int], log: Any) -> list[dict[str, Any]]:
    """The int4 mode per group size and head storage (and int8 for reference) against fp32 on the same windows."""
    variants = [("fp32", None, False), ("int8", None, False)] + [("int4", G, keep) for G in sizes
                                                                   for keep in (False, True)]
    built = []
    for precision, G, keep in variants:
        converted = params if precision == "fp32" else convert(params, config, registry.storage(precision),
                                                               group_size=G, keep_head=keep)
        backend = get_backend("jax", config, precision=precision)
        built.append((Mode(precision, group_size=G), backend, backend.prepare(converted), weight_bytes(converted)))
    rows = []
    for (precision, G, keep), (_, _, _, nbytes), q in zip(variants, built, quality(built, windows)):
        head = registry.STORAGES[registry.storage(precision)].head_storage if keep else registry.storage(precision)
        rows.append({"part": "quality", "precision": precision, "group_size": G, "head": head,
                     "weight_bytes": nbytes, "bits_per_byte": q["loss"] / math.log(2), **q})
        log(f"int4 quality: {rows[-1]}")
    return rows


def decode_rate(backend: Any, weights: Any, prompt: list[int], new_tokens: int) -> float:
    """Tokens/s of a greedy B=1 stream's decode phase: the tokens after the prefill's, over the time from the
    prefill's chunk to the last chunk (as gptjax.precision_report.speed times it)."""
    chunks = stamps(backend.stream(weights, [prompt], new_tokens, chunk_size=new_tokens, sampling=GREEDY))
    return sum(len(t) for _, c in chunks[1:] for t in c.tokens) / (chunks[-1][0] - chunks[0][0])


def speed_rows(preset: str, sizes: list[int], runs: int, log: Any) -> list[dict[str, Any]]:
    """Decode B=1 tokens/s on the preset's shape, int8 and int4 per group size interleaved (A B C A B C, fresh
    prompts each round; median and best of runs: the machine may be shared), and the read ceiling before and
    after."""
    from gptjax.backends import cpu_kernels  # imports jax: not for the study's --help and flag checks

    config = get_preset(preset)
    params = init_params(config, seed=0)
    variants = [("int8", None)] + [("int4", G) for G in sizes]
    jobs, nbytes = {}, {}
    prompts = np.random.default_rng(0).integers(0, config.vocab_size, (runs + 1, PROMPT)).tolist()
    for precision, G in variants:
        backend = get_backend("jax", config, precision=precision)
        converted = for_precision(params, config, precision, group_size=G)
        weights, nbytes[(precision, G)] = backend.prepare(converted), weight_bytes(converted)
        jobs[(precision, G)] = lambda i, b=backend, w=weights: decode_rate(b, w, prompts[max(i, -1) + 1], NEW)
    log(f"int4 speed: {preset}, {len(variants)} variants x {runs} rounds ...")
    load_before = load_average()
    bandwidth = memory_bandwidth(256 * 2**20)["read"]
    measured = interleaved_runs({str(k): job for k, job in jobs.items()}, runs, warmup=1)
    bandwidth_after = memory_bandwidth(256 * 2**20)["read"]
    rows = []
    for (precision, G), rates in zip(variants, measured.values()):
        tps, best, n = median(rates), max(rates), nbytes[(precision, G)]
        rows.append({"part": "speed", "preset": preset, "precision": precision, "group_size": G,
                     "batch": 1, "prompt": PROMPT, "new": NEW, "runs": runs, "decode_tokens_per_s": tps,
                     "decode_tokens_per_s_best": best, "decode_tokens_per_s_all": rates, "weight_bytes": n,
                     "read_bandwidth": bandwidth, "read_bandwidth_after": bandwidth_after,
                     "roofline_tokens_per_s": bandwidth / n, "roofline_fraction": tps * n / bandwidth,
                     "roofline_fraction_best": best * n / bandwidth,
                     "load_avg_before": load_before, "load_avg_after": load_average(),
                     "cpu_kernels": cpu_kernels.status()})
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """The markdown tables of the parts that ran (docs/render.py renders the committed ones in full)."""
    def label(r: dict[str, Any]) -> str:
        return r["precision"] + (f" g{r['group_size']}" if r["group_size"] else "")

    def part(name: str) -> list[dict[str, Any]]:
        return [r for r in rows if r["part"] == name]

    symmetry = grid(("G", "rounding", "relative RMS error", "bits/byte", "vs fp32"), [
        (str(r["group_size"]), r["scheme"], f"{r['relative_rms_error']:.4f}", f"{r['bits_per_byte']:.4f}",
         f"{100 * r['bits_per_byte_change']:+.2f}%") for r in part("symmetry")])
    quality = grid(("mode", "head", "weight bytes", "bits/byte", "Δ perplexity", "top-1 = fp32", "greedy = fp32"), [
        (label(r), r["head"], f"{r['weight_bytes']:,}", f"{r['bits_per_byte']:.4f}",
         f"{100 * r['perplexity_change']:+.2f}%", f"{100 * r['top1_agreement']:.1f}%",
         f"{100 * r['greedy_agreement']:.1f}%") for r in part("quality")])
    speed = grid(("mode", "weight bytes", "decode B=1 tok/s (median)", "best", "% of roofline (median)"), [
        (label(r), f"{r['weight_bytes']:,}", f"{r['decode_tokens_per_s']:,.1f}", f"{r['decode_tokens_per_s_best']:,.1f}",
         f"{100 * r['roofline_fraction']:.1f}%") for r in part("speed")])
    return "\n\n".join("\n".join(t) for t in (symmetry, quality, speed) if len(t) > 2)
