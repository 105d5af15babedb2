"""Forward-pass throughput: gptjax's NumPy and JAX backends vs Hugging Face GPT-2 on PyTorch, same run.

    python -m benchmarks.forward                 # gpt2 shape, B=1, T=512, fp32, random weights
    python -m benchmarks.forward --preset byte-small --batch 4 --seq-len 256 --runs 7

Every backend gets the same weights (HF loads gptjax's checkpoint) and the same rotating token batches; the
logits are cross-checked before timing. Runs are interleaved (A B C A B C ...) after warm-up; the table shows
median seconds per forward, tokens/s, achieved GFLOP/s (exact FLOPs from GPTConfig.forward_flops), and the
ratio to HF. "last" computes only the last position's logits (HF: logits_to_keep=1), "all" every position's.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from benchmarks.common import append_jsonl, environment, hf_model, interleaved_times, median, torch_threads
from gptjax import get_backend, get_preset, init_params


def _hf_forward(params, config):
    """A forward fn over HF's GPT2LMHeadModel with our weights, or None without the peer extra."""
    model = hf_model(params, config)
    if model is None:
        return None
    import torch

    def forward(tokens: np.ndarray, last_only: bool) -> np.ndarray:
        with torch.inference_mode(), torch_threads():
            out = model(torch.from_numpy(tokens.astype(np.int64)), use_cache=False,
                        logits_to_keep=1 if last_only else 0).logits
        return out[:, -1].numpy() if last_only else out.numpy()

    return forward


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print a markdown table (and JSON lines with --json)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="gpt2")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--runs", type=int, default=5, help="timed runs per backend (median reported)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--modes", default="last,all", help="comma list of: last, all")
    ap.add_argument("--skip", default="", help="comma list of backends to skip: numpy, jax, hf")
    ap.add_argument("--json", metavar="FILE", help="append one JSON line per measurement")
    args = ap.parse_args(argv)

    config = get_preset(args.preset)
    params = init_params(config, seed=0)
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, config.vocab_size, (args.batch, args.seq_len)) for _ in range(4)]
    runners = {name: get_backend(name, config) for name in ("numpy", "jax") if name not in args.skip}
    prepared = {name: b.prepare(params) for name, b in runners.items()}
    fwd = {name: (lambda t, lo, b=b, w=prepared[name]: b.forward(w, t, last_only=lo)) for name, b in runners.items()}
    hf = None if "hf" in args.skip else _hf_forward(params, config)
    if hf is not None:
        fwd["hf"] = hf
    env = environment()
    print("environment:", json.dumps(env))
    if hf is None and "hf" not in args.skip:
        print("(HF peer not run: install the `peer` extra: pip install -e '.[peer]')")

    rows = []
    for mode in args.modes.split(","):
        last_only = mode == "last"
        outs = {name: f(batches[0], last_only) for name, f in fwd.items()}
        ref = outs.get("numpy", next(iter(outs.values())))
        for name, out in outs.items():
            print(f"check {mode:>4} {name:>5}: max |logits - {'numpy' if 'numpy' in outs else 'first'}| = "
                  f"{np.abs(out - ref).max():.2e}")
        fns = {name: (lambda i, f=f: f(batches[i % len(batches)], last_only)) for name, f in fwd.items()}
        times = interleaved_times(fns, args.runs, args.warmup)
        flops = config.forward_flops(args.batch, args.seq_len, last_only=last_only)
        for name, ts in times.items():
            t = median(ts)
            rows.append({"benchmark": "forward", "mode": mode, "backend": name, "preset": args.preset,
                         "batch": args.batch, "seq_len": args.seq_len, "median_s": t, "runs": ts,
                         "tokens_per_s": args.batch * args.seq_len / t, "gflop_per_s": flops / t / 1e9})
        if "hf" in times:
            for r in rows[-len(times):]:
                r["vs_hf"] = median(times["hf"]) / r["median_s"]

    print(f"\nforward, {args.preset}, B={args.batch}, T={args.seq_len}, fp32, median of {args.runs} "
          f"after {args.warmup} warm-up\n")
    print("| mode | backend | median s | tokens/s | GFLOP/s | vs HF |\n|---|---|---|---|---|---|")
    for r in rows:
        vs = f"{r['vs_hf']:.2f}x" if "vs_hf" in r else "-"
        print(f"| {r['mode']} | {r['backend']} | {r['median_s']:.4f} | {r['tokens_per_s']:,.0f} | "
              f"{r['gflop_per_s']:.1f} | {vs} |")
    append_jsonl(args.json, rows, env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
