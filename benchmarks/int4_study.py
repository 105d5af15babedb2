"""The int4 measurements behind docs/precision.md (issue 20), written as JSON lines to benchmarks/results/int4.jsonl:

  symmetry  symmetric (llama.cpp q4_0: the group's extreme -> -8) vs asymmetric (min/max, a zero point) int4 per
            group size, and symmetric clipped to [-7, 7]: weight reconstruction error (relative RMS over every
            quantised weight) and bits/byte of the trained model with the weights rounded that way (fp32 backend)
  quality   the int4 mode itself per group size, head int4 or int8 (keep_head), and int8 for reference: bits/byte,
            perplexity change, top-1 and greedy agreement with fp32 (gptjax.precision_report.quality)
  speed     greedy decode tokens/s at B=1 on the gpt2 shape (random weights), int8 and int4 per group size
            interleaved (A B C A B C on the bench harness, median and best of runs), the weight bytes each reads
            per token, and the read-bandwidth ceiling measured in the same run (gptjax.bench.ceilings)

    python benchmarks/int4_study.py --checkpoint runs/<quickstart>/model [--windows 64] [--runs 7] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
from pathlib import Path
from typing import Any

import numpy as np

from gptjax import data, get_backend, get_preset, init_params
from gptjax import precision as registry
from gptjax.backends import cpu_kernels
from gptjax.bench.ceilings import memory_bandwidth
from gptjax.bench.stats import interleaved_runs, load_average, median, stamps
from gptjax.cli.evaluate import validation_tokens
from gptjax.config import GPTConfig
from gptjax.precision_report import Mode, quality
from gptjax.quantize import convert, for_precision, quantized_keys, weight_bytes
from gptjax.weights import Params, load_checkpoint

OUT = Path(__file__).parent / "results" / "int4.jsonl"


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


def bits_per_byte(config: GPTConfig, params: Params, windows: np.ndarray) -> float:
    """Mean next-byte loss in bits of params on the fp32 JAX backend."""
    backend, nll, count = get_backend("jax", config), 0.0, 0
    for start in range(0, len(windows), 8):
        batch = windows[start: start + 8]
        logits = backend.forward(params, batch[:, :-1]).astype(np.float64)
        logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        nll += float((logz - np.take_along_axis(logits, batch[:, 1:, None], -1)[..., 0]).sum())
        count += batch[:, 1:].size
    return nll / count / math.log(2)


def symmetry_rows(config: GPTConfig, params: Params, windows: np.ndarray) -> list[dict[str, Any]]:
    """Reconstruction error and bits/byte per group size and rounding scheme (every quantised weight rounded)."""
    base = bits_per_byte(config, params, windows)
    rows = []
    for G in registry.INT4_GROUP_SIZES:
        for scheme in ("symmetric", "symmetric [-7, 7]", "asymmetric"):
            out, err, total = dict(params), 0.0, 0.0
            for key, axis in quantized_keys(config).items():
                w = params[key]
                r = np.moveaxis(rounded(np.moveaxis(w, axis, -1), G, scheme), -1, axis).astype(np.float32)
                err, total = err + float(((r - w) ** 2).sum()), total + float((w ** 2).sum())
                out[key] = r
            bpb = bits_per_byte(config, out, windows)
            rows.append({"kind": "int4-symmetry", "group_size": G, "scheme": scheme,
                         "relative_rms_error": math.sqrt(err / total), "bits_per_byte": bpb,
                         "bits_per_byte_fp32": base, "bits_per_byte_change": bpb / base - 1})
            print(rows[-1], file=sys.stderr, flush=True)
    return rows


def quality_rows(config: GPTConfig, params: Params, windows: np.ndarray) -> list[dict[str, Any]]:
    """The int4 mode per group size and head storage (and int8 for reference) against fp32 on the same windows."""
    variants = [("fp32", None, False), ("int8", None, False)] + [
        ("int4", G, keep) for G in registry.INT4_GROUP_SIZES for keep in (False, True)]
    built = []
    for precision, G, keep in variants:
        converted = params if precision == "fp32" else convert(params, config, registry.storage(precision),
                                                               group_size=G, keep_head=keep)
        backend = get_backend("jax", config, precision=precision)
        built.append((Mode(precision, group_size=G), backend, backend.prepare(converted), weight_bytes(converted)))
    rows = []
    for (precision, G, keep), (_, _, _, nbytes), q in zip(variants, built, quality(built, windows)):
        head = registry.STORAGES[registry.storage(precision)].head_storage if keep else registry.storage(precision)
        rows.append({"kind": "int4-quality", "precision": precision, "group_size": G, "head": head,
                     "weight_bytes": nbytes, "bits_per_byte": q["loss"] / math.log(2), **q})
        print(rows[-1], file=sys.stderr, flush=True)
    return rows


def decode_rate(backend: Any, weights: Any, prompt: list[int], new_tokens: int) -> float:
    """Tokens/s of a greedy B=1 stream's decode phase: the tokens after the prefill's, over the time from the
    prefill's chunk to the last chunk (as gptjax.precision_report.speed times it)."""
    chunks = stamps(backend.stream(weights, [prompt], new_tokens, chunk_size=new_tokens, greedy=True))
    return sum(len(t) for _, c in chunks[1:] for t in c.tokens) / (chunks[-1][0] - chunks[0][0])


def speed_rows(runs: int) -> list[dict[str, Any]]:
    """Decode B=1 tokens/s on the gpt2 shape, int8 and int4 per group size interleaved (A B C A B C, fresh
    prompts each round; median and best of runs: the machine is shared), and the read ceiling before and after."""
    config = get_preset("gpt2")
    params = init_params(config, seed=0)
    variants = [("int8", None)] + [("int4", G) for G in registry.INT4_GROUP_SIZES]
    jobs, nbytes = {}, {}
    prompts = np.random.default_rng(0).integers(0, config.vocab_size, (runs + 1, 32)).tolist()
    for precision, G in variants:
        backend = get_backend("jax", config, precision=precision)
        converted = for_precision(params, config, precision, group_size=G)
        weights, nbytes[(precision, G)] = backend.prepare(converted), weight_bytes(converted)
        jobs[(precision, G)] = lambda i, b=backend, w=weights: decode_rate(b, w, prompts[max(i, -1) + 1], 32)
    load_before = load_average()
    bandwidth = memory_bandwidth(256 * 2**20)["read"]
    measured = interleaved_runs({str(k): job for k, job in jobs.items()}, runs, warmup=1)
    bandwidth_after = memory_bandwidth(256 * 2**20)["read"]
    rows = []
    for (precision, G), rates in zip(variants, measured.values()):
        tps, best, n = median(rates), max(rates), nbytes[(precision, G)]
        rows.append({"kind": "int4-speed", "preset": "gpt2", "precision": precision, "group_size": G,
                     "batch": 1, "prompt": 32, "new": 32, "runs": runs, "decode_tokens_per_s": tps,
                     "decode_tokens_per_s_best": best, "decode_tokens_per_s_all": rates, "weight_bytes": n,
                     "read_bandwidth": bandwidth, "read_bandwidth_after": bandwidth_after,
                     "roofline_tokens_per_s": bandwidth / n, "roofline_fraction": tps * n / bandwidth,
                     "roofline_fraction_best": best * n / bandwidth,
                     "load_avg_before": load_before, "load_avg_after": load_average(),
                     "cpu_kernels": cpu_kernels.status()})
        print({k: v for k, v in rows[-1].items() if k != "decode_tokens_per_s_all"}, file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run the three measurements and write their rows."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="the trained quickstart model (gptjax train's runs/*/model)")
    p.add_argument("--windows", type=int, default=64, help="validation windows (of the context length)")
    p.add_argument("--runs", type=int, default=15, help="timed decode runs per variant (median and best)")
    p.add_argument("--parts", default="symmetry,quality,speed", help="comma list of the measurements to run")
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--merge", metavar="FILE", help="keep the rows of the parts not run from this earlier output")
    args = p.parse_args(argv)
    config, params = load_checkpoint(args.checkpoint)
    ns = argparse.Namespace(checkpoint=args.checkpoint, data=None, val_fraction=0.05)
    windows = data.eval_windows(validation_tokens(ns, config)[0], config.n_positions, args.windows)
    parts = args.parts.split(",")
    env = {"kind": "environment", "checkpoint_config": config.to_hf_dict(), "windows": len(windows),
           "window_tokens": int(windows.shape[1] - 1), "python": platform.python_version(),
           "cores": os.cpu_count(), "load_avg_start": load_average(), "cpu_kernels": cpu_kernels.status()}
    rows = [env]
    if args.merge:  # keep the other parts' rows of an earlier run
        rows += [r for r in map(json.loads, Path(args.merge).read_text().splitlines())
                 if r["kind"] != "environment" and r["kind"].removeprefix("int4-") not in parts]
    rows += symmetry_rows(config, params, windows) if "symmetry" in parts else []
    rows += quality_rows(config, params, windows) if "quality" in parts else []
    rows += speed_rows(args.runs) if "speed" in parts else []
    Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    print(f"wrote {args.out} ({len(rows)} rows)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
