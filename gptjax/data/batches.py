"""Batches: seeded random training windows whose generator state is checkpointed, the fixed evaluation windows
that tile the validation tokens, and the metrics a loss is reported in (bits per byte, the unigram baseline)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator

import numpy as np

from gptjax.data.corpora import SEPARATOR, Doc, resolve_corpus, split_docs
from gptjax.errors import GptjaxError
from gptjax.tokenizer import Tokenizer


def _check_window(n_tokens: int, T: int) -> None:
    """Raise unless a context window of T+1 tokens fits in n_tokens."""
    if T < 1:
        raise GptjaxError(f"context length T must be >= 1, got {T}")
    if n_tokens < T + 1:
        raise GptjaxError(f"corpus has {n_tokens} tokens, shorter than one context window of T+1 = {T + 1} "
                          "tokens; use more text or a smaller context length")


def shard(batch: np.ndarray, process_index: int, process_count: int) -> np.ndarray:
    """Rows [i*B/n, (i+1)*B/n) of a global [B, ...] batch: process i's share under data parallelism."""
    B = batch.shape[0]
    if process_count < 1 or not 0 <= process_index < process_count:
        raise GptjaxError(f"process_index must be in [0, {process_count}) with process_count >= 1, "
                          f"got {process_index} of {process_count}")
    if B % process_count:
        raise GptjaxError(f"batch size {B} is not divisible by process_count {process_count}")
    rows = B // process_count
    return batch[process_index * rows:(process_index + 1) * rows]


class Batcher:
    """Random windows [B, T+1] from a token array with a seeded PCG64; inputs [:, :-1], targets [:, 1:].

    Every process draws the same global batch and keeps its shard, so the generator state is the same
    everywhere and get_state()/set_state() resume the exact sequence of batches.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, context: int, seed: int = 0,
                 process_index: int = 0, process_count: int = 1) -> None:
        _check_window(len(tokens), context)
        if batch_size < 1:
            raise GptjaxError(f"batch size must be >= 1, got {batch_size}")
        shard(np.empty((batch_size, 0)), process_index, process_count)  # validates the sharding up front
        self.tokens, self.B, self.T = tokens, batch_size, context
        self.process_index, self.process_count = process_index, process_count
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self.batches_drawn = 0

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        return self

    def __next__(self) -> tuple[np.ndarray, np.ndarray]:
        """This process's (inputs, targets), each int32 [B/n, T]."""
        starts = self.rng.integers(0, len(self.tokens) - self.T, size=self.B)  # [B]
        windows = np.asarray(self.tokens[starts[:, None] + np.arange(self.T + 1)], np.int32)  # [B, T+1]
        windows = shard(windows, self.process_index, self.process_count)  # [B/n, T+1]
        self.batches_drawn += 1
        return windows[:, :-1], windows[:, 1:]

    def get_state(self) -> dict:
        """JSON-able generator state (big integers as strings, so any JSON reader keeps them exact)."""
        return {"bit_generator": json.dumps(self.rng.bit_generator.state), "batches_drawn": self.batches_drawn}

    def set_state(self, state: dict) -> None:
        """Restore a get_state() dict: the next batches are exactly those that followed it."""
        try:
            bg = json.loads(state["bit_generator"])
            self.rng.bit_generator.state = bg
            self.batches_drawn = int(state["batches_drawn"])
        except (KeyError, TypeError, ValueError) as e:
            raise GptjaxError(f"not a Batcher state (expected keys 'bit_generator', 'batches_drawn' of a "
                              f"PCG64 generator): {e}") from None


def eval_batches(tokens: np.ndarray, batch_size: int, context: int,
                 max_batches: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Fixed (inputs, targets) batches tiling tokens with windows at stride T (each token a target once).
    Only full [B, T] batches, except one smaller batch when fewer than B windows exist."""
    _check_window(len(tokens), context)
    if batch_size < 1:
        raise GptjaxError(f"batch size must be >= 1, got {batch_size}")
    T, n_windows = context, (len(tokens) - 1) // context
    n_batches = max(n_windows // batch_size, 1)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    for b in range(n_batches):
        starts = np.arange(b * batch_size, min((b + 1) * batch_size, n_windows)) * T  # [B]
        windows = np.asarray(tokens[starts[:, None] + np.arange(T + 1)], np.int32)  # [B, T+1]
        yield windows[:, :-1], windows[:, 1:]


def validation_tokens(spec: str | None, tokenizer: Tokenizer, val_fraction: float, vocab_size: int
                      ) -> tuple[np.ndarray, list[Doc]]:
    """The validation split of corpus `spec` (as resolve_corpus reads it, split as training splits it),
    tokenised and joined as training joins documents, and its documents; a GptjaxError when the tokenizer
    yields ids outside the model's vocabulary."""
    _, val_docs = split_docs(resolve_corpus(spec), val_fraction)
    separator = tokenizer.encode(SEPARATOR)
    tokens = np.asarray([i for n, (_, text) in enumerate(val_docs) for i in (separator if n else []) +
                         tokenizer.encode(text)], np.int64)
    if tokens.max(initial=0) >= vocab_size:
        raise GptjaxError(f"the tokenizer produced id {tokens.max()} >= the model's vocab_size {vocab_size}")
    return tokens, val_docs


def eval_windows(tokens: np.ndarray, context: int, count: int) -> np.ndarray:
    """The first `count` windows of context + 1 tokens that eval_batches tiles (inputs plus the last target),
    int32 [N, T+1]."""
    batches = list(eval_batches(tokens, 8, context, -(-count // 8)))
    if not batches:
        raise GptjaxError(f"the validation split has fewer than {context + 1} tokens")
    return np.concatenate([np.concatenate([x, y[:, -1:]], 1) for x, y in batches])[:count]


# ---------------------------------------------------------------- metrics


def bits_per_byte(loss_nats_per_token: float, n_tokens: int, n_bytes: int) -> float:
    """Tokenizer-independent loss: nats/token × tokens / (bytes × ln 2)."""
    if n_bytes <= 0 or n_tokens < 0:
        raise GptjaxError(f"bits_per_byte needs n_bytes > 0 and n_tokens >= 0, got {n_bytes} and {n_tokens}")
    return loss_nats_per_token * n_tokens / (n_bytes * math.log(2))


def unigram_entropy(tokens: np.ndarray) -> float:
    """Entropy (nats/token) of the token frequencies: the loss of a model that ignores context."""
    if len(tokens) == 0:
        raise GptjaxError("unigram entropy of an empty token array is undefined")
    p = np.bincount(np.asarray(tokens)) / len(tokens)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())
