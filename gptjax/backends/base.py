"""The backend interface, the input checks every backend shares, and the registry (with entry points)."""

from __future__ import annotations

import abc
import numbers
import time
from collections.abc import Iterator, Mapping, Sequence
from importlib import import_module
from importlib.metadata import entry_points
from typing import Any, ClassVar

import numpy as np
from opentelemetry import context as otel_context

from gptjax.config import GPTConfig
from gptjax.errors import GptjaxError
from gptjax.generate import GenerationRequest, GenerationResult, StreamChunk, collect, join_requests, make_request
from gptjax.precision import KV_CACHES, MODES, default_kv_cache, storage
from gptjax.quantize import for_precision
from gptjax.sampling import SamplingParams, legacy_sampling
from gptjax.scoring import Scores, assemble, batches, check_sequences, log_probs, right_pad
from gptjax.speculative import ModelDraft, Speculation, check_room, check_speculation
from gptjax.tracing.spans import forward_span, record_error, start_parent
from gptjax.weights import Params, validate_params

ENTRY_POINT_GROUP = "gptjax.backends"
# The options every built-in backend takes (merged into its `options`): the precision mode, the KV cache's
# storage (default: bf16 for bf16, else fp32), and how float32 weights are quantised for int8/w8a8.
PRECISION_OPTIONS: dict[str, tuple] = {"precision": tuple(MODES), "kv_cache": tuple(KV_CACHES), "group_size": (),
                                       "keep_head": (False, True)}
_BUILTIN = {
    "numpy": "gptjax.backends.numpy_ref:NumpyBackend",
    "jax": "gptjax.backends.jax:JaxBackend",
}


class Backend(abc.ABC):
    """One way to run a GPT-2: bound to a config, fed canonical params, returning float32 NumPy logits.

    Subclasses implement `_convert` (canonical dict → their own layout, done once), `_forward` and
    `_generate` (a stream of chunks); this class checks inputs at the boundary and wraps every call in
    OpenTelemetry spans and, when given a gptjax.tracing.Metrics, Prometheus metrics.
    """

    name: ClassVar[str]
    options: ClassVar[dict[str, tuple]] = {}  # option name → allowed values (empty tuple: any)

    def __init__(self, config: GPTConfig, *, metrics: Any = None, trace_sync: bool = True, **options: Any) -> None:
        options = {k: v for k, v in options.items() if v is not None or k not in PRECISION_OPTIONS}  # None: default
        if not isinstance(config, GPTConfig):
            raise GptjaxError(f"config must be a GPTConfig, got {type(config).__name__}")
        for key, value in options.items():
            if key not in self.options:
                raise GptjaxError(f"backend {self.name!r} has no option {key!r}; options: {sorted(self.options)}")
            allowed = self.options[key]
            if allowed and value not in allowed:
                raise GptjaxError(f"backend {self.name!r}: {key}={value!r}; allowed: {list(allowed)}")
        group_size = options.get("group_size")
        if group_size is not None and (not isinstance(group_size, numbers.Integral) or isinstance(group_size, bool)
                                       or group_size < 1):
            raise GptjaxError(f"backend {self.name!r}: group_size={group_size!r} must be a positive integer or None")
        self.config = config
        self._precision = options.get("precision", "fp32")
        self.kv_cache = options.get("kv_cache") or default_kv_cache(self._precision)
        self.quantization = {"group_size": None if group_size is None else int(group_size),
                             "keep_head": bool(options.get("keep_head", False))}
        self.metrics = metrics  # a gptjax.tracing.Metrics, or None
        self.trace_sync = trace_sync  # False: spans do not wait for device results (marked gptjax.synced=false)
        self._cache: tuple[Params, tuple[Any, ...], Any] | None = None
        self._draft_cache: tuple[ModelDraft, Backend, Any] | None = None  # the last draft model, prepared

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
        before, t0 = self._compile_count(), time.perf_counter()
        with forward_span("gptjax.forward", lambda: self.span_attributes("prefill", *tokens.shape),
                          synced=self.trace_sync) as span:
            logits = self._forward(weights, tokens, last_only)
            span.set({"gptjax.compiled": self._compile_count() > before})
        if self.metrics is not None:
            self.metrics.observe_forward("prefill", self.name, time.perf_counter() - t0, tokens.size)
        return logits

    def score(self, params: Params | Any, sequences: Any, *, top_k: int = 0) -> list[Scores]:
        """Each token's log-probability given its prefix, and the top_k most likely tokens at each position,
        for a ragged list of token-id lists (each of 1 to n_positions + 1 tokens): one gptjax.scoring.Scores
        per sequence, in order. Sequences run right-padded, as many per forward pass as fit a token budget."""
        rows = check_sequences(self.config, sequences, top_k)
        weights = self._prepared(params)
        out: list[Scores] = []
        for group in batches([len(r) for r in rows]):
            inputs, targets = right_pad([rows[i] for i in group])  # [B, L] each
            before, t0 = self._compile_count(), time.perf_counter()
            with forward_span("gptjax.score", lambda: self.span_attributes("score", *inputs.shape),
                              synced=self.trace_sync) as span:
                chosen, values, ids = self._score(weights, inputs, targets, int(top_k))
                span.set({"gptjax.compiled": self._compile_count() > before})
            if self.metrics is not None:
                self.metrics.observe_forward("prefill", self.name, time.perf_counter() - t0, inputs.size)
            out += [assemble(rows[i], chosen[b], values[b], ids[b]) for b, i in enumerate(group)]
        return out

    def _score(self, weights: Any, inputs: np.ndarray, targets: np.ndarray, top_k: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Log-probabilities of targets [B, L] after inputs [B, L] (right-padded), and the top_k alternatives:
        float32 [B, L], float32 [B, L, k], int32 [B, L, k]. This default runs _forward and gptjax.scoring's
        NumPy log-softmax; a backend may do it on its device."""
        return log_probs(self._forward(weights, inputs, False), targets, top_k)

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
        spec = self._speculation(draft, num_speculative_tokens, request)
        return collect(self._traced(self._prepared(params), request, None, spec), request)

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
        spec = self._speculation(draft, num_speculative_tokens, request)
        return self._traced(self._prepared(params), request, chunk_size, spec)

    def _speculation(self, draft: Any, k: Any, request: GenerationRequest) -> Speculation | None:
        """The checked drafter of a call (None without one), a draft model's weights prepared by a backend of
        this kind in the draft's precision (reused while the same ModelDraft object is passed)."""
        if draft is None:
            return None
        if type(self)._speculate is Backend._speculate:
            raise GptjaxError(f"backend {self.name!r} has no speculative decoding (draft=...)")
        if request.adjusts:  # the verify step scores the target's raw distribution
            raise GptjaxError("speculative decoding (draft=...) does not support presence_penalty, "
                              "frequency_penalty or logit_bias yet; drop them or the draft")
        k = check_speculation(draft, k, self.config)
        check_room(draft, max(len(p) for p in request.prompts), request.max_new_tokens)
        if not isinstance(draft, ModelDraft):
            return Speculation(draft, k)
        if self._draft_cache is None or self._draft_cache[0] is not draft:
            backend = type(self)(draft.config, precision=draft.precision)
            self._draft_cache = (draft, backend, backend.prepare(dict(draft.params)))
        _, backend, weights = self._draft_cache
        return Speculation(draft, k, weights, backend.kv_cache)

    def stream_joined(self, params: Params | Any, requests: Sequence[GenerationRequest], *, chunk_size: int = 16
                      ) -> Iterator[StreamChunk]:
        """stream() of several requests (from make_request) as one batch, their rows in order, each keeping its
        request's settings and random stream: every row gets the tokens its request would get alone."""
        _check_chunk_size(chunk_size)
        return self._traced(self._prepared(params), join_requests(requests), chunk_size)

    # ---- observability: spans around every forward pass (no-ops without an OpenTelemetry SDK) ------------
    @property
    def model_name(self) -> str:
        """A name for gen_ai.request.model: the shape of the model."""
        c = self.config
        return f"gpt-{c.n_layer}L-{c.n_embd}d-{c.vocab_size}v"

    @property
    def precision(self) -> str:
        """How this backend runs the weights: fp32, bf16, int8 (weight-only) or w8a8 (int8 activations too)."""
        return self._precision

    def _compile_count(self) -> int:
        """Compilations so far of this backend's jitted functions (0 for backends that do not compile)."""
        return 0

    def _devices(self) -> int:
        return 1

    def span_attributes(self, phase: str, batch: int, seq_len: int) -> dict[str, Any]:
        """The attributes of a span around one forward pass (phase prefill/decode/generate) of `batch` rows at
        sequence length `seq_len`: model, backend, precision, devices, mesh (OpenTelemetry GenAI names)."""
        return {"gen_ai.provider.name": "gptjax", "gen_ai.request.model": self.model_name,
                "gptjax.backend": self.name, "gptjax.precision": self.precision, "gptjax.batch_size": batch,
                "gptjax.seq_len": seq_len, "gptjax.devices": self._devices(), "gptjax.mesh": "",
                "gptjax.phase": phase}

    def _traced(self, weights: Any, request: GenerationRequest, chunk_size: int | None,
                spec: Speculation | None = None) -> Iterator[StreamChunk]:
        """_generate's chunks (_speculate's with a drafter), each inside a prefill/decode span under one
        text_completion span, which belongs to the trace current at this call and starts now (not at the first
        read of the stream)."""
        return self._traced_chunks(weights, request, chunk_size, otel_context.get_current(), time.time_ns(),
                                   time.perf_counter(), spec)

    def _traced_chunks(self, weights: Any, request: GenerationRequest, chunk_size: int | None, ctx: Any,
                       start_ns: int, t_start: float, spec: Speculation | None = None) -> Iterator[StreamChunk]:
        longest = max(len(p) for p in request.prompts)
        parent = start_parent(f"text_completion {self.model_name}", lambda: self._request_attributes(request),
                              context=ctx, start_time=start_ns)
        chunks = self._generate(weights, request, chunk_size) if spec is None else self._speculate(
            weights, request, chunk_size, spec)
        generated, position, reasons = 0, longest, [None]
        outcome, error, complete = "ok", None, False
        try:
            while not all(reasons):
                phase = "prefill" if generated == 0 and position == longest else "decode"
                name = "speculate" if spec is not None and phase == "decode" else phase
                before, t0 = self._compile_count(), time.perf_counter()
                with forward_span(f"gptjax.{name}", lambda: self.span_attributes(phase, request.batch, position),
                                  parent=parent, synced=self.trace_sync) as span:
                    chunk = next(chunks)
                    steps = max((len(t) for t in chunk.tokens), default=0)
                    span.set({"gptjax.compiled": self._compile_count() > before, "gptjax.steps": steps}
                             | _spec_attributes(spec, chunk))
                    if phase == "decode" and span.recording:
                        for i in range(steps):
                            span.event("gptjax.token", {"gptjax.position": position + i})
                new_tokens = sum(len(t) for t in chunk.tokens)
                self._observe_chunk(phase, time.perf_counter() - t0, t0 - t_start, steps, new_tokens, request,
                                    position)
                if spec is not None and self.metrics is not None and phase == "decode":
                    self.metrics.observe_speculation(self.name, spec.draft.kind, chunk.proposed, chunk.accepted)
                generated += new_tokens
                position += max(1, steps)
                reasons = chunk.finish_reasons
                if all(reasons):  # complete before the last yield: a consumer may stop reading right after it
                    complete = True
                    if parent.is_recording():
                        parent.set_attributes({"gen_ai.usage.output_tokens": generated,
                                               "gen_ai.response.finish_reasons": [str(r) for r in reasons]})
                yield chunk
        except GeneratorExit:  # the consumer stopped reading
            if not complete:
                outcome = "cancelled"
                parent.set_attribute("gptjax.cancelled", True)
            raise
        except BaseException as e:
            outcome, error = "error", e
            record_error(parent, e)
            raise
        finally:
            chunks.close()
            parent.end()
            self.observe_request(time.perf_counter() - t_start, sum(len(p) for p in request.prompts), generated,
                                 outcome, error)

    def _request_attributes(self, request: GenerationRequest) -> dict[str, Any]:
        sp, longest = request.sampling, max(len(p) for p in request.prompts)
        attributes = self.span_attributes("generate", request.batch, longest) | {
            "gen_ai.operation.name": "text_completion", "gen_ai.request.max_tokens": request.max_new_tokens,
            "gen_ai.request.temperature": 0.0 if sp.is_greedy else sp.temperature, "gen_ai.request.seed": sp.seed,
            "gen_ai.usage.input_tokens": sum(len(p) for p in request.prompts)}
        if sp.top_p is not None:
            attributes["gen_ai.request.top_p"] = sp.top_p
        if sp.top_k is not None:
            attributes["gen_ai.request.top_k"] = sp.top_k
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(sp, name):
                attributes[f"gen_ai.request.{name}"] = getattr(sp, name)
        return attributes

    def _observe_chunk(self, phase: str, seconds: float, since_start: float, steps: int, tokens: int,
                       request: GenerationRequest, position: int) -> None:
        if phase == "prefill":
            self.observe_prefill(seconds, [len(p) for p in request.prompts])
            self.observe_first_token(since_start + seconds)
        else:
            self.observe_decode(seconds, steps, tokens, position)

    # ---- metrics: recorded here for generate() and for the server's decode sessions alike ---------------
    def observe_prefill(self, seconds: float, prompt_lengths: Sequence[int]) -> None:
        """Report a prefill of prompts of these lengths that took `seconds`: forward time, tokens/s, MFU and
        bandwidth use (nothing without metrics)."""
        m, c = self.metrics, self.config
        if m is None:
            return
        m.observe_forward("prefill", self.name, seconds, sum(prompt_lengths))
        flops = sum(c.forward_flops(1, n, last_only=True) for n in prompt_lengths)
        m.observe_utilization("prefill", seconds, flops, c.weight_bytes(storage(self.precision)))

    def observe_decode(self, seconds: float, steps: int, tokens: int, position: int) -> None:
        """Report `steps` decode steps from sequence position `position` that gave `tokens` tokens (all rows) in
        `seconds`: forward time, tokens/s, time per output token, MFU and bandwidth use."""
        m, c = self.metrics, self.config
        if m is None:
            return
        m.observe_forward("decode", self.name, seconds, tokens)
        if steps:
            m.tpot.labels(backend=self.name).observe(seconds / steps)
            per_token = c.forward_flops(1, position + steps) - c.forward_flops(1, position + steps - 1)
            m.observe_utilization("decode", seconds, per_token * tokens,
                                  c.weight_bytes(storage(self.precision)) * steps)

    def observe_first_token(self, seconds: float) -> None:
        """Report a request's time to first token, `seconds` after it arrived."""
        if self.metrics is not None:
            self.metrics.ttft.labels(backend=self.name).observe(seconds)

    def observe_request(self, seconds: float, prompt_tokens: int, generated: int, outcome: str,
                        error: BaseException | None = None) -> None:
        """Report a finished request: latency, token counts, outcome (ok, error, cancelled) and error type."""
        if self.metrics is not None:
            self.metrics.observe_request(self.name, seconds, prompt_tokens, generated, outcome, error)

    # ---- decode sessions: continuous batching, where a backend supports it -------------------------------
    @property
    def supports_sessions(self) -> bool:
        """Whether open_session works here (the server batches continuously where it does, else dynamically)."""
        return False

    def open_session(self, weights: Any, requests: Sequence[GenerationRequest], owners: Sequence[Any], *,
                     slots: int, headroom: int, speculation: Speculation | None = None) -> Any:
        """A running batch that requests join and leave between decode chunks: `requests` (one opaque owner
        each) prefilled into at least `slots` rows over prepared `weights`, with cache room for `headroom` steps
        beyond the longest budget for requests that join later; decoded speculatively with a `speculation`
        (a gptjax.speculative.Speculation, draft weights prepared by this kind of backend). Its methods are
        those gptjax.serve.continuous's Session protocol names. Only where supports_sessions."""
        raise GptjaxError(f"backend {self.name!r} has no decode sessions (continuous batching)")

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


def _spec_attributes(spec: Speculation | None, chunk: StreamChunk) -> dict[str, Any]:
    """A speculative chunk's span attributes: the drafter, k, and its draft tokens proposed and accepted (the
    draft and verify passes of a round run inside one jitted loop, so they are counted, not timed apart)."""
    if spec is None or chunk.phase != "decode":
        return {}
    return {"gptjax.draft": spec.draft.kind, "gptjax.spec.k": spec.k, "gptjax.spec.proposed": chunk.proposed,
            "gptjax.spec.accepted": chunk.accepted}


def _check_chunk_size(chunk_size: Any) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
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


def _registry() -> dict[str, list[str]]:
    """Backend name → the entry-point values that claim it (built-ins first and alone: no shadowing)."""
    found: dict[str, list[str]] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(ep.name, [])
        if ep.value not in found[ep.name]:
            found[ep.name].append(ep.value)
    return found | {name: [value] for name, value in _BUILTIN.items()}


def available_backends() -> list[str]:
    """Names get_backend accepts: the built-ins and those registered under the `gptjax.backends` entry points."""
    return sorted(_registry())


def get_backend(name: str, config: GPTConfig, **options: Any) -> Backend:
    """An instance of the backend called `name`, bound to `config` (a model shape), with backend options."""
    registry = _registry()
    if name not in registry:
        raise GptjaxError(f"unknown backend {name!r}; available: {sorted(registry)}")
    if len(registry[name]) > 1:
        raise GptjaxError(f"backend {name!r} is registered twice, by {registry[name]}; uninstall one")
    cls = _load(name, registry[name][0])
    return cls(config, **options)


def _load(name: str, value: str) -> type[Backend]:
    module, _, attr = value.partition(":")
    try:
        cls = import_module(module.strip())
        for part in attr.split("[")[0].strip().split("."):
            cls = getattr(cls, part)
    except (ImportError, AttributeError, ValueError) as e:
        raise GptjaxError(f"backend {name!r} ({value}) cannot be loaded: {type(e).__name__}: {e}") from None
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise GptjaxError(f"backend {name!r} ({value}) is not a gptjax.backends.Backend subclass")
    return cls
