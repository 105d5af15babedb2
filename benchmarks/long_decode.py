"""Decode at a long context in each weight precision x KV-cache precision: the time of one decode step.

    python -m benchmarks.long_decode                          # gpt2, B=8, 480 cached tokens + 40 new
    python -m benchmarks.long_decode --batch 1 --prompt 960 --modes fp32/fp32,int8/int8

Each mode (weights/cache) streams the same greedy continuation in chunks of 8 decode steps; a step's time is a
chunk's time / 8 (prefill excluded), median over chunks, then over --runs rounds with the modes interleaved.
Run it twice, the second time with GPTJAX_CPU_KERNELS=0, to see what XLA's formulations alone do.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from benchmarks.common import append_jsonl, environment
from gptjax import get_backend, get_preset, init_params

DEFAULT_MODES = "fp32/fp32,bf16/bf16,bf16/fp32,int8/int8,int8/fp32,int8/bf16"


def step_time(backend, weights, prompts: list[list[int]], new: int, chunk: int = 8) -> float:
    """Median seconds per decode step over the decode chunks of one stream."""
    per, last = [], None
    for part in backend.stream(weights, prompts, new, chunk_size=chunk, greedy=True):
        now = time.perf_counter()
        if last is not None and part.phase == "decode":
            per.append((now - last) / chunk)
        last = now
    return float(np.median(per))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="gpt2")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt", type=int, default=480)
    p.add_argument("--new", type=int, default=40, help="new tokens per row (a multiple of 8: whole chunks)")
    p.add_argument("--modes", default=DEFAULT_MODES, help="comma list of precision/kv_cache")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--jsonl", help="append one JSON line per mode")
    args = p.parse_args(argv)
    if args.new < 16 or args.runs < 1:
        p.error(f"--new {args.new} must be >= 16 (two decode chunks) and --runs {args.runs} >= 1")
    modes = [tuple(m.split("/")) for m in args.modes.split(",")]
    if any(len(m) != 2 for m in modes):
        p.error(f"--modes {args.modes!r}: each mode is precision/kv_cache, e.g. int8/int8")
    config = get_preset(args.preset)
    params = init_params(config, seed=0)
    prompts = [np.random.default_rng(i).integers(0, config.vocab_size, args.prompt).tolist()
               for i in range(args.batch)]
    env = environment()
    print(f"# decode steps: {args.preset}, B={args.batch}, {args.prompt} cached + {args.new} new tokens; "
          f"gptjax CPU kernels: {env['cpu_kernels']}", flush=True)
    runs = {}
    for precision, kv in modes:
        backend = get_backend("jax", config, precision=precision, kv_cache=kv)
        runs[precision, kv] = (backend, backend.prepare(params), [])
        step_time(*runs[precision, kv][:2], prompts, args.new)  # compile and warm up
    for _ in range(args.runs):
        for backend, weights, times in runs.values():
            times.append(step_time(backend, weights, prompts, args.new))
    fp32 = runs.get(("fp32", "fp32"))
    rows = []
    print("| weights | KV cache | ms per step | tokens/s | x fp32/fp32 |\n|---|---|---|---|---|")
    for (precision, kv), (_, _, times) in runs.items():
        step = float(np.median(times))
        ratio = f"{np.median(fp32[2]) / step:.2f}x" if fp32 else "-"
        print(f"| {precision} | {kv} | {step * 1e3:.1f} | {args.batch / step:,.0f} | {ratio} |")
        rows.append({"benchmark": "long_decode", "precision": precision, "kv_cache": kv, "batch": args.batch,
                     "prompt": args.prompt, "new": args.new, "step_s": step, "times_s": times})
    append_jsonl(args.jsonl, rows, env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
