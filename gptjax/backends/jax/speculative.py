"""Speculative decoding on the JAX backend: one jitted `lax.while_loop` of rounds, no host round trip per token.

A round, for every row at once: the drafter proposes k tokens (a draft model decodes k steps over its own KV
cache, or prompt lookup matches n-grams in the row's token history), the target runs its last token and the k
proposals as k + 1 new positions over its KV cache in one forward pass, the acceptance rule of
gptjax.speculative keeps n <= k proposals plus one target token, and both caches "roll back" to the accepted
length by moving the row's cursor: entries past it are masked and overwritten by the next round.

Rows accept different counts, so each row has its own cursor (cache index of its last token): cache writes go
to each row's own index (KVCache.per_row), masks and positions are per row, and out/history are
written per row. The state after prefill: both caches hold the prompt; the target's first token is `last`,
at cache index Tp, not yet in either cache. A draft round starts by running the token before `last` and `last`
(two positions): so after a round that accepted all k proposals, the draft cache, which never ran the k-th,
gets it then; otherwise that entry is rewritten with the same values.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptjax.backends.jax import decode
from gptjax.backends.jax.decode import Sampling, bucket_length, filter_top_k_top_p
from gptjax.backends.jax.kv import KVCache, Masks
from gptjax.generate import LENGTH, STOP, GenerationRequest, StreamChunk, left_pad
from gptjax.speculative import NgramDraft, Speculation


class SpecState(NamedTuple):
    """What the speculative loop carries between rounds and chunks (donated on each call)."""

    cache: Any  # the target's KVCache [B, H, S, K] per layer
    draft: Any  # the draft model's KVCache, or None (n-gram drafter)
    hist: jax.Array  # [B, S] the token at each cache index: left-padded prompt, then generated tokens
    cursor: jax.Array  # [B] cache index of each row's last token (not yet in the caches)
    count: jax.Array  # [B] tokens sampled so far (a final stop token included)
    done: jax.Array  # [B] row finished (or a padding row)
    stopped: jax.Array  # [B] row finished on a stop token
    lengths: jax.Array  # [B] tokens kept in out
    out: jax.Array  # [B, N] generated tokens, N >= max_new_tokens + k + 1
    keys: jax.Array  # [B] per-row PRNG keys
    rounds: jax.Array  # () verify rounds so far
    proposed: jax.Array  # [B] draft tokens proposed to active rows
    accepted: jax.Array  # [B] draft tokens accepted into the output
    first_round: jax.Array  # [B] rounds before each row began: 0, or later for a row admitted into a session


def _masks(pad: jax.Array, first: jax.Array, T: int, S: int) -> Masks:
    """T new tokens per row at cache indices first[b]..: they read the row's entries before first (outside
    its padding) and each other causally."""
    s = jnp.arange(S)
    cache = (s < first[:, None, None]) & (s >= pad[:, None, None])  # [B, 1, S]
    return Masks(jnp.broadcast_to(cache, (pad.shape[0], T, S)), jnp.tril(jnp.ones((1, T, T), bool)))


def _positions(model: Any, first: jax.Array, T: int, pad: jax.Array) -> jax.Array:
    """Positions [B, T] of T tokens at cache indices first.., clipped to the table: a proposal beyond a row's
    budget may pass the context, and is never kept."""
    return jnp.minimum(first[:, None] + jnp.arange(T) - pad[:, None], model.wpe[...].shape[0] - 1)


def step_all(model: Any, tokens: jax.Array, positions: jax.Array, masks: Masks, cache: KVCache, start: jax.Array
             ) -> tuple[jax.Array, KVCache]:
    """GPT.step returning the logits of every new position [B, T, V] (verification scores all k + 1)."""
    x = model.wte(tokens) + model.positions(model.wpe[...], positions)  # [B, T] -> [B, T, D]
    layers = []
    for block, layer in zip(model.layers(), cache.layers):
        x, layer = block.cached(x, masks, layer, start)  # [B, T, D]; cache [B, H, S, K]
        layers.append(layer)
    return model.logits(x), KVCache(tuple(layers))


def probs(logits: jax.Array, sampling: Sampling, mode: str) -> jax.Array:
    """The distribution [B, ..., V] each row samples from (temperature, then top-k/top-p), as decode.sample."""
    shape = logits.shape
    x = logits.reshape(shape[0], -1, shape[-1])  # [B, T, V]
    x = x - x.max(-1, keepdims=True)
    x = x / jnp.where(sampling.temperature > 0, sampling.temperature, 1.0)[:, None, None]
    if mode == "filter":
        T = x.shape[1]
        x = filter_top_k_top_p(x.reshape(-1, shape[-1]), jnp.repeat(sampling.top_k, T),
                               jnp.repeat(sampling.top_p, T)).reshape(x.shape)
    return jax.nn.softmax(x, axis=-1).reshape(shape)


def draw(p: jax.Array, keys: jax.Array) -> jax.Array:
    """One token per row [B] from distributions p [B, V] (one uniform against the cumulative distribution)."""
    cdf = jnp.cumsum(p, axis=-1)
    u = jax.vmap(jax.random.uniform)(keys) * cdf[:, -1]
    return jnp.minimum((cdf <= u[:, None]).sum(-1), p.shape[-1] - 1).astype(jnp.int32)


def _propose(logits: jax.Array, sampling: Sampling, keys: jax.Array, mode: str) -> tuple[jax.Array, Any]:
    """A draft token per row [B] from the draft's logits [B, V] and the distribution q [B, V] it came from
    (argmax for greedy rows; q is None when every row is greedy)."""
    best = jnp.argmax(logits, -1).astype(jnp.int32)
    if mode == "greedy":
        return best, None
    q = probs(logits, sampling, mode)
    return jnp.where(sampling.temperature > 0, draw(q, keys), best), q


def draft_model(model: Any, s: SpecState, pad: jax.Array, sampling: Sampling, keys: jax.Array, k: int, mode: str
                ) -> tuple[jax.Array, Any, KVCache]:
    """k proposals [B, k] from the draft model, their distributions [B, k, V] (None if greedy) and its cache."""
    rows, c, S = jnp.arange(pad.shape[0]), s.cursor, s.hist.shape[1]
    step_keys = jax.vmap(lambda key: jax.random.split(key, k))(keys)  # [B, k]
    tokens = jnp.stack([s.hist[rows, c - 1], s.hist[rows, c]], 1)  # [B, 2]: the token before last, and last
    logits, cache = model.step(tokens, _positions(model, c - 1, 2, pad), _masks(pad, c - 1, 2, S), s.draft, c - 1)
    d, q = _propose(logits, sampling, step_keys[:, 0], mode)

    def one(carry: tuple, i: jax.Array) -> tuple[tuple, tuple]:
        d, cache = carry
        index = c + i  # cache index of proposal i (1-based), run to get proposal i + 1
        logits, cache = model.step(d[:, None], _positions(model, index, 1, pad), _masks(pad, index, 1, S), cache,
                                   index)
        d, q = _propose(logits, sampling, step_keys[:, i], mode)
        return (d, cache), (d, q)

    (_, cache), (ds, qs) = jax.lax.scan(one, (d, cache), jnp.arange(1, k))  # [k-1, B], [k-1, B, V]
    drafts = jnp.concatenate([d[:, None], ds.T], 1)  # [B, k]
    q = None if q is None else jnp.concatenate([q[:, None], qs.transpose(1, 0, 2)], 1)  # [B, k, V]
    return drafts, q, cache


def draft_ngram(hist: jax.Array, cursor: jax.Array, pad: jax.Array, k: int, max_ngram: int, min_ngram: int
                ) -> jax.Array:
    """k proposals per row [B, k] by prompt lookup (gptjax.speculative.ngram_proposal, on device): the
    continuation of the most recent earlier match of the row's last n tokens, longest n first; else last."""
    B, S = hist.shape
    rows, c, j = jnp.arange(B), cursor, jnp.arange(S)
    shifted = [jnp.roll(hist, -t, axis=1) for t in range(max_ngram)]  # shifted[t][b, j] = hist[b, j + t]
    start, length = jnp.full(B, -1), jnp.zeros(B, jnp.int32)
    for n in range(min_ngram, max_ngram + 1):  # a longer match found later wins
        match = (j[None] >= pad[:, None]) & (j[None] <= (c - n)[:, None]) & (c - n + 1 >= pad)[:, None]
        for t in range(n):
            match &= shifted[t] == hist[rows, c - n + 1 + t][:, None]
        last = jnp.max(jnp.where(match, j[None], -1), axis=1)  # [B] most recent start, -1 if none
        start, length = jnp.where(last >= 0, last, start), jnp.where(last >= 0, n, length)
    proposals = []
    for t in range(k):
        at = start + length + t  # reading on into the proposals once past the last token
        from_hist = hist[rows, jnp.minimum(at, S - 1)]
        from_prop = jnp.stack(proposals, 1)[rows, jnp.clip(at - c - 1, 0, t - 1)] if t else from_hist
        proposals.append(jnp.where(start < 0, hist[rows, c], jnp.where(at <= c, from_hist, from_prop)))
    return jnp.stack(proposals, 1).astype(jnp.int32)


def accept(logits: jax.Array, drafts: jax.Array, q: Any, sampling: Sampling, keys: jax.Array, mode: str
           ) -> tuple[jax.Array, jax.Array]:
    """How many proposals each row accepts n [B] and the token it adds after them [B] (gptjax.speculative's
    rule). logits [B, k+1, V] are the target's; q [B, k, V] the draft's distributions (None: one-hot)."""
    B, k = drafts.shape
    rows = jnp.arange(B)
    best = jnp.argmax(logits, -1).astype(jnp.int32)  # [B, k+1]
    ok = drafts == best[:, :k]  # greedy rule
    if mode == "greedy":
        n = jnp.cumprod(ok, axis=1).sum(1)
        return n, best[rows, n]
    V = logits.shape[-1]
    p = probs(logits, sampling, mode)  # [B, k+1, V]
    q = jax.nn.one_hot(drafts, V) if q is None else q  # [B, k, V]
    split = jax.vmap(jax.random.split)(keys)  # [B, 2]
    u_keys, r_keys = split[:, 0], split[:, 1]
    u = jax.vmap(lambda key: jax.random.uniform(key, (k,)))(u_keys)  # [B, k]
    pd, qd = (jnp.take_along_axis(a[:, :k], drafts[..., None], -1)[..., 0] for a in (p, q))  # [B, k]
    greedy = sampling.temperature == 0
    ok = jnp.where(greedy[:, None], ok, u * qd < pd)  # accept with min(1, p/q)
    n = jnp.cumprod(ok, axis=1).sum(1)  # [B] leading acceptances
    p_n = p[rows, n]  # [B, V]
    q_n = jnp.concatenate([q, jnp.zeros((B, 1, V), q.dtype)], 1)[rows, n]  # past the last proposal: q = 0
    residual = jnp.maximum(p_n - q_n, 0)
    residual = jnp.where(residual.sum(-1, keepdims=True) > 0, residual, p_n)  # 0 only where p == q
    return n, jnp.where(greedy, best[rows, n], draw(residual, r_keys))


def advance(s: SpecState, drafts: jax.Array, n: jax.Array, final: jax.Array, sampling: Sampling) -> SpecState:
    """Record each active row's n accepted proposals and final token (stop tokens and budgets as decode's
    _record, token by token) and move its cursor past them: the caches' rollback."""
    k = drafts.shape[1]
    t = jnp.arange(k + 1)
    emitted = jnp.where(t < n[:, None], jnp.concatenate([drafts, final[:, None]], 1), final[:, None])  # [B, k+1]
    active = ~s.done
    m = jnp.minimum(n + 1, sampling.max_new - s.count)  # tokens this round may add before the budget ends
    is_stop = (emitted[..., None] == sampling.stop[:, None]).any(-1) & (t < m[:, None])  # [B, k+1]
    has_stop = is_stop.any(-1)
    first_stop = jnp.argmax(is_stop, -1)
    kept = jnp.where(has_stop, first_stop, m)
    count = s.count + jnp.where(has_stop, first_stop + 1, m)

    def put(buf: jax.Array, at: jax.Array) -> jax.Array:  # emitted into each active row of buf at its index
        written = jax.vmap(lambda row, i, e: jax.lax.dynamic_update_slice_in_dim(row, e, i, 0))(buf, at, emitted)
        return jnp.where(active[:, None], written, buf)

    return s._replace(
        hist=put(s.hist, s.cursor + 1), out=put(s.out, s.lengths), cursor=jnp.where(active, s.cursor + n + 1, s.cursor),
        count=jnp.where(active, count, s.count), lengths=jnp.where(active, s.lengths + kept, s.lengths),
        stopped=s.stopped | (active & has_stop), done=s.done | (active & (has_stop | (count >= sampling.max_new))),
        rounds=s.rounds + 1, proposed=s.proposed + jnp.where(active, k, 0),
        accepted=s.accepted + jnp.where(active, jnp.minimum(n, kept), 0))


@partial(jax.jit, static_argnames=("graphdef", "draft_graphdef", "k", "mode", "ngram"), donate_argnames=("s",))
def speculate(graphdef: Any, state: Any, draft_graphdef: Any, draft_state: Any, s: SpecState, pad: jax.Array,
              sampling: Sampling, until: jax.Array, k: int, mode: str, ngram: tuple[int, int] | None) -> SpecState:
    """Speculative rounds (draft k, verify k + 1, accept, roll back) inside one while_loop, until
    s.rounds == until or every row is done. ngram = (max_ngram, min_ngram) selects prompt lookup."""
    with jax.default_matmul_precision("float32"):
        model = nnx.merge(graphdef, state)
        drafter = None if ngram else nnx.merge(draft_graphdef, draft_state)
        S = s.hist.shape[1]

        def body(s: SpecState) -> SpecState:
            # a row's round r (its own count, from its first_round) draws from fold_in(row key, r + 1), prefill
            # having drawn from fold_in(row key, 0): so a row admitted into a session samples as it would alone
            keys = jax.vmap(jax.random.fold_in)(s.keys, s.rounds + 1 - s.first_round)
            split = jax.vmap(jax.random.split)(keys)  # [B, 2]
            draft_keys, accept_keys = split[:, 0], split[:, 1]
            if ngram:
                drafts, q, draft_cache = draft_ngram(s.hist, s.cursor, pad, k, *ngram), None, None
            else:
                drafts, q, draft_cache = draft_model(drafter, s, pad, sampling, draft_keys, k, mode)
            rows = jnp.arange(pad.shape[0])
            tokens = jnp.concatenate([s.hist[rows, s.cursor][:, None], drafts], 1)  # [B, k+1]: last, proposals
            logits, cache = step_all(model, tokens, _positions(model, s.cursor, k + 1, pad),
                                     _masks(pad, s.cursor, k + 1, S), s.cache, s.cursor)  # [B, k+1, V]
            n, final = accept(logits, drafts, q, sampling, accept_keys, mode)
            return advance(s._replace(cache=cache, draft=draft_cache), drafts, n, final, sampling)

        return jax.lax.while_loop(lambda s: (s.rounds < until) & ~jnp.all(s.done), body, s)


def start(weights: Any, request: GenerationRequest, spec: Speculation, kv_cache: str, Tp: int, S: int,
          rows: int | None = None, mode: str | None = None) -> tuple[SpecState, jax.Array, Sampling, str]:
    """Prefill the target (its first token) and the draft model (its cache only) into caches of S entries,
    prompts padded to Tp; rows and mode as decode.start's (a session's batch bucket and covering mode)."""
    d, pad, sampling, mode = decode.start(weights, request, Tp, S, None, kv_cache, rows=rows, mode=mode)
    B = d.last.shape[0]
    tokens, _ = left_pad(request.prompts, Tp, rows=B)
    draft = None
    if spec.weights is not None:
        w = spec.weights
        valid = np.arange(B) < request.batch
        draft = decode.prefill(w.graphdef, w.state, tokens, pad, valid, sampling, w.config, S, "greedy",
                               spec.kv_cache, None, w.cpu_kernels).cache.per_row()
    hist = jnp.zeros((B, S), jnp.int32).at[:, :Tp].set(tokens).at[:, Tp].set(d.last)
    zeros = [jnp.zeros(B, jnp.int32) for _ in range(3)]  # three buffers: the loop donates each
    s = SpecState(d.cache.per_row(), draft, hist, jnp.full(B, Tp, jnp.int32), jnp.ones(B, jnp.int32), d.done,
                  d.stopped, d.lengths, d.out, d.keys, jnp.int32(0), *zeros)
    return s, pad, sampling, mode


def cache_length(Tp: int, max_new_tokens: int, k: int) -> int:
    """Cache entries for prompts padded to Tp and a budget of max_new_tokens: room for a round's k + 1 entries
    past the last kept token (a row's last round starts at most at Tp + max_new_tokens - 2)."""
    return Tp + bucket_length(max_new_tokens + k + 1, 2**31)


@partial(jax.jit, donate_argnames=("s",))
def admit(s: SpecState, new: SpecState, row: jax.Array) -> SpecState:
    """Put a one-row start `new` (prompt bucket Tp1, first token at cache index Tp1) into slot `row` of a running
    session: its cache entries, token history and cursor at the same indices as alone (the slot's older entries
    past them are never read: masks stop at the cursor), its key, and first_round = now, so its rounds draw
    as they would alone. The draft counters are kept (their sums only grow)."""
    Tp1 = new.hist.shape[1] - new.out.shape[1]  # the new row's prompt bucket (static)

    def put(big: jax.Array, small: jax.Array) -> jax.Array:  # [B, H, S, ...] <- [1, H, Tp1, ...] (values, scales)
        at = (row, 0, 0) + (0,) * (big.ndim - 3)
        return jax.lax.dynamic_update_slice(big, small[:, :, :Tp1].astype(big.dtype), at)

    def one(a: jax.Array, b: jax.Array) -> jax.Array:
        return a.at[row].set(b[0])

    hist = one(s.hist, jnp.zeros_like(s.hist[:1]).at[:, :Tp1 + 1].set(new.hist[:, :Tp1 + 1]))
    return s._replace(cache=jax.tree.map(put, s.cache, new.cache),
                      draft=None if s.draft is None else jax.tree.map(put, s.draft, new.draft), hist=hist,
                      cursor=one(s.cursor, new.cursor), count=one(s.count, new.count), done=one(s.done, new.done),
                      stopped=one(s.stopped, new.stopped), lengths=one(s.lengths, new.lengths),
                      out=jax.lax.dynamic_update_slice(s.out, new.out[:, :1], (row, 0)), keys=one(s.keys, new.keys),
                      first_round=s.first_round.at[row].set(s.rounds))


def stream(weights: Any, request: GenerationRequest, chunk_size: int | None, spec: Speculation, kv_cache: str
           ) -> Iterator[StreamChunk]:
    """Prefill (its token is the first chunk), then the speculative loop: to the end, or chunk_size rounds per
    chunk. Chunks carry the proposed and accepted draft tokens of their rounds."""
    Tp = bucket_length(max(len(p) for p in request.prompts), weights.config.n_positions)
    s, pad, sampling, mode = start(weights, request, spec, kv_cache, Tp, cache_length(Tp, request.max_new_tokens,
                                                                                     spec.k))
    ngram = (spec.draft.max_ngram, spec.draft.min_ngram) if isinstance(spec.draft, NgramDraft) else None
    w = spec.weights
    sent, seen, phase = np.zeros(request.batch, int), (0, 0), "prefill"
    while True:
        if phase == "decode":
            until = request.max_new_tokens if chunk_size is None else int(s.rounds) + chunk_size
            s = speculate(weights.graphdef, weights.state, None if w is None else w.graphdef,
                          None if w is None else w.state, s, pad, sampling, np.int32(until), spec.k, mode, ngram)
        done, stopped, lengths, proposed, accepted = jax.device_get((s.done, s.stopped, s.lengths, s.proposed,
                                                                     s.accepted))
        out = np.asarray(s.out[: request.batch, : lengths.max(initial=0)])
        chunk = [out[b, sent[b]: lengths[b]].tolist() for b in range(request.batch)]
        sent = lengths[: request.batch].copy()
        reasons = [(STOP if stopped[b] else LENGTH) if done[b] else None for b in range(request.batch)]
        totals = (int(proposed.sum()), int(accepted.sum()))
        yield StreamChunk(chunk, reasons, phase, totals[0] - seen[0], totals[1] - seen[1])
        seen = totals
        if done[: request.batch].all():
            return
        phase = "decode"


def compile_count() -> int:
    """Compilations so far of the speculative loop."""
    return speculate._cache_size()
