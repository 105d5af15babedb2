"""`gptjax eval`: validation loss, perplexity and bits per byte of a checkpoint (the split training uses)."""

from __future__ import annotations

import argparse
import math

from gptjax import data
from gptjax.cli.options import seq_len
from gptjax.config import GPTConfig
from gptjax.errors import GptjaxError
from gptjax.tokenizer import checkpoint_tokenizer
from gptjax.weights import load_checkpoint

NAME = "eval"
HELP = "validation loss, perplexity and bits per byte of a checkpoint"
DESCRIPTION = "Evaluate a checkpoint on the validation split of a corpus (the split `gptjax train` uses)."


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of `gptjax eval`."""
    p.add_argument("--checkpoint", required=True, metavar="DIR")
    p.add_argument("--data", metavar="SPEC", help="as for train (default stdlib)")
    p.add_argument("--batch-size", type=int, default=8, metavar="B")
    p.add_argument("--max-batches", type=int, default=50, metavar="N")
    p.add_argument("--val-fraction", type=float, default=0.05, help="as the run used (default 0.05)")
    p.add_argument("--seq-len", type=int, metavar="T", help="window length (default: the model's context; use "
                   "the run's seq_len to reproduce its validation figure)")


def run(args: argparse.Namespace) -> int:
    """Print the checkpoint's validation loss (nats/token), perplexity and bits per byte."""
    # gptjax.train imports jax, flax and optax (seconds): only this command pays for them
    from gptjax.train import evaluate_params

    config, params = load_checkpoint(args.checkpoint)
    tokens, val_docs = validation_tokens(args, config)
    if args.batch_size < 1 or args.max_batches < 1:
        raise GptjaxError("--batch-size and --max-batches must be >= 1")
    T = seq_len(args.seq_len, config)
    loss, n = evaluate_params(config, params, data.eval_batches(tokens, args.batch_size, T, args.max_batches))
    print(f"validation: {n:,} tokens, loss {loss:.4f} nats/token, perplexity {math.exp(min(loss, 50)):.3f}, "
          f"{data.bits_per_byte(loss, len(tokens), data.corpus_bytes(val_docs)):.4f} bits/byte")
    return 0


def validation_tokens(args: argparse.Namespace, config: GPTConfig) -> tuple:
    """data.validation_tokens for --checkpoint's tokenizer, --data and --val-fraction (shared with quantize)."""
    tokenizer = checkpoint_tokenizer(args.checkpoint, config.vocab_size)
    if tokenizer is None:
        raise GptjaxError(f"{args.checkpoint} has no tokenizer files and a {config.vocab_size}-token vocabulary")
    if not 0 < args.val_fraction < 1:
        raise GptjaxError(f"--val-fraction {args.val_fraction} must be in (0, 1)")
    return data.validation_tokens(args.data, tokenizer, args.val_fraction, config.vocab_size)
