"""`gptjax demo`: a random model on the NumPy and JAX backends, their agreement and speed."""

from __future__ import annotations

import argparse
import time

import numpy as np

from gptjax.backends import get_backend
from gptjax.config import get_preset
from gptjax.errors import GptjaxError
from gptjax.sizes import size_table
from gptjax.weights import init_params

NAME = "demo"
HELP = "run a random model on the NumPy and JAX backends and compare logits"
DESCRIPTION = ("Initialise a model with GPT-2's scheme, run one forward pass on both backends, and print their "
               "agreement and speed.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of `gptjax demo`."""
    p.add_argument("--preset", default="byte-mini", help="model shape (default byte-mini)")
    p.add_argument("--batch", type=int, default=2, metavar="B", help="batch size (default 2)")
    p.add_argument("--seq-len", type=int, default=128, metavar="T", help="tokens per row (default 128)")
    p.add_argument("--seed", type=int, default=0, help="seed for weights and tokens (default 0)")


def run(args: argparse.Namespace) -> int:
    """Run both backends twice (first call, then steady) and compare their logits; 1 when they disagree."""
    config = get_preset(args.preset)
    if not 1 <= args.batch <= 64:
        raise GptjaxError(f"--batch {args.batch} must be in [1, 64]")
    if not 1 <= args.seq_len <= config.n_positions:
        raise GptjaxError(f"--seq-len {args.seq_len} must be in [1, {config.n_positions}] for {args.preset}")
    print(size_table([(args.preset, config)], args.seq_len), end="\n\n")
    params = init_params(config, args.seed)
    tokens = np.random.default_rng(args.seed).integers(0, config.vocab_size, (args.batch, args.seq_len))
    logits = {}
    for name in ("numpy", "jax"):
        backend = get_backend(name, config)
        t0 = time.perf_counter()
        backend.forward(params, tokens)  # first call: converts weights (and compiles, for jax)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        logits[name] = backend.forward(params, tokens)
        steady = time.perf_counter() - t0
        print(f"{name:>5} backend: logits {logits[name].shape}, first call {first:.3f} s, "
              f"then {steady:.3f} s ({tokens.size / steady:,.0f} tokens/s)")
    diff = np.abs(logits["numpy"] - logits["jax"])
    agree = (logits["numpy"].argmax(-1) == logits["jax"].argmax(-1)).mean()
    print(f"max |numpy - jax| = {diff.max():.2e} (mean {diff.mean():.2e}); "
          f"argmax agreement {agree:.1%} over {tokens.size} positions")
    return 0 if diff.max() <= 1e-4 else 1
