"""What the KV cache saves, picoGPT style: the NumPy backend's cached greedy decode against recomputing the
whole sequence for every new token (a full forward pass per token), at B=1, same tokens.

    gptjax bench --study kv-cache                         # gpt2 shape, random weights, prompt 32, 128 new tokens
    gptjax bench --study kv-cache --preset byte-small --new 64

Both produce the same greedy tokens (checked first, untimed); then the two are timed in turn (A B A B ...),
median of --runs.
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

from gptjax import get_backend, get_preset, init_params
from gptjax.bench.results import Outcome
from gptjax.errors import GptjaxError
from gptjax.sampling import GREEDY
from gptjax.timing import interleaved_times, median

# flag -> (default, help); the runner adds them (the type is the default's)
FLAGS = {"--preset": ("gpt2", "model shape, random weights"), "--prompt": (32, "prompt tokens"),
         "--new": (128, "new tokens"), "--runs": (1, "timed runs of each, interleaved")}


def prepare(args: argparse.Namespace) -> None:
    """Check that the prompt and the new tokens fit the context."""
    context = get_preset(args.preset).n_positions
    if min(args.prompt, args.new, args.runs) < 1 or args.prompt + args.new > context:
        raise GptjaxError(f"--prompt {args.prompt} + --new {args.new} must fit n_positions={context} "
                          f"(each, and --runs {args.runs}, >= 1)")


def run(args: argparse.Namespace, log: Any) -> Outcome:
    """Tokens/s of the cached decode and of the recompute, and their ratio."""
    config = get_preset(args.preset)
    backend = get_backend("numpy", config)
    weights = backend.prepare(init_params(config, seed=0))
    prompt = np.random.default_rng(0).integers(0, config.vocab_size, args.prompt).tolist()

    def cached(i: int) -> list[int]:
        return list(backend.generate(weights, [prompt], args.new, sampling=GREEDY).tokens[0])

    def recompute(i: int) -> list[int]:
        seq = list(prompt)
        for _ in range(args.new):
            seq.append(int(np.argmax(backend.forward(weights, [seq], last_only=True)[0])))  # [1, V] -> token
        return seq[len(prompt):]

    log(f"kv-cache: numpy, {args.preset}, prompt {args.prompt}, {args.new} new tokens ...")
    if cached(0) != recompute(0):
        raise GptjaxError("cached and recomputed greedy tokens differ")
    times = interleaved_times({"cache": cached, "recompute": recompute}, args.runs, warmup=0)
    cache_s, recompute_s = median(times["cache"]), median(times["recompute"])
    row = {"backend": "numpy", "preset": args.preset, "batch": 1, "prompt": args.prompt, "new": args.new,
           "same_tokens": True, "cache_tokens_per_s": args.new / cache_s,
           "recompute_tokens_per_s": args.new / recompute_s, "speedup": recompute_s / cache_s,
           "cache_times_s": times["cache"], "recompute_times_s": times["recompute"]}
    return Outcome([row], f"gptjax bench --study kv-cache: numpy backend, {args.preset}, B=1, prompt {args.prompt}, "
                   f"{args.new} new tokens, median of {args.runs}", table(row))


def table(r: dict[str, Any]) -> str:
    """The result in one sentence."""
    return (f"cache {r['cache_tokens_per_s']:.1f} tokens/s, no-cache recompute {r['recompute_tokens_per_s']:.1f} "
            f"tokens/s: {r['speedup']:.1f}x (same tokens)")
