"""Scoring: each token's log-probability under the model given its prefix, and the top-k alternatives.

`Backend.score(params, sequences, top_k=k)` returns one `Scores` per sequence. Position t holds
log p(tokens[t] | tokens[:t]) and the k most likely tokens there (sorted by log-probability, descending; ties
by lower id, as argmax breaks them); position 0 has no prefix (nan, ids -1). The last token is only predicted,
never fed, so a sequence may hold n_positions + 1 tokens: a full context window and its last target.

This module holds the validation, the batching (right-padded rows: causal attention never reads the padding
after a token, so no mask is needed) and the NumPy log-softmax every backend without its own uses; and
`GrowingScores`, the scores of a sequence that grows (a streamed completion's log-probabilities,
`Backend.open_scorer`), which asks its backend only for the positions it has not scored yet.
Legend: B rows, L inputs per row (a sequence's length - 1), V vocab, k top_k.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from gptjax.config import GPTConfig
from gptjax.errors import GptjaxError
from gptjax.generate import token_rows

MAX_SEQUENCES = 1024  # sequences per score call (the results hold T x (1 + 2k) numbers each)
MAX_TOP_K = 20  # alternatives per position (vLLM's default max_logprobs; OpenAI's completions allow 5)
TOKEN_BUDGET = 1024  # input tokens per forward pass (before padding to buckets): bounds the [B, L, V] logits


@dataclass(frozen=True)
class Scores:
    """One sequence's scores; arrays are [T] (and [T, k]) with row 0 empty (no prefix to predict it from)."""

    tokens: np.ndarray  # [T] int32
    logprobs: np.ndarray  # [T] float32: log p(tokens[t] | tokens[:t]); logprobs[0] = nan
    top_ids: np.ndarray  # [T, k] int32, most likely first, ties by lower id; row 0: -1
    top_logprobs: np.ndarray  # [T, k] float32, descending; row 0: nan

    def total(self, start: int = 1) -> float:
        """log p(tokens[start:] | tokens[:start]): the sum of logprobs[start:] (float64 sum); 0.0 when empty."""
        self._check_start(start)
        return float(self.logprobs[start:].astype(np.float64).sum())

    def greedy(self, start: int = 1) -> bool:
        """Whether every token from start is its position's argmax (what greedy decoding would produce); needs
        top_k >= 1. With total(start) this is lm-eval's loglikelihood answer for continuation tokens[start:]."""
        self._check_start(start)
        if self.top_ids.shape[1] < 1:
            raise GptjaxError("Scores.greedy needs the top alternatives: score with top_k >= 1")
        return bool((self.top_ids[start:, 0] == self.tokens[start:]).all())

    def _check_start(self, start: int) -> None:
        T = len(self.tokens)
        if isinstance(start, bool) or not isinstance(start, (int, np.integer)) or not 1 <= start <= T:
            raise GptjaxError(f"start={start!r} must be an integer in [1, {T}] (position 0 has no log-probability)")


def check_sequences(config: GPTConfig, sequences: object, top_k: object) -> list[tuple[int, ...]]:
    """The sequences of a score call as tuples of ids, or a GptjaxError naming the bad value."""
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or not 0 <= top_k <= MAX_TOP_K:
        raise GptjaxError(f"top_k={top_k!r} must be an integer in [0, {MAX_TOP_K}]")
    rows = token_rows(sequences, config.vocab_size, "sequence", MAX_SEQUENCES)
    limit = config.n_positions + 1
    for i, row in enumerate(rows):
        if len(row) > limit:
            raise GptjaxError(f"sequence {i} has {len(row)} tokens; at most n_positions + 1 = {limit} (the last "
                              f"token is only predicted)")
    return rows


def batches(lengths: Sequence[int], budget: int = TOKEN_BUDGET) -> Iterator[list[int]]:
    """Indices of the sequences each forward pass scores: in order, as many as fit `budget` input tokens
    (padded to the longest in the group; at least one sequence per pass)."""
    group: list[int] = []
    for i, n in enumerate(lengths):
        longest = max([lengths[j] for j in group] + [n]) - 1
        if group and longest * (len(group) + 1) > budget:
            yield group
            group = []
        group.append(i)
    if group:
        yield group


def right_pad(rows: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and targets [B, L] int32 of rows (row[:-1] and row[1:], zeros after), L = longest - 1 (>= 1)."""
    L = max(1, max(len(r) for r in rows) - 1)
    inputs, targets = np.zeros((len(rows), L), np.int32), np.zeros((len(rows), L), np.int32)
    for b, r in enumerate(rows):
        inputs[b, : len(r) - 1], targets[b, : len(r) - 1] = r[:-1], r[1:]
    return inputs, targets


def log_probs(logits: np.ndarray, targets: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """From logits [B, L, V]: log-softmax in float32, the targets' [B, L], the top-k [B, L, k] values and
    ids (descending, ties by lower id)."""
    x = logits.astype(np.float32)
    m = x.max(-1, keepdims=True)
    logp = x - (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))  # [B, L, V]
    chosen = np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    if top_k == 1:
        ids = logp.argmax(-1)[..., None].astype(np.int32)  # the first maximum: the lower id
    else:
        ids = np.argsort(-logp, axis=-1, kind="stable")[..., :top_k].astype(np.int32)  # stable: lower id first
    return chosen, np.take_along_axis(logp, ids, -1), ids


def assemble(row: Sequence[int], chosen: np.ndarray, top_values: np.ndarray, top_ids: np.ndarray) -> Scores:
    """A sequence's Scores from its rows of log_probs' outputs ([>= T-1] and [>= T-1, k]; padding ignored)."""
    T, k = len(row), top_ids.shape[-1]
    logprobs = np.full(T, math.nan, np.float32)
    ids, values = np.full((T, k), -1, np.int32), np.full((T, k), math.nan, np.float32)
    logprobs[1:], ids[1:], values[1:] = chosen[: T - 1], top_ids[: T - 1], top_values[: T - 1]
    return Scores(np.asarray(row, np.int32), logprobs, ids, values)


# feed(sequence, start) -> chosen [n], top values [n, k], top ids [n, k] of positions start + 1 .. len(sequence) - 1:
# what a backend computes for the inputs sequence[start:-1] (each given the ones before it) against sequence[start + 1:]
Feed = Callable[[list[int], int], tuple[np.ndarray, np.ndarray, np.ndarray]]


class GrowingScores:
    """The Scores of a sequence that grows: extend(tokens) appends tokens and scores only the new positions, so a
    stream of n tokens costs n positions in all, not one whole sequence per chunk. `fed` counts the positions
    the backend was asked for (each input token once: len(tokens) - 1 in all)."""

    def __init__(self, feed: Feed, top_k: int) -> None:
        self.feed, self.top_k = feed, top_k
        self.tokens: list[int] = []
        self.fed = 0
        self._parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def extend(self, tokens: Sequence[int]) -> Scores:
        """Append tokens; the Scores of the whole sequence so far (its new positions computed now)."""
        start = max(len(self.tokens) - 1, 0)  # the previous last token is now an input too
        self.tokens += [int(t) for t in tokens]
        if len(self.tokens) - 1 > start:
            self._parts.append(self.feed(self.tokens, start))
            self.fed += len(self.tokens) - 1 - start
        return self.scores()

    def scores(self) -> Scores:
        """The Scores of the sequence so far."""
        k = self.top_k
        parts = self._parts or [(np.zeros(0, np.float32), np.zeros((0, k), np.float32), np.zeros((0, k), np.int32))]
        return assemble(self.tokens, *(np.concatenate(a) for a in zip(*parts)))
