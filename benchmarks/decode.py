"""Decode throughput and latency: gptjax's KV-cache decoders vs Hugging Face `generate`, same weights, same run.

    python -m benchmarks.decode                      # gpt2 shape, fp32, prompt 32, 128 new tokens, greedy
    python -m benchmarks.decode --batches 1 --new 64 --skip numpy

For each batch size: tokens/s of the JAX backend and of HF (PyTorch, `peer` extra), interleaved A B A B and
the ratio; the memory-bandwidth roofline (weight bytes x decode steps/s / the read bandwidth measured now
through JAX: a 1 GiB reduction; the copy bandwidth is printed too, but XLA:CPU copies on one thread);
time to first token and per-token latency p50/p99 from a chunk-size-1 stream (each token synced to the host).
Then the NumPy backend with its cache against its own no-cache recompute (picoGPT style) at B=1.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from benchmarks.common import (
    append_jsonl,
    environment,
    hf_model,
    interleaved_times,
    median,
    memory_bandwidth,
    percentile,
)
from gptjax import get_backend, get_preset, init_params
from gptjax.bench.workloads import stream_latencies


def _hf_generate(params, config):
    """fn(prompts [B, T] int, n_new) -> tokens [B, n_new] with HF greedy generate, or None without torch."""
    model = hf_model(params, config)
    if model is None:
        return None
    import torch

    from gptjax.bench.peer import hf_generate

    def generate(prompts: np.ndarray, n_new: int) -> np.ndarray:
        return hf_generate(model, torch.from_numpy(prompts.astype(np.int64)), n_new)[:, prompts.shape[1]:].numpy()

    return generate


def _latencies(backend, weights, prompts, n_new):
    """TTFT and the gaps between later tokens, from a stream of one decode step per chunk."""
    found = stream_latencies(backend, weights, prompts, n_new)
    return found["ttft_s"], found["per_token_s"]


def main(argv: list[str] | None = None) -> int:
    """Run the decode benchmark; print tables (and JSON lines with --json)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="gpt2")
    ap.add_argument("--batches", default="1,8", help="comma list of batch sizes")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens per row")
    ap.add_argument("--new", type=int, default=128, help="new tokens per row")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--skip", default="", help="comma list of: hf, numpy, latency")
    ap.add_argument("--json", metavar="FILE", help="append one JSON line per measurement")
    args = ap.parse_args(argv)

    config = get_preset(args.preset)
    params = init_params(config, seed=0)
    jax_backend = get_backend("jax", config)
    weights = jax_backend.prepare(params)
    hf = None if "hf" in args.skip else _hf_generate(params, config)
    bw = memory_bandwidth()
    env = environment() | {k: f"{v / 1e9:.1f} GB/s" for k, v in bw.items()}
    print("environment:", json.dumps(env))
    ceiling = bw["read_bytes_per_s"]  # decode reads weights; XLA:CPU's elementwise copy runs on one thread
    rows, rng = [], np.random.default_rng(0)
    for B in map(int, args.batches.split(",")):
        prompts = [rng.integers(0, config.vocab_size, (B, args.prompt)) for _ in range(3)]
        fns = {"jax": lambda i: jax_backend.generate(weights, prompts[i % 3].tolist(), args.new, greedy=True)}
        if hf is not None:
            fns["hf"] = lambda i: hf(prompts[i % 3], args.new)
            ours = jax_backend.generate(weights, prompts[0].tolist(), args.new, greedy=True).tokens
            agree = np.mean(np.asarray(ours) == hf(prompts[0], args.new))
            print(f"B={B}: greedy tokens equal to HF's at {agree:.1%} of positions (random weights: near-ties)")
        times = interleaved_times(fns, args.runs, warmup=1)
        for name, ts in times.items():
            tok_s = B * args.new / median(ts)
            row = {"benchmark": "decode", "backend": name, "preset": args.preset, "batch": B,
                   "prompt": args.prompt, "new": args.new, "median_s": median(ts), "tokens_per_s": tok_s,
                   "weight_bytes_per_s": config.weight_bytes("fp32") * tok_s / B,
                   "roofline_fraction": config.weight_bytes("fp32") * tok_s / B / ceiling,
                   "roofline_fraction_copy": config.weight_bytes("fp32") * tok_s / B / bw["copy_bytes_per_s"]}
            if "hf" in times:
                row["vs_hf"] = median(times["hf"]) / median(ts)
            if name == "jax" and "latency" not in args.skip:
                ttft, gaps = _latencies(jax_backend, weights, prompts[1].tolist(), args.new)
                row |= {"ttft_s": ttft, "tpot_p50_s": percentile(gaps, 50), "tpot_p99_s": percentile(gaps, 99)}
            rows.append(row)

    print(f"\ndecode, {args.preset}, fp32, greedy, prompt {args.prompt}, {args.new} new tokens, median of "
          f"{args.runs}; roofline = weight bytes x steps/s / the read bandwidth measured above "
          f"({ceiling / 1e9:.1f} GB/s; XLA:CPU's copy, {bw['copy_bytes_per_s'] / 1e9:.1f} GB/s, is one thread)\n")
    print("| backend | B | tokens/s | vs HF | weight GB/s | roofline | TTFT ms | per-token p50 / p99 ms |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        vs = f"{r['vs_hf']:.2f}x" if "vs_hf" in r else "-"
        lat = (f"{1e3 * r['ttft_s']:.1f} | {1e3 * r['tpot_p50_s']:.1f} / {1e3 * r['tpot_p99_s']:.1f}"
               if "ttft_s" in r else "- | -")
        print(f"| {r['backend']} | {r['batch']} | {r['tokens_per_s']:,.1f} | {vs} | "
              f"{r['weight_bytes_per_s'] / 1e9:.1f} | {r['roofline_fraction']:.0%} | {lat} |")

    if "numpy" not in args.skip:
        rows += _numpy_cache_vs_recompute(config, params, args, rng)
    append_jsonl(args.json, rows, env)
    return 0


def _numpy_cache_vs_recompute(config, params, args, rng) -> list[dict]:
    """NumPy backend at B=1: its KV-cache generate vs a full forward pass per new token."""
    backend = get_backend("numpy", config)
    weights = backend.prepare(params)
    prompt = rng.integers(0, config.vocab_size, args.prompt).tolist()

    def recompute(_: int) -> list[int]:
        seq = list(prompt)
        for _ in range(args.new):
            seq.append(int(np.argmax(backend.forward(weights, [seq], last_only=True)[0])))
        return seq[len(prompt):]

    cached = backend.generate(weights, [prompt], args.new, greedy=True).tokens[0]
    assert cached == recompute(0), "cached and recomputed greedy tokens differ"
    times = interleaved_times({"cache": lambda i: backend.generate(weights, [prompt], args.new, greedy=True),
                               "recompute": recompute}, runs=1, warmup=0)
    cache_s, recompute_s = median(times["cache"]), median(times["recompute"])
    print(f"\nnumpy backend, B=1, {args.new} new tokens: cache {args.new / cache_s:.1f} tokens/s, no-cache recompute "
          f"{args.new / recompute_s:.1f} tokens/s: {recompute_s / cache_s:.1f}x (same tokens)")
    return [{"benchmark": "decode_numpy", "batch": 1, "new": args.new, "cache_tokens_per_s": args.new / cache_s,
             "recompute_tokens_per_s": args.new / recompute_s, "speedup": recompute_s / cache_s}]


if __name__ == "__main__":
    sys.exit(main())
