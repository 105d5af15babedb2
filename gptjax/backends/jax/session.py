"""Continuous batching on the JAX backend: a decode loop whose rows (slots) change between chunks.

A session holds B slots over one KV cache of S entries. It starts empty (every slot free) and admits its first
requests as it admits later ones: between decode chunks a request may take a free slot: its prompt is prefilled
alone (exactly as a solo generate would) and its cache entries are copied in so that they end right before the
cache index the batch writes next; its pad, sampling settings, seed stream and start step are set for that row.
Every row thus reads only its own entries at its own positions and samples with its own key and step count, so it
gets the tokens its request gets alone. A row leaves when it finishes or is cancelled, freeing its slot. A request
fits while the cache has room for its budget after the current step and its sampling mode is covered by the
session's (greedy ⊂ sample ⊂ filter), and so are its logit adjustments: a session that carries them does so for
every row (zero for rows without them, which leaves their logits unchanged) and per-row token counts, and admitting
a row installs its settings and its own counts; a session without them does not admit such a row.

A session's compiled shapes are its `Shape`. With a headroom (a number of steps) they fit its first requests, as
before servers bounded their programs. Without one (headroom None: what `gptjax serve` opens) they depend on the
row count alone: the cache holds any prompt bucket and then any budget, the mode is "filter" and the adjustments
are on (decode.sample runs only the parts a batch's rows need), so every request fits an empty session and the
programs a server can reach are few and known in advance (gptjax.serve.warmup compiles them all).
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gptjax.backends.jax import decode as jax_decode
from gptjax.backends.jax import speculative
from gptjax.backends.jax.decode import batch_bucket, bucket_length
from gptjax.backends.jax.kv import KVCache
from gptjax.config import GPTConfig
from gptjax.generate import LENGTH, SAMPLING_MODES, STOP, GenerationRequest, join_requests, left_pad

Chunk = list[tuple[Any, list[int], "str | None"]]  # (owner, new tokens, finish reason) per occupied slot


@dataclass(frozen=True)
class Shape:
    """What a session's programs are compiled for: rows B, cache entries S (out holds S tokens per row too),
    sampling mode, logit adjustments on or off, stop tokens per row."""

    rows: int
    cache: int
    mode: str
    adjust: bool
    stops: int


def session_shape(config: GPTConfig, joined: GenerationRequest, slots: int, headroom: int | None,
                  k: int | None = None) -> Shape:
    """The shape of a session starting with joined's rows in at least `slots` rows (k: a speculative one's draft
    tokens per round). headroom: steps beyond the longest budget for rows joining later; None: room for any
    request (the longest prompt bucket, then the whole context) and every sampling setting."""
    rows, stops = batch_bucket(max(slots, joined.batch)), stop_width(joined)
    if headroom is None:
        Tp, budget = prompt_buckets(config)[-1], config.n_positions
        mode, adjust = "filter", k is None
    else:
        Tp, budget = bucket_length(max(len(p) for p in joined.prompts), config.n_positions), joined.max_new_tokens
        budget, mode, adjust = budget + headroom, session_mode(joined), joined.adjusts
    S = Tp + bucket_length(budget, 2**31) if k is None else speculative.cache_length(Tp, budget, k)
    return Shape(rows, S, mode, adjust, stops)


def prompt_buckets(config: GPTConfig) -> list[int]:
    """Every prompt bucket a generation can have (prompts of 1 to n_positions - 1 tokens), shortest first."""
    return sorted({bucket_length(n, config.n_positions) for n in range(1, max(2, config.n_positions))})


def stop_width(joined: GenerationRequest) -> int:
    """Stop tokens per row: the rows' most, rounded up to 8 (at least 8: a server's requests have at most 4)."""
    return -(-max([1] + [len(joined.row(b).sampling.stop_tokens) for b in range(joined.batch)]) // 8) * 8


def one_row(joined: GenerationRequest, b: int) -> GenerationRequest:
    """Row b of a joined request as a request of its own (its settings and random stream kept)."""
    row = joined.row(b)
    return GenerationRequest((joined.prompts[b],), row.max_new_tokens, row.sampling, (row,))


@jax.jit
def with_row(sampling: jax_decode.Sampling, row: jax.Array, one: jax_decode.Sampling) -> jax_decode.Sampling:
    """sampling with row set to a one-row request's settings (its stop tokens padded to the batch's width)."""
    width = sampling.stop.shape[1]
    stop = jnp.full((1, width), -1, jnp.int32).at[:, : one.stop.shape[1]].set(one.stop[:, :width])
    return jax_decode.Sampling(*(a if a is None else a.at[row].set(b[0])  # None: no adjustments
                                 for a, b in zip(sampling, one._replace(stop=stop))))


def session_mode(joined: GenerationRequest) -> str:
    """The sampling mode a session compiles for: its starting rows', at least "sample", so sampled rows may join."""
    return SAMPLING_MODES[max(1, SAMPLING_MODES.index(joined.mode))]


@partial(jax.jit, static_argnames=("config", "draft", "rows", "S", "kv", "kernels"))
def empty_spec(config: GPTConfig, draft: tuple[GPTConfig, str, bool] | None, rows: int, S: int, kv: str,
               kernels: bool) -> speculative.SpecState:
    """A speculative state of `rows` free slots over empty caches of S entries (the draft model's: its config,
    KV storage and kernels, or None for prompt lookup); cursors at 1 so a free row's reads stay in bounds."""
    def cache(c: GPTConfig, kv: str, kernels: bool) -> KVCache:
        return KVCache.zeros(c, rows, S, kv, kernels).per_row()

    z = [jnp.zeros(rows, jnp.int32) for _ in range(5)]  # separate buffers: the loop donates each
    return speculative.SpecState(cache(config, kv, kernels), None if draft is None else cache(*draft),
                                 jnp.zeros((rows, S), jnp.int32), jnp.ones(rows, jnp.int32), z[0],
                                 jnp.ones(rows, bool), jnp.zeros(rows, bool), z[1], jnp.zeros((rows, S), jnp.int32),
                                 jax.vmap(jax.random.key)(jnp.zeros(rows, jnp.uint32)), jnp.int32(0), *z[2:])


def compile_count() -> int:
    """Compilations so far of this module's jitted functions and of the admission copies it runs."""
    return with_row._cache_size() + empty_spec._cache_size() + speculative.admit._cache_size()


class _Slots(abc.ABC):
    """What both sessions share: slots holding opaque owners (None: free), the tokens each row has handed out,
    admitting the first requests, and reading a chunk's new tokens. A session sets mode, sampling and the loop
    state _stop_row ends a row of."""

    mode: str
    sampling: jax_decode.Sampling
    config: GPTConfig

    def _seat(self, rows: int) -> None:
        """`rows` free slots."""
        self.owners: list[Any] = [None] * rows
        self.sent = np.zeros(rows, int)
        self.pad = np.zeros(rows, np.int32)

    def _admit_all(self, joined: GenerationRequest, owners: Sequence[Any]) -> None:
        """Admit joined's rows (one owner each), in order: their first tokens are the first chunk."""
        self._first: Chunk = []
        for b, owner in enumerate(owners):
            self._first += self.admit(one_row(joined, b), owner)

    @property
    def prompt_lengths(self) -> list[int]:
        """A prompt length per prompt bucket a request may have, shortest first: admitting one of each runs every
        admission program of the session's shape (what a server's warm-up does)."""
        n = self.config.n_positions
        return [min(b, n - 1) for b in prompt_buckets(self.config)]

    @property
    def live(self) -> list[int]:
        """Occupied slots."""
        return [b for b, owner in enumerate(self.owners) if owner is not None]

    def first_chunk(self) -> Chunk:
        """The prefill's tokens of the starting rows."""
        first, self._first = self._first, []
        return first

    def cancel(self, owner: Any) -> None:
        """Free an owner's slot now (its row stops being decoded)."""
        row = self.owners.index(owner)
        self.owners[row] = None
        self._stop_row(row)

    @abc.abstractmethod
    def admit(self, request: GenerationRequest, owner: Any) -> Chunk:
        """Prefill a fitting one-row request alone into a free slot."""

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
        done, stopped, lengths, out = jax.device_get((new.done, new.stopped, new.lengths, new.out))
        self.sent[row] = int(lengths[0])
        if done[0]:
            self.owners[row] = None
        return [(owner, [int(out[0, 0])] if lengths[0] else [], (STOP if stopped[0] else LENGTH) if done[0] else None)]

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
                 slots: int, headroom: int | None) -> None:
        """Admit `requests` (one owner per row) into an empty batch of at least `slots` rows whose cache leaves
        `headroom` steps beyond the longest budget for rows that join later (None: any request; see Shape)."""
        joined = join_requests(requests)
        config = backend.config
        self.weights, self.config, self.kv_cache = weights, config, backend.kv_cache
        shape = session_shape(config, joined, slots, headroom)
        self.S, self.mode, self.adjust = shape.cache, shape.mode, shape.adjust
        # step 1 writes at cache index Tp: every starting prompt (its bucket) fits before it
        self.Tp = max(bucket_length(len(p), config.n_positions) for p in joined.prompts)
        self.d = jax_decode.empty(config, shape.rows, shape.cache, shape.cache, self.kv_cache, weights.cpu_kernels,
                                  shape.adjust, np.int32(self.Tp))
        self.sampling = jax_decode.Sampling.of_rows([], shape.rows, config.vocab_size, shape.adjust, shape.stops)
        self._seat(shape.rows)
        self.step = 1
        self._admit_all(joined, owners)

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
                                 Tp1 + 8, self.mode, self.kv_cache, cpu_kernels=w.cpu_kernels)
        index = self.Tp + self.step - 1
        self.d = jax_decode.admit(self.d, new, np.int32(row), np.int32(index))
        self.sampling = with_row(self.sampling, np.int32(row), one)
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
        self.d = jax_decode.stop_row(self.d, np.int32(row))

    def _read(self) -> Chunk:
        step, done, stopped, lengths, start = jax.device_get((self.d.step, self.d.done, self.d.stopped,
                                                               self.d.lengths, self.d.start))
        self.step = int(step)
        return self._chunk(np.asarray(self.d.out), start, lengths, stopped, done)


class SpecSession(_Slots):
    """A running batch decoded speculatively (speculative.py) that requests join and leave between chunks.

    Every row has its own cache cursor, so a request is prefilled alone (target and draft model) and copied into
    a free slot at the cache indices it has alone (prompt from index 0, cursor after it); its rounds are counted
    from its admission, so a sampled row draws what it draws alone. Rows accept different numbers of tokens per
    round; a chunk is chunk_size rounds. Penalties and logit bias are not supported (the verify step scores the
    target's raw distribution): such a request never fits."""

    def __init__(self, backend: Any, weights: Any, requests: Sequence[GenerationRequest], owners: Sequence[Any],
                 slots: int, headroom: int | None, spec: Any) -> None:
        """Admit `requests` (one owner per row) into an empty batch of at least `slots` rows whose caches leave
        room for `headroom` more tokens than the longest budget, for rows that join later (None: any request)."""
        joined = join_requests(requests)
        self.weights, self.config, self.kv_cache, self.spec = weights, backend.config, backend.kv_cache, spec
        shape = session_shape(self.config, joined, slots, headroom, spec.k)
        self.S, self.mode = shape.cache, shape.mode
        self.Tp = max(bucket_length(len(p), self.config.n_positions) for p in joined.prompts)  # for reports
        d = spec.weights
        self.s = empty_spec(self.config, None if d is None else (d.config, spec.kv_cache, d.cpu_kernels), shape.rows,
                            shape.cache, self.kv_cache, weights.cpu_kernels)
        self.sampling = jax_decode.Sampling.of_rows([], shape.rows, self.config.vocab_size, False, shape.stops)
        self.ngram = (spec.draft.max_ngram, spec.draft.min_ngram) if spec.weights is None else None
        self._seat(shape.rows)
        self.step = 0  # verify rounds so far
        self.draft, self.k = spec.draft.kind, spec.k
        self.proposed = self.accepted = 0  # draft tokens over the session's life
        self._admit_all(joined, owners)

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
                                              mode=self.mode)
        self.s = speculative.admit(self.s, new, np.int32(row))
        self.sampling = with_row(self.sampling, np.int32(row), one)
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
        self.s = jax_decode.stop_row(self.s, np.int32(row))

    def _read(self) -> Chunk:
        rounds, done, stopped, lengths, proposed, accepted = jax.device_get(
            (self.s.rounds, self.s.done, self.s.stopped, self.s.lengths, self.s.proposed, self.s.accepted))
        self.step, self.proposed, self.accepted = int(rounds), int(proposed.sum()), int(accepted.sum())
        return self._chunk(np.asarray(self.s.out), np.zeros_like(lengths), lengths, stopped, done)
