"""Decode at a long context in each weight precision x KV-cache precision: the time of one decode step.

    gptjax bench --study long-decode                      # gpt2, B=8, 480 cached tokens + 40 new
    gptjax bench --study long-decode --batch 1 --prompt 960 --modes fp32/fp32,int8/int8

Each mode (weights/cache) streams the same greedy continuation in chunks of 8 decode steps; a step's time is a
chunk's time / 8 (prefill excluded), median over chunks, then over --runs rounds with the modes interleaved
after one warm-up round. Run it twice, the second time with GPTJAX_CPU_KERNELS=0, to see what XLA's
formulations alone do.
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

from gptjax import get_backend, get_preset, init_params
from gptjax.bench.results import Outcome
from gptjax.errors import GptjaxError
from gptjax.sampling import GREEDY
from gptjax.timing import interleaved_runs, median, stamps

DEFAULT_MODES = "fp32/fp32,bf16/bf16,bf16/fp32,int8/int8,int8/fp32,int8/bf16"
CHUNK = 8  # decode steps per stream chunk

# flag -> (default, help); the runner adds them (the type is the default's)
FLAGS = {"--preset": ("gpt2", "model shape, random weights"), "--batch": (8, "rows decoding together"),
         "--prompt": (480, "cached prompt tokens per row"),
         "--new": (40, "new tokens per row, >= 16 (a multiple of 8: whole chunks)"),
         "--modes": (DEFAULT_MODES, "comma list of precision/kv_cache"),
         "--runs": (3, "timed rounds, modes interleaved")}


def step_time(backend: Any, weights: Any, prompts: list[list[int]], new: int, chunk: int = CHUNK) -> float:
    """Median seconds per decode step over the decode chunks of one greedy stream."""
    arrivals = stamps(backend.stream(weights, prompts, new, chunk_size=chunk, sampling=GREEDY))
    per = [(t - before) / chunk for (before, _), (t, part) in zip(arrivals, arrivals[1:]) if part.phase == "decode"]
    return float(np.median(per))


def parse_modes(text: str) -> list[tuple[str, str]]:
    """'fp32/fp32,int8/int8' -> [(precision, kv_cache), ...]; a GptjaxError for anything else."""
    modes = [tuple(m.split("/")) for m in text.split(",")]
    if any(len(m) != 2 for m in modes):
        raise GptjaxError(f"--modes {text!r}: each mode is precision/kv_cache, e.g. int8/int8")
    return modes


def prepare(args: argparse.Namespace) -> None:
    """A GptjaxError for values the study cannot run with."""
    if args.new < 16 or args.runs < 1:
        raise GptjaxError(f"--new {args.new} must be >= 16 (two decode chunks) and --runs {args.runs} >= 1")
    parse_modes(args.modes)


def run(args: argparse.Namespace, log: Any) -> Outcome:
    """Every mode's median decode step, modes interleaved round by round."""
    modes = parse_modes(args.modes)
    config = get_preset(args.preset)
    params = init_params(config, seed=0)
    prompts = [np.random.default_rng(i).integers(0, config.vocab_size, args.prompt).tolist()
               for i in range(args.batch)]
    fns = {}
    for precision, kv in modes:
        backend = get_backend("jax", config, precision=precision, kv_cache=kv)
        weights = backend.prepare(params)
        fns[f"{precision}/{kv}"] = lambda i, b=backend, w=weights: step_time(b, w, prompts, args.new)
    log(f"decode steps: {args.preset}, B={args.batch}, {args.prompt} cached + {args.new} new tokens ...")
    times = interleaved_runs(fns, args.runs, warmup=1)  # the warm-up round compiles
    fp32 = median(times["fp32/fp32"]) if "fp32/fp32" in times else None
    rows = [{"precision": m.split("/")[0], "kv_cache": m.split("/")[1], "preset": args.preset, "batch": args.batch,
             "prompt": args.prompt, "new": args.new, "step_s": median(ts), "tokens_per_s": args.batch / median(ts),
             "vs_fp32": fp32 / median(ts) if fp32 else None, "times_s": ts} for m, ts in times.items()]
    return Outcome(rows, f"gptjax bench --study long-decode: {args.preset}, B={args.batch}, {args.prompt} cached + "
                   f"{args.new} new tokens, median of {args.runs} rounds", table(rows))


def table(rows: list[dict[str, Any]]) -> str:
    """The markdown table: ms per step, tokens/s and the ratio to fp32/fp32 per mode."""
    lines = ["| weights | KV cache | ms per step | tokens/s | x fp32/fp32 |", "|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['vs_fp32']:.2f}x" if r["vs_fp32"] else "-"
        lines.append(f"| {r['precision']} | {r['kv_cache']} | {r['step_s'] * 1e3:.1f} | {r['tokens_per_s']:,.0f} "
                     f"| {ratio} |")
    return "\n".join(lines)
