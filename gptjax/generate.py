"""The backend-agnostic half of generation: request validation, left-padded ragged batches, results, and
the reference (NumPy) implementation of the sampling rules every backend follows.

Sampling, per row and step: first the logits are adjusted as OpenAI documents it, where c[j] counts token j among
the tokens this row has generated so far (not its prompt, as vLLM counts):
    logits[j] -= c[j] * frequency_penalty + (c[j] > 0) * presence_penalty;  logits[j] += logit_bias[j]
(skipped when a row sets none of them). Then greedy (argmax) when `greedy` or temperature == 0; otherwise
logits / temperature, then top-k (keep the k largest; ties with the k-th are kept), then top-p on what remains
(keep the smallest prefix of tokens sorted by probability whose mass reaches p; the most likely token always
stays), then one draw from the renormalised distribution. A stop token ends its row and is not part of the output.

Ragged batches are left-padded to a common length Tp: row b's prompt of n_b tokens sits at cache indices
[Tp - n_b, Tp), its positions count from 0 there, and its queries never read the padding. Decode step i
writes every row at cache index Tp + i, so one cache write serves the whole batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from gptjax.config import GPTConfig
from gptjax.checks import is_int
from gptjax.errors import GptjaxError
from gptjax.sampling import SamplingParams

STOP, LENGTH = "stop", "length"
SAMPLING_MODES = ("greedy", "sample", "filter")  # GenerationRequest.mode's values; each covers the ones before it


@dataclass(frozen=True)
class RowSettings:
    """One row's sampling, token budget and random stream: its draws use fold_in(key(sampling.seed), key_index)
    (NumPy: default_rng([seed, key_index]))."""

    sampling: SamplingParams
    max_new_tokens: int
    key_index: int


@dataclass(frozen=True)
class GenerationRequest:
    """A validated batch: prompts (ragged), how many tokens to add at most, and how to sample them.

    `rows` is set only for a batch joined from separate requests (`join_requests`): then each row has its
    own settings, and max_new_tokens / sampling are the largest budget / the first row's (for reporting)."""

    prompts: tuple[tuple[int, ...], ...]
    max_new_tokens: int
    sampling: SamplingParams
    rows: tuple[RowSettings, ...] | None = None

    @property
    def batch(self) -> int:
        """Number of rows."""
        return len(self.prompts)

    def row(self, b: int) -> RowSettings:
        """Row b's settings: its own in a joined batch, else the request's with random stream b."""
        return self.rows[b] if self.rows is not None else RowSettings(self.sampling, self.max_new_tokens, b)

    @property
    def mode(self) -> str:
        """The sampling mode a batch needs (one of SAMPLING_MODES): "greedy" (every row argmax), "filter" (some
        row uses top-k/top-p) or "sample"."""
        rows = [self.row(b).sampling for b in range(self.batch)]
        return "greedy" if all(r.is_greedy for r in rows) else "filter" if any(r.filters for r in rows) else "sample"

    @property
    def adjusts(self) -> bool:
        """Whether some row uses penalties or a logit bias (then backends count each row's tokens)."""
        return any(self.row(b).sampling.adjusts for b in range(self.batch))


def join_requests(requests: Sequence[GenerationRequest]) -> GenerationRequest:
    """One batch of the rows of several validated requests, each row keeping its request's settings and random
    stream, so it gets the same tokens as when its request runs alone (what a server's batcher needs)."""
    if not requests or not all(isinstance(r, GenerationRequest) for r in requests):
        raise GptjaxError("join_requests needs a non-empty list of GenerationRequests (from make_request)")
    rows = tuple(r.row(b) for r in requests for b in range(r.batch))
    return GenerationRequest(tuple(p for r in requests for p in r.prompts), max(r.max_new_tokens for r in rows),
                             requests[0].sampling, rows)


@dataclass
class StreamChunk:
    """Tokens produced since the previous chunk, per row, and each row's finish reason once it is known.
    The first chunk of a stream is the prefill's token ("prefill"), the others come from decode steps."""

    tokens: list[list[int]]
    finish_reasons: list[str | None]
    phase: str = "decode"
    proposed: int = 0  # speculative decoding: draft tokens proposed and accepted in this chunk (all rows)
    accepted: int = 0


@dataclass
class GenerationResult:
    """Each row's generated tokens (prompt excluded, stop token excluded) and why it stopped."""

    tokens: list[list[int]]
    finish_reasons: list[str]
    prompt_lengths: list[int] = field(default_factory=list)
    proposed: int = 0  # speculative decoding: draft tokens proposed and accepted (all rows)
    accepted: int = 0


def make_request(config: GPTConfig, prompts: object, max_new_tokens: object,
                 sampling: SamplingParams | None = None) -> GenerationRequest:
    """Check a generate call's prompts and token budget, and its sampling settings against the vocabulary; name
    the first bad value with its allowed range. `sampling` None is SamplingParams()."""
    sampling = SamplingParams() if sampling is None else sampling
    if not isinstance(sampling, SamplingParams):
        raise GptjaxError(f"sampling must be a gptjax.SamplingParams, got {type(sampling).__name__}")
    V = config.vocab_size
    rows = token_rows(prompts, V, "prompt")
    if not is_int(max_new_tokens) or max_new_tokens < 1:
        raise GptjaxError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 1")
    longest = max(len(r) for r in rows)
    if longest + max_new_tokens > config.n_positions:
        raise GptjaxError(f"prompt length {longest} + max_new_tokens {max_new_tokens} = "
                          f"{longest + max_new_tokens} exceeds the context n_positions={config.n_positions}")
    sampling.check_vocab(V)
    return GenerationRequest(tuple(rows), int(max_new_tokens), sampling)


def token_rows(rows: object, V: int, what: str, max_rows: int | None = None) -> list[tuple[int, ...]]:
    """A non-empty ragged list of non-empty token-id lists (a 1-D or 2-D array too) as tuples, or a
    GptjaxError naming the bad row or id (`what` names a row: "prompt", "sequence"); at most max_rows rows."""
    if isinstance(rows, np.ndarray):
        rows = rows.tolist() if rows.ndim == 2 else [rows.tolist()] if rows.ndim == 1 else rows
    if isinstance(rows, (str, bytes)) or not isinstance(rows, Sequence) or not rows:
        raise GptjaxError(f"{what}s must be a non-empty list of token-id lists")
    if max_rows is not None and len(rows) > max_rows:
        raise GptjaxError(f"{len(rows)} {what}s; at most {max_rows}")
    out = []
    for i, row in enumerate(rows):
        ids = _token_list(row, V, f"{what} {i}")
        if not ids:
            raise GptjaxError(f"{what} {i} is empty; every {what} needs at least one token")
        out.append(tuple(ids))
    return out


def _token_list(ids: object, V: int, what: str) -> list[int]:
    if isinstance(ids, np.ndarray):
        ids = ids.tolist()
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
        raise GptjaxError(f"{what} must be a list of token ids, got {type(ids).__name__}")
    out = list(ids)
    for t in out:
        if not is_int(t):
            raise GptjaxError(f"{what}: token {t!r} is not an integer")
        if not 0 <= t < V:
            raise GptjaxError(f"{what}: token id {t} is outside [0, {V})")
    return [int(t) for t in out]


def left_pad(prompts: Sequence[Sequence[int]], length: int, rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Right-align prompts in an int32 [rows, length] array (zeros before); return it and the pad per row.
    Extra rows (rows > len(prompts)) hold a single token 0 and are padding for batch buckets."""
    rows = rows or len(prompts)
    tokens = np.zeros((rows, length), np.int32)
    pad = np.full(rows, length - 1, np.int32)
    for b, p in enumerate(prompts):
        tokens[b, length - len(p):] = p
        pad[b] = length - len(p)
    return tokens, pad


def collect(chunks: Iterator[StreamChunk], request: GenerationRequest) -> GenerationResult:
    """Concatenate a stream into the result generate() returns."""
    tokens: list[list[int]] = [[] for _ in request.prompts]
    reasons: list[str | None] = [None] * request.batch
    proposed = accepted = 0
    for chunk in chunks:
        for row, new in enumerate(chunk.tokens):
            tokens[row].extend(new)
        reasons = [r or c for r, c in zip(reasons, chunk.finish_reasons)]
        proposed, accepted = proposed + chunk.proposed, accepted + chunk.accepted
    return GenerationResult(tokens, [r or LENGTH for r in reasons], [len(p) for p in request.prompts], proposed,
                            accepted)


# ---- the reference sampler (NumPy); the JAX backend implements the same rules on device ------------------
def filter_logits(logits: np.ndarray, top_k: int | None, top_p: float | None) -> np.ndarray:
    """Set logits [V] outside the top-k, then outside the top-p nucleus, to -inf."""
    x = logits.copy()
    ranked = np.sort(x)[::-1]  # [V], descending
    if top_k is not None:
        x[x < ranked[top_k - 1]] = -np.inf
        ranked[top_k:] = -np.inf
    if top_p is not None and top_p < 1:
        probs = np.exp(ranked - ranked[0])
        probs /= probs.sum()
        keep = np.cumsum(probs) - probs < top_p  # mass before this token is still short of p
        x[x < ranked[keep.sum() - 1]] = -np.inf
    return x


def adjust_logits(logits: np.ndarray, sampling: SamplingParams, counts: np.ndarray) -> np.ndarray:
    """Float32 logits [V] after the penalties and logit bias of the rules above, given counts [V] of the tokens
    the row has generated (the JAX backend computes the same float32 expression on device)."""
    c = counts.astype(np.float32)
    penalty = c * np.float32(sampling.frequency_penalty) + (c > 0).astype(np.float32) * np.float32(
        sampling.presence_penalty)
    return logits.astype(np.float32) - penalty + bias_row(sampling, len(logits))


def bias_row(sampling: SamplingParams, V: int) -> np.ndarray:
    """A row's logit bias as a dense float32 [V] (zeros where none)."""
    row = np.zeros(V, np.float32)
    for token, bias in sampling.logit_bias:
        row[token] = bias
    return row


def sample_token(logits: np.ndarray, sampling: SamplingParams, rng: np.random.Generator,
                 counts: np.ndarray | None = None) -> int:
    """One token from float logits [V] under the sampling rules above; counts [V]: the row's generated tokens
    (needed when the row adjusts its logits)."""
    if sampling.adjusts:
        logits = adjust_logits(logits, sampling, np.zeros(len(logits), np.int32) if counts is None else counts)
    if sampling.is_greedy:
        return int(np.argmax(logits))
    x = filter_logits(logits.astype(np.float64) / sampling.temperature, sampling.top_k, sampling.top_p)
    probs = np.exp(x - x.max())
    return int(rng.choice(len(probs), p=probs / probs.sum()))
