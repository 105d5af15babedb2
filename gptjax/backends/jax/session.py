"""Continuous batching on the JAX backend: a decode loop whose rows (slots) change between chunks.

A session holds B slots over one KV cache of S entries. It starts like generate (a joined batch, prefilled
together), then between decode chunks a request may take a free slot: its prompt is prefilled alone (exactly
as a solo generate would) and its cache entries are copied in so that they end right before the cache index
the batch writes next; its pad, sampling settings, seed stream and start step are set for that row. Every row
thus reads only its own entries at its own positions and samples with its own key and step count, so it gets
the tokens its request gets alone. A row leaves when it finishes or is cancelled, freeing its slot. A request
fits while the cache has room for its budget after the current step (S is sized with headroom for that) and
its sampling mode is covered by the session's (greedy ⊂ sample ⊂ filter), and so are its logit adjustments: a
session started with a row that uses penalties or a logit bias carries them for every row (zero for rows without
them, which leaves their logits unchanged) and per-row token counts, and admitting a row installs its settings
and its own counts; a session without them (compiled as before they existed) does not admit such a row.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gptjax.backends.jax import decode as jax_decode
from gptjax.backends.jax import speculative
from gptjax.backends.jax.decode import bucket_length
from gptjax.generate import LENGTH, SAMPLING_MODES, STOP, GenerationRequest, join_requests, left_pad

Chunk = list[tuple[Any, list[int], "str | None"]]  # (owner, new tokens, finish reason) per occupied slot


def with_row(sampling: jax_decode.Sampling, row: int, one: jax_decode.Sampling) -> jax_decode.Sampling:
    """sampling with row set to a one-row request's settings (its stop tokens padded to the batch's width)."""
    width = sampling.stop.shape[1]
    stop = jnp.full((1, width), -1, jnp.int32).at[:, : one.stop.shape[1]].set(one.stop[:, :width])
    return jax_decode.Sampling(*(a if a is None else a.at[row].set(b[0])  # None: no adjustments
                                 for a, b in zip(sampling, one._replace(stop=stop))))


def session_mode(joined: GenerationRequest) -> str:
    """The sampling mode a session compiles for: its starting rows', at least "sample", so sampled rows may join."""
    return SAMPLING_MODES[max(1, SAMPLING_MODES.index(joined.mode))]


class _Slots(abc.ABC):
    """What both sessions share: slots holding opaque owners (None: free), the tokens each row has handed out,
    and reading a chunk's new tokens. A session sets mode, sampling and the loop state _stop_row ends a row of."""

    mode: str
    sampling: jax_decode.Sampling

    def _seat(self, owners: Sequence[Any], rows: int) -> None:
        """`rows` slots, the first held by owners."""
        self.owners: list[Any] = list(owners) + [None] * (rows - len(owners))
        self.sent = np.zeros(rows, int)

    @property
    def live(self) -> list[int]:
        """Occupied slots."""
        return [b for b, owner in enumerate(self.owners) if owner is not None]

    def first_chunk(self) -> Chunk:
        """The prefill's tokens of the starting rows."""
        return self._read()

    def cancel(self, owner: Any) -> None:
        """Free an owner's slot now (its row stops being decoded)."""
        row = self.owners.index(owner)
        self.owners[row] = None
        self._stop_row(row)

    @abc.abstractmethod
    def _stop_row(self, row: int) -> None:
        """Mark row done in the session's loop state."""

    @abc.abstractmethod
    def _read(self) -> Chunk:
        """The new tokens since the last read (via _chunk)."""

    def _may_join(self, request: GenerationRequest) -> bool:
        """What every session asks of a joining request: one row, a free slot, a sampling mode the session covers
        and no more stop tokens than it has room for."""
        return (request.batch == 1 and None in self.owners
                and SAMPLING_MODES.index(request.mode) <= SAMPLING_MODES.index(self.mode)
                and len(request.sampling.stop_tokens) <= self.sampling.stop.shape[1])

    def _admitted(self, new: Any, row: int, owner: Any) -> Chunk:
        """[(owner, the admitted row's prefill token, finish reason)] of a one-row prefill new placed in row (a row
        that finished there is freed)."""
        done, stopped, length, first = jax.device_get((new.done[0], new.stopped[0], new.lengths[0], new.out[0, 0]))
        self.sent[row] = int(length)
        if done:
            self.owners[row] = None
        return [(owner, [int(first)] if length else [], (STOP if stopped else LENGTH) if done else None)]

    def _chunk(self, out: np.ndarray, start: np.ndarray, lengths: np.ndarray, stopped: np.ndarray,
               done: np.ndarray) -> Chunk:
        """(owner, new tokens, finish reason) of each occupied slot, row b's tokens being out[b, start[b]:
        start[b] + lengths[b]]; a finished row's slot is freed."""
        chunks = []
        for b in self.live:
            new = out[b, start[b] + self.sent[b]: start[b] + lengths[b]].tolist()
            self.sent[b] = lengths[b]
            reason = (STOP if stopped[b] else LENGTH) if done[b] else None
            chunks.append((self.owners[b], new, reason))
            if reason:
                self.owners[b] = None
        return chunks


class DecodeSession(_Slots):
    """A running batch that requests join and leave between chunks. Slots hold opaque owners (e.g. jobs)."""

    draft: str | None = None  # no drafter (SpecSession's names its kind) ...
    k = proposed = accepted = 0  # ... so no draft tokens

    def __init__(self, backend: Any, weights: Any, requests: Sequence[GenerationRequest], owners: Sequence[Any],
                 slots: int, headroom: int) -> None:
        """Prefill `requests` (one owner per row) into a batch of at least `slots` rows whose cache leaves
        `headroom` steps beyond the longest budget for rows that join later."""
        joined = join_requests(requests)
        config = backend.config
        self.weights, self.config, self.kv_cache = weights, config, backend.kv_cache
        self.Tp = bucket_length(max(len(p) for p in joined.prompts), config.n_positions)
        self.S = self.Tp + bucket_length(joined.max_new_tokens + headroom, 2**31)
        self.mode = session_mode(joined)
        self.d, pad, self.sampling, _ = jax_decode.start(weights, joined, self.Tp, self.S, backend.mesh,
                                                         backend.kv_cache, rows=slots, mode=self.mode,
                                                         adjust=joined.adjusts)
        self.adjust = joined.adjusts  # the loop carries penalties, bias and token counts
        self.pad = np.asarray(pad).copy()
        self._seat(owners, self.d.last.shape[0])
        self.step = 1

    def fits(self, request: GenerationRequest) -> bool:
        """Whether a one-row request can join now (a free slot, cache room, a covered sampling mode)."""
        index = self.Tp + self.step - 1  # where the batch writes next
        n = len(request.prompts[0])
        return (self._may_join(request) and bucket_length(n, self.config.n_positions) <= index
                and self.step - 1 + request.max_new_tokens <= self.S - self.Tp
                and (self.adjust or not request.adjusts))

    def admit(self, request: GenerationRequest, owner: Any) -> Chunk:
        """Prefill a fitting one-row request alone and put it in a free slot; [(owner, first tokens, finish
        reason)]."""
        row, n = self.owners.index(None), len(request.prompts[0])
        Tp1 = bucket_length(n, self.config.n_positions)
        tokens, pad1 = left_pad(request.prompts, Tp1)
        w = self.weights
        one = jax_decode.Sampling.of(request, 1, self.config.vocab_size, adjust=self.adjust)
        new = jax_decode.prefill(w.graphdef, w.state, tokens, pad1, np.ones(1, bool), one, self.config,
                                 Tp1 + 8, request.mode, self.kv_cache, cpu_kernels=w.cpu_kernels)
        index = self.Tp + self.step - 1
        self.d = jax_decode.admit(self.d, new, np.int32(row), np.int32(index))
        self.sampling = with_row(self.sampling, row, one)
        self.pad[row], self.owners[row] = index - n, owner
        return self._admitted(new, row, owner)

    def run(self, chunk_size: int) -> Chunk:
        """Decode up to chunk_size steps; (owner, new tokens, finish reason) of each occupied slot (a finished
        one is freed)."""
        until = min(self.step + chunk_size, self.S - self.Tp)
        w = self.weights
        self.d = jax_decode.decode(w.graphdef, w.state, self.d, jnp.asarray(self.pad), self.sampling,
                                   np.int32(until), self.mode)
        return self._read()

    def _stop_row(self, row: int) -> None:
        self.d = self.d._replace(done=self.d.done.at[row].set(True))

    def _read(self) -> Chunk:
        step, done, stopped, lengths, start = jax.device_get((self.d.step, self.d.done, self.d.stopped,
                                                               self.d.lengths, self.d.start))
        self.step = int(step)
        return self._chunk(np.asarray(self.d.out), start, lengths, stopped, done)


class SpecSession(_Slots):
    """A running batch decoded speculatively (speculative.py) that requests join and leave between chunks.

    Every row has its own cache cursor, so a joining request is prefilled alone (target and draft model) and
    copied into a free slot at the cache indices it has alone (prompt from index 0, cursor after it); its
    rounds are counted from its admission, so a sampled row draws what it draws alone. Rows accept different
    numbers of tokens per round; a chunk is chunk_size rounds. Penalties and logit bias are not supported (the
    verify step scores the target's raw distribution): such a request never fits."""

    def __init__(self, backend: Any, weights: Any, requests: Sequence[GenerationRequest], owners: Sequence[Any],
                 slots: int, headroom: int, spec: Any) -> None:
        """Prefill `requests` (one owner per row) into at least `slots` rows whose caches leave room for
        `headroom` more tokens than the longest budget, for rows that join later."""
        joined = join_requests(requests)
        self.weights, self.config, self.kv_cache, self.spec = weights, backend.config, backend.kv_cache, spec
        self.Tp = bucket_length(max(len(p) for p in joined.prompts), self.config.n_positions)
        self.S = speculative.cache_length(self.Tp, joined.max_new_tokens + headroom, spec.k)
        self.mode = session_mode(joined)
        self.s, pad, self.sampling, _ = speculative.start(weights, joined, spec, self.kv_cache, self.Tp, self.S,
                                                          rows=slots, mode=self.mode)
        self.ngram = (spec.draft.max_ngram, spec.draft.min_ngram) if spec.weights is None else None
        self.pad = np.asarray(pad).copy()
        self._seat(owners, self.s.cursor.shape[0])
        self.step = 0  # verify rounds so far
        self.draft, self.k = spec.draft.kind, spec.k
        self.proposed = self.accepted = 0  # draft tokens over the session's life

    def fits(self, request: GenerationRequest) -> bool:
        """Whether a one-row request can join now (a free slot, cache room, a covered sampling mode, no
        penalties or bias)."""
        Tp1 = bucket_length(len(request.prompts[0]), self.config.n_positions)
        return (self._may_join(request) and speculative.cache_length(Tp1, request.max_new_tokens, self.k) <= self.S
                and not request.adjusts)

    def admit(self, request: GenerationRequest, owner: Any) -> Chunk:
        """Prefill a fitting one-row request alone and put it in a free slot; [(owner, first tokens, finish
        reason)]."""
        row, n = self.owners.index(None), len(request.prompts[0])
        Tp1 = bucket_length(n, self.config.n_positions)
        new, pad1, one, _ = speculative.start(self.weights, request, self.spec, self.kv_cache, Tp1, Tp1 + 1,
                                              mode=request.mode)
        self.s = speculative.admit(self.s, new, np.int32(row))
        self.sampling = with_row(self.sampling, row, one)
        self.pad[row], self.owners[row] = int(pad1[0]), owner
        return self._admitted(new, row, owner)

    def run(self, chunk_size: int) -> Chunk:
        """chunk_size speculative rounds; (owner, new tokens, finish reason) of each occupied slot (a finished one
        is freed). self.proposed/accepted then include the chunk's draft tokens."""
        w, d = self.weights, self.spec.weights
        self.s = speculative.speculate(w.graphdef, w.state, None if d is None else d.graphdef,
                                       None if d is None else d.state, self.s, jnp.asarray(self.pad), self.sampling,
                                       np.int32(self.step + chunk_size), self.k, self.mode, self.ngram)
        return self._read()

    def _stop_row(self, row: int) -> None:
        self.s = self.s._replace(done=self.s.done.at[row].set(True))

    def _read(self) -> Chunk:
        rounds, done, stopped, lengths, proposed, accepted = jax.device_get(
            (self.s.rounds, self.s.done, self.s.stopped, self.s.lengths, self.s.proposed, self.s.accepted))
        self.step, self.proposed, self.accepted = int(rounds), int(proposed.sum()), int(accepted.sum())
        return self._chunk(np.asarray(self.s.out), np.zeros_like(lengths), lengths, stopped, done)
