"""The backend interface and the input checks every backend shares.

A backend implements `_convert` (canonical params -> its own layout, once), `_forward` and `_generate` (a stream
of chunks), and where it can `_score`, `_speculate` and decode sessions. This class checks every input at the
boundary and runs the work through `self.observer` (gptjax.tracing.observe), which puts spans and metrics around
it: a backend, plug-ins included, gets them without any code of its own. Backends by name (built-ins and
plug-ins): gptjax.backends.registry.
"""

from __future__ import annotations

import abc
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from gptjax.checks import is_int
from gptjax.config import GPTConfig
from gptjax.errors import GptjaxError
from gptjax.generate import GenerationRequest, GenerationResult, StreamChunk, collect, join_requests, make_request
from gptjax.precision import KV_CACHES, MODES, default_kv_cache
from gptjax.quantize import for_precision
from gptjax.sampling import SamplingParams, legacy_sampling
from gptjax.scoring import GrowingScores, Scores, assemble, batches, check_sequences, log_probs, right_pad
from gptjax.speculative import ModelDraft, Speculation, check_room, check_speculation
from gptjax.tracing.observe import Observer
from gptjax.weights import Params, validate_params

# The options every built-in backend takes (merged into its `options`): the precision mode, the KV cache's
# storage (default: the mode's own, gptjax.precision), and how float32 weights are quantised for a scaled storage.
PRECISION_OPTIONS: dict[str, tuple] = {"precision": tuple(MODES), "kv_cache": tuple(KV_CACHES), "group_size": (),
                                       "keep_head": (False, True)}
# Attributes that moved to the backend's observer in 0.2: backend.NAME is backend.observer.VALUE for one release.
MOVED = {"metrics": "metrics", "trace_sync": "synced", "model_name": "model_name", "span_attributes": "span_attributes",
         "observe_prefill": "report_prefill", "observe_decode": "report_decode",
         "observe_first_token": "report_first_token", "observe_request": "report_request"}


class Backend(abc.ABC):
    """One way to run a GPT-2: bound to a config, fed canonical params, returning float32 NumPy logits.

    metrics (a gptjax.tracing.Metrics) and trace_sync (False: spans do not wait for device results) go to
    `self.observer`; the other keyword options are those `options` names (option name -> allowed values).
    """

    name: ClassVar[str]
    options: ClassVar[dict[str, tuple]] = {}  # option name → allowed values (empty tuple: any)

    def __init__(self, config: GPTConfig, *, metrics: Any = None, trace_sync: bool = True, **options: Any) -> None:
        if not isinstance(config, GPTConfig):
            raise GptjaxError(f"config must be a GPTConfig, got {type(config).__name__}")
        options = check_options(self.name, self.options, options)
        self.config = config
        self._precision = options.get("precision", "fp32")
        self.kv_cache = options.get("kv_cache") or default_kv_cache(self._precision)
        group_size = options.get("group_size")
        self.quantization = {"group_size": None if group_size is None else int(group_size),
                             "keep_head": bool(options.get("keep_head", False))}
        self.observer = Observer(self, metrics, trace_sync)
        self._cache: tuple[Params, tuple[Any, ...], Any] | None = None
        self._draft_cache: tuple[ModelDraft, Backend, Any] | None = None  # the last draft model, prepared

    @property
    def precision(self) -> str:
        """How this backend runs the weights: any mode of gptjax.precision (the `precision` option; default fp32)."""
        return self._precision

    def prepare(self, params: Params) -> Any:
        """Validate canonical params, bring them to this backend's precision (gptjax.quantize.for_precision:
        float32 weights are converted, a quantised checkpoint is used as stored) and convert them to the
        backend's layout (reusable across calls)."""
        validate_params(self.config, params)
        return self._convert(for_precision(params, self.config, self.precision, **self.quantization))

    def forward(self, params: Params | Any, tokens: Any, *, last_only: bool = False) -> np.ndarray:
        """Logits, float32 [B, T, V] (or [B, V] at the last position with last_only) for int tokens [B, T].

        `params` is the canonical dict (converted once, cached while the same dict holds the same arrays)
        or what `prepare` returned.
        """
        tokens = validate_tokens(tokens, self.config)
        weights = self._prepared(params)
        with self.observer.batch_pass("forward", "prefill", *tokens.shape):
            return self._forward(weights, tokens, last_only)

    def score(self, params: Params | Any, sequences: Any, *, top_k: int = 0) -> list[Scores]:
        """Each token's log-probability given its prefix, and the top_k most likely tokens at each position,
        for a ragged list of token-id lists (each of 1 to n_positions + 1 tokens): one gptjax.scoring.Scores
        per sequence, in order. Sequences run right-padded, as many per forward pass as fit a token budget."""
        rows = check_sequences(self.config, sequences, top_k)
        weights = self._prepared(params)
        out: list[Scores] = []
        for group in batches([len(r) for r in rows]):
            inputs, targets = right_pad([rows[i] for i in group])  # [B, L] each
            with self.observer.batch_pass("score", "score", *inputs.shape):
                chosen, values, ids = self._score(weights, inputs, targets, int(top_k))
            out += [assemble(rows[i], chosen[b], values[b], ids[b]) for b, i in enumerate(group)]
        return out

    def open_scorer(self, params: Params | Any, *, top_k: int = 0) -> GrowingScores:
        """score() of a sequence that grows (a streamed completion's log-probabilities): each extend(tokens) asks
        only for the new positions. This default scores the whole sequence each time; a backend with a KV cache
        feeds each token once (_feed)."""
        check_sequences(self.config, [[0]], top_k)
        weights = self._prepared(params)
        return GrowingScores(lambda sequence, start: self._feed(weights, sequence, start, int(top_k)), int(top_k))

    def _feed(self, weights: Any, sequence: list[int], start: int, top_k: int
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """GrowingScores' feed: the scores of positions start + 1 .. len(sequence) - 1 (see gptjax.scoring.Feed)."""
        [scores] = self.score(weights, [sequence], top_k=top_k)
        return scores.logprobs[start + 1:], scores.top_logprobs[start + 1:], scores.top_ids[start + 1:]

    def generate(self, params: Params | Any, prompts: Any, max_new_tokens: int, *,
                 sampling: SamplingParams | None = None, draft: Any = None, num_speculative_tokens: int = 4,
                 **legacy: Any) -> GenerationResult:
        """Continue each prompt (a ragged list of token-id lists) by up to max_new_tokens tokens, sampled as
        `sampling` says (a gptjax.SamplingParams; None: SamplingParams(), temperature 1).

        The rules are in gptjax.generate; the same seed gives the same tokens on every run. Each row stops at a
        stop token (not included) or after max_new_tokens; the result says which. With a draft
        (gptjax.speculative.ModelDraft or NgramDraft) decoding is speculative, num_speculative_tokens proposals
        per target pass: greedy tokens are those without a draft, sampled ones follow the same distribution.
        """
        request = make_request(self.config, prompts, max_new_tokens, legacy_sampling(sampling, legacy, "generate"))
        spec = None if draft is None else self.speculation(draft, num_speculative_tokens, request)
        return collect(self._observed(params, request, None, spec), request)

    def stream(self, params: Params | Any, prompts: Any, max_new_tokens: int, *, chunk_size: int = 16,
               sampling: SamplingParams | None = None, draft: Any = None, num_speculative_tokens: int = 4,
               **legacy: Any) -> Iterator[StreamChunk]:
        """generate(), yielding the new tokens of every row after each chunk of chunk_size decode steps
        (with a draft: chunk_size verify rounds, each adding 1..num_speculative_tokens + 1 tokens per row).

        Arguments are checked here, before the first chunk is asked for; the concatenated chunks equal
        generate()'s result.
        """
        _check_chunk_size(chunk_size)
        request = make_request(self.config, prompts, max_new_tokens, legacy_sampling(sampling, legacy, "stream"))
        spec = None if draft is None else self.speculation(draft, num_speculative_tokens, request)
        return self._observed(params, request, chunk_size, spec)

    def stream_joined(self, params: Params | Any, requests: Sequence[GenerationRequest], *, chunk_size: int = 16
                      ) -> Iterator[StreamChunk]:
        """stream() of several requests (from make_request) as one batch, their rows in order, each keeping its
        request's settings and random stream: every row gets the tokens its request would get alone."""
        _check_chunk_size(chunk_size)
        return self._observed(params, join_requests(requests), chunk_size)

    def _observed(self, params: Params | Any, request: GenerationRequest, chunk_size: int | None,
                  spec: Speculation | None = None) -> Iterator[StreamChunk]:
        """A checked request's chunks (_generate's, or _speculate's with a drafter) through the observer."""
        weights = self._prepared(params)
        chunks = self._generate(weights, request, chunk_size) if spec is None else self._speculate(
            weights, request, chunk_size, spec)
        return self.observer.stream(chunks, request, spec)

    def speculation(self, draft: Any, k: Any, request: GenerationRequest | None = None) -> Speculation:
        """A checked drafter (gptjax.speculative.ModelDraft or NgramDraft) proposing k tokens per round, a draft
        model's weights prepared by a backend of this kind in the draft's precision (reused while the same
        ModelDraft object is passed); with a request, also checked to fit its rows (no penalties or bias, room
        in the draft model's context)."""
        if type(self)._speculate is Backend._speculate:
            raise GptjaxError(f"backend {self.name!r} has no speculative decoding (draft=...)")
        if request is not None and request.adjusts:  # the verify step scores the target's raw distribution
            raise GptjaxError("speculative decoding (draft=...) does not support presence_penalty, "
                              "frequency_penalty or logit_bias yet; drop them or the draft")
        k = check_speculation(draft, k, self.config)
        if request is not None:
            check_room(draft, max(len(p) for p in request.prompts), request.max_new_tokens)
        if not isinstance(draft, ModelDraft):
            return Speculation(draft, k)
        if self._draft_cache is None or self._draft_cache[0] is not draft:
            backend = type(self)(draft.config, precision=draft.precision)
            self._draft_cache = (draft, backend, backend.prepare(dict(draft.params)))
        _, backend, weights = self._draft_cache
        return Speculation(draft, k, weights, backend.kv_cache)

    def _prepared(self, params: Params | Any) -> Any:
        """Converted weights for params: reused while the same dict holds the same array objects
        (the cache keeps those arrays alive, so their identities cannot be recycled). In-place writes
        into an array are not seen: call prepare() after them."""
        if not isinstance(params, Mapping):
            self._check_prepared(params)
            return params
        arrays = tuple(params.values())
        cached = self._cache
        if cached is None or cached[0] is not params or len(cached[1]) != len(arrays) or any(
                a is not b for a, b in zip(cached[1], arrays)):
            self._cache = cached = (params, arrays, self.prepare(dict(params)))
        return cached[2]

    def _check_prepared(self, weights: Any) -> None:
        """Raise unless weights came from prepare() of this kind of backend for an equal config."""
        kind = getattr(self, "prepared_type", None)
        if kind is None or not isinstance(weights, kind):
            raise GptjaxError(f"params must be a dict of canonical arrays or {self.name!r} backend's prepare() "
                              f"result, got {type(weights).__name__}")
        if weights.config != self.config:
            raise GptjaxError(f"prepared weights are for {weights.config}, but this backend is for {self.config}")

    def __getattr__(self, name: str) -> Any:
        """For one release: what moved to self.observer (MOVED), with a DeprecationWarning saying where."""
        if name not in MOVED:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        warnings.warn(f"backend.{name} moved in 0.2: use backend.observer.{MOVED[name]}", DeprecationWarning,
                      stacklevel=2)
        return getattr(self.observer, MOVED[name])

    # ---- what a backend may tell or add; the defaults fit a backend that neither compiles nor shards ----------
    def compile_count(self) -> int:
        """Compilations so far of this backend's jitted functions (spans say whether a call compiled)."""
        return 0

    def placement(self) -> tuple[int, str]:
        """The devices this backend runs on and its mesh's description ("" without one), for span attributes."""
        return 1, ""

    @property
    def supports_sessions(self) -> bool:
        """Whether open_session works here (the server batches continuously where it does, else dynamically)."""
        return False

    def open_session(self, weights: Any, requests: Sequence[GenerationRequest], owners: Sequence[Any], *,
                     slots: int, headroom: int | None, speculation: Speculation | None = None) -> Any:
        """A running batch that requests join and leave between decode chunks: `requests` (one opaque owner
        each) prefilled into at least `slots` rows over prepared `weights`, with cache room for `headroom` steps
        beyond the longest budget for requests that join later (None: room for any request, and compiled shapes
        that depend on the rows alone: a server's); decoded speculatively with a `speculation`
        (a gptjax.speculative.Speculation, draft weights prepared by this kind of backend). Its methods are
        those gptjax.serve.continuous's Session protocol names. Only where supports_sessions."""
        raise GptjaxError(f"backend {self.name!r} has no decode sessions (continuous batching)")

    def _score(self, weights: Any, inputs: np.ndarray, targets: np.ndarray, top_k: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Log-probabilities of targets [B, L] after inputs [B, L] (right-padded), and the top_k alternatives:
        float32 [B, L], float32 [B, L, k], int32 [B, L, k]. This default runs _forward and gptjax.scoring's
        NumPy log-softmax; a backend may do it on its device."""
        return log_probs(self._forward(weights, inputs, False), targets, top_k)

    def _speculate(self, weights: Any, request: GenerationRequest, chunk_size: int | None, spec: Speculation
                   ) -> Iterator[StreamChunk]:
        """_generate with a drafter: the first chunk is prefill's token, then chunk_size verify rounds per chunk,
        each chunk carrying its proposed and accepted draft tokens (backends that support speculation)."""
        raise GptjaxError(f"backend {self.name!r} has no speculative decoding (draft=...)")

    @abc.abstractmethod
    def _convert(self, params: Params) -> Any: ...

    @abc.abstractmethod
    def _forward(self, weights: Any, tokens: np.ndarray, last_only: bool) -> np.ndarray: ...

    @abc.abstractmethod
    def _generate(self, weights: Any, request: GenerationRequest, chunk_size: int | None
                  ) -> Iterator[StreamChunk]:
        """Yield StreamChunks for a validated request (one at the end when chunk_size is None)."""


def check_options(name: str, allowed: Mapping[str, tuple], options: dict[str, Any]) -> dict[str, Any]:
    """A backend's options, None meaning a precision option's default; a GptjaxError for an unknown option, a
    value outside its allowed ones, or a group_size that is not a positive integer."""
    options = {k: v for k, v in options.items() if v is not None or k not in PRECISION_OPTIONS}
    for key, value in options.items():
        if key not in allowed:
            raise GptjaxError(f"backend {name!r} has no option {key!r}; options: {sorted(allowed)}")
        if allowed[key] and value not in allowed[key]:
            raise GptjaxError(f"backend {name!r}: {key}={value!r}; allowed: {list(allowed[key])}")
    _check_group_size(name, options.get("group_size"))
    return options


def _check_group_size(name: str, group_size: Any) -> None:
    if group_size is not None and (not is_int(group_size) or group_size < 1):
        raise GptjaxError(f"backend {name!r}: group_size={group_size!r} must be a positive integer or None")


def _check_chunk_size(chunk_size: Any) -> None:
    if not is_int(chunk_size) or chunk_size < 1:
        raise GptjaxError(f"chunk_size={chunk_size!r} must be an integer >= 1")


def validate_tokens(tokens: Any, config: GPTConfig) -> np.ndarray:
    """Tokens as an int32 [B, T] array, or a GptjaxError naming what is wrong (rank, dtype, range, length)."""
    try:
        arr = np.asarray(tokens)
    except ValueError:
        raise GptjaxError("tokens must be a rectangular [B, T] array of ints (ragged rows given)") from None
    if arr.dtype == object or (arr.size and arr.dtype.kind not in "iu"):
        raise GptjaxError(f"tokens must be integers, got dtype {arr.dtype}")
    if arr.ndim != 2:
        raise GptjaxError(f"tokens must have shape [B, T] (rank 2), got shape {arr.shape}")
    B, T = arr.shape
    if B == 0 or T == 0:
        raise GptjaxError(f"tokens must be non-empty, got shape {arr.shape}")
    if T > config.n_positions:
        raise GptjaxError(f"sequence length T={T} exceeds the context n_positions={config.n_positions}")
    bad = (arr < 0) | (arr >= config.vocab_size)
    if bad.any():
        b, t = np.argwhere(bad)[0]
        raise GptjaxError(f"token id {int(arr[b, t])} at [{b}, {t}] is outside [0, {config.vocab_size})")
    return arr.astype(np.int32)
