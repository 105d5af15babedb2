"""Speculative decoding, backend-agnostic half: the drafters, their checks, and the reference (NumPy) rules.

A drafter proposes k tokens per row; the target scores all k + 1 positions in one forward pass and keeps the
longest prefix it agrees with plus one token of its own, so one target pass yields 1..k+1 tokens.

- `ModelDraft(params, config, precision)`: a second, smaller GPT with the same vocabulary proposes by decoding
  k tokens with its own KV cache (any precision mode).
- `NgramDraft(max_ngram, min_ngram)`: prompt lookup, no model (HF `prompt_lookup_num_tokens`, vLLM's ngram
  speculator): the last max_ngram..min_ngram tokens are looked up in the row's context (prompt and generated
  tokens); the continuation of their most recent earlier occurrence is the proposal (longest n first).

The acceptance rule keeps the target's output exactly (Leviathan et al. 2023, Chen et al. 2023): greedy rows
accept a draft token while it equals the target's argmax and then add the target's argmax; sampled rows accept
draft token d (drawn from the draft's distribution q) with probability min(1, p(d)/q(d)), p being the target's
distribution under the row's sampling settings, and on the first rejection draw from max(0, p - q)
renormalised; if all k are accepted they draw one more from p. An n-gram proposal is a point mass: q is one-hot.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from gptjax.config import GPTConfig
from gptjax.errors import GptjaxError
from gptjax.generate import filter_logits
from gptjax.precision import MODES
from gptjax.sampling import SamplingParams
from gptjax.timing import interleaved_runs, median, timed_value

MAX_SPECULATIVE_TOKENS = 16  # k beyond this only wastes target work: acceptance decays geometrically with k


@dataclass(frozen=True, eq=False)
class ModelDraft:
    """A draft model: canonical params of `config` (same vocabulary as the target), run in `precision`."""

    params: Any
    config: GPTConfig
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if not isinstance(self.config, GPTConfig):
            raise GptjaxError(f"ModelDraft config must be a GPTConfig, got {type(self.config).__name__}")
        if self.precision not in MODES:
            raise GptjaxError(f"ModelDraft precision={self.precision!r}; allowed: {list(MODES)}")

    @property
    def kind(self) -> str:
        """How metrics and spans name this drafter."""
        return "model"


@dataclass(frozen=True)
class NgramDraft:
    """Prompt lookup: propose the continuation of the most recent earlier match of the last n tokens,
    n = max_ngram down to min_ngram; with no match, the last token repeated."""

    max_ngram: int = 3
    min_ngram: int = 1

    def __post_init__(self) -> None:
        for name in ("max_ngram", "min_ngram"):
            value = getattr(self, name)
            if not _is_int(value) or not 1 <= value <= 16:
                raise GptjaxError(f"NgramDraft {name}={value!r} must be an integer in [1, 16]")
        if self.min_ngram > self.max_ngram:
            raise GptjaxError(f"NgramDraft min_ngram={self.min_ngram} exceeds max_ngram={self.max_ngram}")

    @property
    def kind(self) -> str:
        """How metrics and spans name this drafter."""
        return "ngram"


Draft = ModelDraft | NgramDraft


def check_speculation(draft: Any, k: Any, config: GPTConfig) -> int:
    """Raise unless `draft` is a drafter that fits the target `config` and k a valid count; returns k."""
    if not isinstance(draft, (ModelDraft, NgramDraft)):
        raise GptjaxError(f"draft must be a gptjax.speculative.ModelDraft or NgramDraft, got {type(draft).__name__}")
    if not _is_int(k) or not 1 <= k <= MAX_SPECULATIVE_TOKENS:
        raise GptjaxError(f"num_speculative_tokens={k!r} must be an integer in [1, {MAX_SPECULATIVE_TOKENS}]")
    if isinstance(draft, ModelDraft) and draft.config.vocab_size != config.vocab_size:
        raise GptjaxError(f"the draft's vocabulary ({draft.config.vocab_size} tokens) differs from the target's "
                          f"({config.vocab_size}); a draft model must share the target's tokenizer")
    return int(k)


def check_room(draft: Any, longest: int, max_new_tokens: int) -> None:
    """Raise unless a model draft's context holds the longest prompt plus the budget."""
    if isinstance(draft, ModelDraft) and longest + max_new_tokens > draft.config.n_positions:
        raise GptjaxError(f"prompt length {longest} + max_new_tokens {max_new_tokens} exceeds the draft's context "
                          f"n_positions={draft.config.n_positions}")


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, (bool, np.bool_))


# ---- the reference rules (NumPy); the JAX backend implements the same on device ------------------------------
def ngram_proposal(context: list[int], k: int, max_ngram: int, min_ngram: int) -> list[int]:
    """k tokens continuing `context`: after the most recent earlier occurrence of its last n tokens (longest n
    first), reading on into the proposal itself when the match is near the end (so a period repeats)."""
    c = len(context) - 1  # index of the last token
    for n in range(max_ngram, min_ngram - 1, -1):
        if n > c:
            continue
        suffix = context[c - n + 1:]
        for j in range(c - n, -1, -1):  # most recent start first; the match ends before the last token
            if context[j:j + n] == suffix:
                ext = list(context)
                for t in range(k):
                    ext.append(ext[j + n + t])
                return ext[c + 1:]
    return [context[-1]] * k


def token_probs(logits: np.ndarray, sampling: SamplingParams) -> np.ndarray:
    """The distribution [..., V] (float64) a sampled row draws from: temperature, then top-k/top-p."""
    x = np.asarray(logits, np.float64) / sampling.temperature
    x = np.stack([filter_logits(row, sampling.top_k, sampling.top_p) for row in x.reshape(-1, x.shape[-1])])
    p = np.exp(x - x.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)).reshape(np.shape(logits))


def accept_greedy(logits: np.ndarray, drafts: list[int]) -> list[int]:
    """Greedy verification: target logits [k+1, V] at the positions before each draft token and after the last;
    the drafts it agrees with, then its own argmax."""
    out = []
    for t, d in enumerate(drafts):
        best = int(np.argmax(logits[t]))
        if best != d:
            return out + [best]
        out.append(d)
    return out + [int(np.argmax(logits[len(drafts)]))]


def accept_sampled(p: np.ndarray, q: np.ndarray, drafts: list[int], rng: np.random.Generator) -> list[int]:
    """Leviathan/Chen verification: target distributions p [k+1, V], draft distributions q [k, V] (one-hot for
    an n-gram proposal) from which drafts were drawn; accept d with min(1, p(d)/q(d)), else draw from
    max(0, p - q) renormalised and stop; after k acceptances draw from p[k]."""
    out = []
    for t, d in enumerate(drafts):
        if rng.random() * q[t, d] < p[t, d]:  # u < p/q without dividing (q(d) > 0: d was drawn from q)
            out.append(d)
            continue
        residual = np.maximum(p[t] - q[t], 0)
        total = residual.sum()
        residual = residual / total if total > 0 else p[t]  # total is 0 only if p == q, where rejection is void
        return out + [int(rng.choice(len(residual), p=residual))]
    return out + [int(rng.choice(p.shape[1], p=p[len(drafts)]))]


class Speculation(NamedTuple):
    """A checked drafter for one backend: k proposals per round, and for a model draft its weights as that
    backend prepared them and its KV-cache storage."""

    draft: Any
    k: int
    weights: Any = None
    kv_cache: str | None = None


# ---- speculative against plain decoding, measured (gptjax generate --draft, the speculative study) -----------
class Gain(NamedTuple):
    """Speculative against plain decoding of the same prompts: tokens/s of each (median round), the speed-up
    (median of the rounds' plain/speculative seconds, with their min and max) and the draft tokens accepted of
    those proposed, in total and per call (one call per batch of prompts: the unit a confidence interval resamples)."""

    tokens_per_s: float
    plain_tokens_per_s: float
    speedup: float
    speedup_range: tuple[float, float]
    accepted: int
    proposed: int
    per_call: list[tuple[int, int]]  # (accepted, proposed) of each call, in prompt order
    same_tokens: bool  # the speculative tokens equal the plain ones (always, for greedy decoding)

    @property
    def acceptance(self) -> float | None:
        """accepted / proposed (None when nothing was proposed)."""
        return self.accepted / self.proposed if self.proposed else None


def decode_rounds(backend: Any, weights: Any, batches: list[list[list[int]]], max_new_tokens: int,
                  sampling: SamplingParams, configs: dict[Any, tuple[Any, int]], rounds: int
                  ) -> dict[Any, list[tuple[float, list[Any]]]]:
    """Per config (name -> (drafter or None for plain decoding, k)): `rounds` timed rounds of (seconds, the
    generate results), each round generating every batch of prompts; the configs interleaved round by round after
    one warm-up call each (the first batch: it compiles, and is not timed)."""
    def one(draft: Any, k: int, prompts: list[list[int]]) -> Any:
        spec = {} if draft is None else {"draft": draft, "num_speculative_tokens": k}
        return backend.generate(weights, prompts, max_new_tokens, sampling=sampling, **spec)

    def round_of(i: int, draft: Any, k: int) -> tuple[float, list[Any]]:
        todo = batches[:1] if i < 0 else batches
        results, seconds = timed_value(lambda: [one(draft, k, p) for p in todo])
        return seconds, results

    fns = {name: (lambda i, d=draft, k=k: round_of(i, d, k)) for name, (draft, k) in configs.items()}
    return interleaved_runs(fns, rounds, warmup=1)


def gain(plain: list[tuple[float, list[Any]]], speculative: list[tuple[float, list[Any]]]) -> Gain:
    """The Gain of one speculative config's rounds against plain decoding's rounds of the same prompts."""
    ratios = [p / s for (p, _), (s, _) in zip(plain, speculative)]
    calls = speculative[0][1]
    generated = sum(len(t) for r in calls for t in r.tokens)
    per_call = [(r.accepted, r.proposed) for r in calls]
    return Gain(generated / median([s for s, _ in speculative]),
                sum(len(t) for r in plain[0][1] for t in r.tokens) / median([s for s, _ in plain]),
                median(ratios), (min(ratios), max(ratios)), sum(a for a, _ in per_call),
                sum(p for _, p in per_call), per_call,
                [t for r in calls for t in r.tokens] == [t for r in plain[0][1] for t in r.tokens])


def measure_gain(backend: Any, weights: Any, prompts: list[list[int]], max_new_tokens: int,
                 sampling: SamplingParams, draft: Draft, k: int, rounds: int = 3) -> Gain:
    """Speculative (draft, k) against plain decoding of `prompts` (one batch) on a backend and its prepared
    weights: both warmed up (compile excluded), then `rounds` rounds of plain and speculative interleaved."""
    runs = decode_rounds(backend, weights, [prompts], max_new_tokens, sampling,
                         {"plain": (None, 0), "speculative": (draft, k)}, rounds)
    return gain(runs["plain"], runs["speculative"])


def gain_line(g: Gain, rounds: int) -> str:
    """How `gptjax generate --draft` reports a Gain, with the advice to drop --draft below 1x."""
    line = (f"speculative {g.tokens_per_s:,.1f} tok/s vs plain {g.plain_tokens_per_s:,.1f} tok/s = {g.speedup:.2f}x "
            f"(compile excluded, median of {rounds}); {g.accepted}/{g.proposed} draft tokens accepted "
            f"({100 * (g.acceptance or 0):.1f}%)")
    if g.speedup < 1:
        line += ("\nspeculation is slower than plain decoding for this target (a small model's pass costs little "
                 "more than the draft's): drop --draft")
    return line
