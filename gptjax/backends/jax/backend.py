"""The JAX backend: the NNX GPT under jax.jit behind gptjax's Backend interface (forward, generate, stream).

Converting params is convert.py's; the jitted decode loop is decode.py's; continuous batching (a decode loop
that rows join and leave) is session.py's.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptjax.backends.base import PRECISION_OPTIONS, Backend
from gptjax.backends.jax import decode, scorer, session, speculative
from gptjax.backends.jax.convert import JaxWeights, jax_weights
from gptjax.backends.jax.decode import bucket_length
from gptjax.backends.jax.session import DecodeSession, SpecSession
from gptjax.config import GPTConfig
from gptjax.errors import GptjaxError
from gptjax.generate import LENGTH, STOP, GenerationRequest, StreamChunk
from gptjax.scoring import GrowingScores, check_sequences
from gptjax.sharding import check_config, mesh_description, shard_batch
from gptjax.weights import Params


@partial(jax.jit, static_argnames=("graphdef", "last_only"))
def _apply(graphdef: Any, state: Any, tokens: jax.Array, last_index: jax.Array, last_only: bool) -> jax.Array:
    with jax.default_matmul_precision("float32"):  # true fp32 dots on GPU/TPU too (no TF32/bf16 passes)
        model = nnx.merge(graphdef, state)
        return model(tokens, last_index if last_only else None)


@partial(jax.jit, static_argnames=("graphdef", "top_k"))
def _log_probs(graphdef: Any, state: Any, inputs: jax.Array, targets: jax.Array, top_k: int
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Log-softmax (float32) of the logits of inputs [B, L]: at targets [B, L], and the top_k [B, L, k] values
    and ids (descending; lax.top_k puts the lower id first among equals)."""
    with jax.default_matmul_precision("float32"):
        logits = nnx.merge(graphdef, state)(inputs)  # [B, L, V]
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    chosen = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]  # [B, L]
    if top_k == 0:
        return chosen, jnp.zeros((*chosen.shape, 0), jnp.float32), jnp.zeros((*chosen.shape, 0), jnp.int32)
    values, ids = jax.lax.top_k(logp, top_k)  # [B, L, k]
    return chosen, values, ids.astype(jnp.int32)


class JaxBackend(Backend):
    """Flax NNX GPT-2 under jax.jit; sequence lengths are padded to buckets (causal: padding is invisible).

    Option mesh (from gptjax.sharding.make_mesh): weights are placed by their logical axes (tensor parallel
    over heads/MLP/vocab, FSDP over the width), batches over (data, fsdp), the KV cache over heads."""

    name = "jax"
    prepared_type = JaxWeights
    options = {"mesh": (), **PRECISION_OPTIONS}

    def __init__(self, config: GPTConfig, *, metrics: Any = None, trace_sync: bool = True, **options: Any) -> None:
        super().__init__(config, metrics=metrics, trace_sync=trace_sync, **options)
        self.mesh = options.get("mesh")
        if self.mesh is not None:
            check_config(config, self.mesh)

    @property
    def supports_sessions(self) -> bool:
        """Decode sessions are built for one device: with a mesh the server batches dynamically."""
        return self.mesh is None

    def open_session(self, weights: JaxWeights, requests: Any, owners: Any, *, slots: int, headroom: int | None,
                     speculation: Any = None) -> DecodeSession | SpecSession:
        """A DecodeSession, or with a speculation a SpecSession (continuous batching; see Backend.open_session)."""
        if not self.supports_sessions:
            raise GptjaxError("decode sessions (continuous batching) need the jax backend without a mesh")
        if speculation is not None:
            return SpecSession(self, weights, requests, owners, slots, headroom, speculation)
        return DecodeSession(self, weights, requests, owners, slots=slots, headroom=headroom)

    def open_scorer(self, params: Params | Any, *, top_k: int = 0) -> GrowingScores:
        """Backend.open_scorer over a KV cache of its own (scorer.py): each token runs through the model once."""
        check_sequences(self.config, [[0]], top_k)
        if self.mesh is not None:  # the cache is built for one device
            return super().open_scorer(params, top_k=top_k)
        return GrowingScores(scorer.CachedFeed(self._prepared(params), self.observer, int(top_k)), int(top_k))

    def _place_batch(self, tokens: np.ndarray) -> Any:
        if self.mesh is None:
            return tokens
        return shard_batch(tokens, self.mesh)

    def compile_count(self) -> int:
        """Compilations so far of the jitted forward, scoring, prefill, decode, session and speculative functions."""
        return (_apply._cache_size() + _log_probs._cache_size() + decode.compile_count() + session.compile_count()
                + speculative.compile_count() + scorer.compile_count())

    def placement(self) -> tuple[int, str]:
        """Every JAX device, and the mesh's description ("" without one)."""
        return jax.device_count(), mesh_description(self.mesh)

    def _convert(self, params: Params) -> JaxWeights:
        return jax_weights(self.config, params, self.precision, self.mesh)

    def _generate(self, weights: JaxWeights, request: GenerationRequest, chunk_size: int | None
                  ) -> Iterator[StreamChunk]:
        """Prefill (its token is the first chunk), then the jitted decode loop: once to the end, or chunk_size
        steps per yielded chunk."""
        Tp = bucket_length(max(len(p) for p in request.prompts), self.config.n_positions)
        S = Tp + bucket_length(request.max_new_tokens, 2**31)
        d, pad, sampling, mode = decode.start(weights, request, Tp, S, self.mesh, self.kv_cache)
        max_new, sent = np.int32(request.max_new_tokens), np.zeros(request.batch, int)
        step, phase = 1, "prefill"  # the first chunk is prefill's token; then chunk_size decode steps each
        while True:
            if phase == "decode":
                until = request.max_new_tokens if chunk_size is None else min(step + chunk_size, max_new)
                d = decode.decode(weights.graphdef, weights.state, d, pad, sampling, np.int32(until), mode)
            step, done, stopped, lengths = jax.device_get((d.step, d.done, d.stopped, d.lengths))
            first = sent.min()
            out = np.asarray(d.out[: request.batch, first: lengths.max(initial=0)])
            chunk = [out[b, sent[b] - first: lengths[b] - first].tolist() for b in range(request.batch)]
            sent = lengths[: request.batch].copy()
            reasons = [(STOP if stopped[b] else LENGTH) if done[b] else None for b in range(request.batch)]
            yield StreamChunk(chunk, reasons, phase)
            if done[: request.batch].all():
                return
            phase = "decode"

    def _speculate(self, weights: JaxWeights, request: GenerationRequest, chunk_size: int | None, spec: Any
                   ) -> Iterator[StreamChunk]:
        """Speculative decoding in one jitted loop (speculative.py); one device, no mesh."""
        if self.mesh is not None:
            raise GptjaxError("speculative decoding (draft=...) runs on one device: use the jax backend without a mesh")
        return speculative.stream(weights, request, chunk_size, spec, self.kv_cache)

    def _forward(self, weights: JaxWeights, tokens: np.ndarray, last_only: bool) -> np.ndarray:
        B, T = tokens.shape
        padded = np.zeros((B, bucket_length(T, self.config.n_positions)), np.int32)
        padded[:, :T] = tokens
        logits = _apply(weights.graphdef, weights.state, self._place_batch(padded), np.int32(T - 1), last_only)
        return np.asarray(logits if last_only else logits[:, :T])

    def _score(self, weights: JaxWeights, inputs: np.ndarray, targets: np.ndarray, top_k: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Backend._score on device: the batch padded to a power of two (a multiple of the mesh's batch axes),
        the length to bucket_length, so that a mixed workload compiles rarely; only [B, L, k] comes back."""
        B, L = inputs.shape
        rows = decode.batch_bucket(B)
        if self.mesh is not None:
            per = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
            rows = -(-rows // per) * per
        padded = np.zeros((2, rows, bucket_length(L, self.config.n_positions)), np.int32)
        padded[0, :B, :L], padded[1, :B, :L] = inputs, targets
        out = _log_probs(weights.graphdef, weights.state, self._place_batch(padded[0]), padded[1], top_k)
        chosen, values, ids = jax.device_get(out)
        return chosen[:B, :L], values[:B, :L], ids[:B, :L]
