"""`gptjax eval`: validation loss, perplexity and bits per byte of a checkpoint (the split training uses)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from gptjax import data
from gptjax.cli.options import seq_len
from gptjax.config import GPTConfig
from gptjax.errors import GptjaxError
from gptjax.heldout import checkpoint_validation_tokens
from gptjax.weights import load_checkpoint

NAME = "eval"
HELP = "validation loss, perplexity and bits per byte of a checkpoint"
DESCRIPTION = ("Evaluate a checkpoint on the validation split of a corpus (the split `gptjax train` uses). Unset "
               "flags default to the settings of the run that exported the checkpoint (<run>/run.json next to "
               "<run>/model: its corpus, val_fraction, seq_len, batch_size and eval_batches), so the figure is the "
               "one training printed; for any other checkpoint to stdlib, 8, 50, 0.05 and the model's context.")


FALLBACK = {"data": None, "batch_size": 8, "max_batches": 50, "val_fraction": 0.05, "seq_len": None}
RUN_FILE = "run.json"  # what `gptjax train` saves next to its exported model (<run>/model)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of `gptjax eval`; unset ones take the training run's settings (see DESCRIPTION)."""
    p.add_argument("--checkpoint", required=True, metavar="DIR")
    p.add_argument("--data", metavar="SPEC", help="as for train (default: the run's corpus, else stdlib)")
    p.add_argument("--batch-size", type=int, metavar="B", help="default: the run's batch_size, else 8")
    p.add_argument("--max-batches", type=int, metavar="N", help="default: the run's eval_batches, else 50")
    p.add_argument("--val-fraction", type=float, help="default: the run's val_fraction, else 0.05")
    p.add_argument("--seq-len", type=int, metavar="T", help="window length (default: the run's seq_len, else the "
                   "model's context)")


def run(args: argparse.Namespace) -> int:
    """Print the checkpoint's validation loss (nats/token), perplexity and bits per byte."""
    # gptjax.train imports jax, flax and optax (seconds): only this command pays for them
    from gptjax.train import evaluate_params

    config, params = load_checkpoint(args.checkpoint)
    args = with_run_defaults(args)
    tokens, val_docs = validation_tokens(args, config)
    if args.batch_size < 1 or args.max_batches < 1:
        raise GptjaxError("--batch-size and --max-batches must be >= 1")
    T = seq_len(args.seq_len, config)
    loss, n = evaluate_params(config, params, data.eval_batches(tokens, args.batch_size, T, args.max_batches))
    print(f"validation: {n:,} tokens, loss {loss:.4f} nats/token, perplexity {math.exp(min(loss, 50)):.3f}, "
          f"{data.bits_per_byte(loss, len(tokens), data.corpus_bytes(val_docs)):.4f} bits/byte")
    return 0


def with_run_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """args with each unset flag filled from the training run that exported --checkpoint, else FALLBACK."""
    run_file = Path(args.checkpoint).resolve().parent / RUN_FILE
    settings = dict(FALLBACK)
    if Path(args.checkpoint).resolve().name == "model" and run_file.is_file():
        from gptjax.train import load_run_config

        _, tc, extra = load_run_config(run_file)
        settings = {"data": extra.get("data"), "batch_size": tc.batch_size, "max_batches": tc.eval_batches,
                    "val_fraction": tc.val_fraction, "seq_len": tc.seq_len}
    filled = {k: v if getattr(args, k, None) is None else getattr(args, k) for k, v in settings.items()}
    return argparse.Namespace(**(vars(args) | filled))


def validation_tokens(args: argparse.Namespace, config: GPTConfig) -> tuple:
    """The held-out tokens and documents of --checkpoint, --data and --val-fraction (shared with quantize)."""
    return checkpoint_validation_tokens(args.checkpoint, config, args.data, args.val_fraction)
