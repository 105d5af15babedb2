"""The held-out text of a checkpoint: the validation split `gptjax train` kept out of training, tokenised by the
checkpoint's own tokenizer. `gptjax eval`, `gptjax quantize --report` and the int4 study score a model on it."""

from __future__ import annotations

import os

import numpy as np

from gptjax import data
from gptjax.config import GPTConfig
from gptjax.errors import GptjaxError
from gptjax.tokenizer import checkpoint_tokenizer


def checkpoint_validation_tokens(checkpoint: str | os.PathLike, config: GPTConfig, corpus: str | None = None,
                                 val_fraction: float = 0.05) -> tuple[np.ndarray, list[data.Doc]]:
    """(tokens, documents) of corpus's validation split (as data.validation_tokens splits and joins it), in the
    checkpoint's tokenizer; a GptjaxError for a checkpoint text cannot go through or val_fraction outside (0, 1)."""
    tokenizer = checkpoint_tokenizer(checkpoint, config.vocab_size)
    if tokenizer is None:
        raise GptjaxError(f"{checkpoint} has no tokenizer files and a {config.vocab_size}-token vocabulary")
    if not 0 < val_fraction < 1:
        raise GptjaxError(f"val_fraction {val_fraction} must be in (0, 1)")
    return data.validation_tokens(corpus, tokenizer, val_fraction, config.vocab_size)


def validation_windows(checkpoint: str | os.PathLike, config: GPTConfig, count: int, corpus: str | None = None,
                       val_fraction: float = 0.05) -> np.ndarray:
    """The first `count` windows of the model's context + 1 tokens of that split, int32 [N, T+1]."""
    tokens, _ = checkpoint_validation_tokens(checkpoint, config, corpus, val_fraction)
    return data.eval_windows(tokens, config.n_positions, count)
