"""SamplingParams: how to pick each next token, as one frozen, validated object (the shape of vLLM's).

Every range check lives in `__post_init__`, so a SamplingParams that exists is valid; the only checks left for
later are those that need the model's vocabulary (`check_vocab`, run by gptjax.generate.make_request). The rules
that apply these settings (penalties, logit bias, greedy, top-k, top-p, the draw) are in gptjax.generate.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from gptjax.checks import is_int, is_real
from gptjax.errors import GptjaxError

MAX_LOGIT_BIAS = 300  # entries in a logit_bias (OpenAI's limit)
MAX_STOP_TOKENS = 1024  # stop token ids per request


class SamplingError(GptjaxError):
    """A bad sampling setting. `field` names the SamplingParams field; for one logit_bias entry, `key` is its key
    (as given; a token id for the vocabulary check) and `part` says what is wrong: "key" (not a token id of the
    vocabulary), "bias" (its bias) or "twice" (one token id given twice). A server maps it to its own wording."""

    def __init__(self, message: str, field: str, key: Any = None, part: str | None = None) -> None:
        super().__init__(message)
        self.field, self.key, self.part = field, key, part


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token of a generation (the same for every row of a call).

    Construct it with keywords; a bad value raises SamplingError (a GptjaxError) naming it and what is allowed.
    `SamplingParams(greedy=True)` (or `temperature=0`) is argmax decoding.
    """

    temperature: float = 1.0
    """Divides the logits before the draw: finite, >= 0; 0 means greedy."""
    top_k: int | None = None
    """Keep only the k most likely tokens (ties with the k-th kept): an integer in [1, V], or None for all."""
    top_p: float | None = None
    """Keep the smallest set of most likely tokens whose probability reaches p: in (0, 1], or None (= 1)."""
    seed: int = 0
    """The random stream: an integer in [0, 2**32); the same seed gives the same tokens on every run."""
    stop_tokens: tuple[int, ...] = ()
    """Token ids that end a row (the stop token is not part of the output)."""
    greedy: bool = False
    """Argmax decoding whatever the temperature."""
    presence_penalty: float = 0.0
    """Subtracted from the logit of every token the row has generated: a finite number in [-2, 2]."""
    frequency_penalty: float = 0.0
    """Subtracted once per time the row has generated the token: a finite number in [-2, 2]."""
    logit_bias: tuple[tuple[int, float], ...] = ()
    """Added to the logits of given tokens: a mapping token id (int or decimal string) -> bias in [-100, 100],
    at most 300 entries; kept as (id, bias) pairs, ids ascending."""

    def __post_init__(self) -> None:
        if not is_real(self.temperature) or not self.temperature >= 0:
            raise SamplingError(f"temperature={self.temperature!r} must be a finite number >= 0 (0 means greedy)",
                                "temperature")
        if self.top_k is not None and (not is_int(self.top_k) or self.top_k < 1):
            raise SamplingError(f"top_k={self.top_k!r} must be an integer >= 1 (at most the vocabulary size) or None",
                                "top_k")
        if self.top_p is not None and (not is_real(self.top_p) or not 0 < self.top_p <= 1):
            raise SamplingError(f"top_p={self.top_p!r} must be a number in (0, 1] or None", "top_p")
        if not is_int(self.seed) or not 0 <= self.seed < 2**32:
            raise SamplingError(f"seed={self.seed!r} must be an integer in [0, 2**32)", "seed")
        if not isinstance(self.greedy, (bool, np.bool_)):
            raise SamplingError(f"greedy={self.greedy!r} must be True or False", "greedy")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not is_real(value) or not -2 <= value <= 2:
                raise SamplingError(f"{name}={value!r} must be a finite number in [-2, 2]", name)
        self._set(temperature=float(self.temperature), top_k=None if self.top_k is None else int(self.top_k),
                  top_p=None if self.top_p is None else float(self.top_p), seed=int(self.seed),
                  greedy=bool(self.greedy), presence_penalty=float(self.presence_penalty),
                  frequency_penalty=float(self.frequency_penalty), stop_tokens=_stop_tokens(self.stop_tokens),
                  logit_bias=_logit_bias(self.logit_bias))

    def _set(self, **values: Any) -> None:
        for name, value in values.items():
            object.__setattr__(self, name, value)  # normalising a frozen instance, once, while it is built

    def check_vocab(self, vocab_size: int) -> None:
        """Raise SamplingError unless every token id and top_k fit a vocabulary of vocab_size tokens."""
        V = vocab_size
        if self.top_k is not None and self.top_k > V:
            raise SamplingError(f"top_k={self.top_k} must be an integer in [1, {V}] (the vocabulary size) or None",
                                "top_k")
        for t in self.stop_tokens:
            if t >= V:
                raise SamplingError(f"stop_tokens: token id {t} is outside [0, {V})", "stop_tokens", t, "key")
        for t, _ in self.logit_bias:
            if t >= V:
                raise SamplingError(f"logit_bias: token id {t} is outside [0, {V})", "logit_bias", t, "key")

    @property
    def adjusts(self) -> bool:
        """Whether penalties or a logit bias change this row's logits before sampling."""
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias)

    @property
    def is_greedy(self) -> bool:
        """Argmax decoding: asked for, or implied by temperature 0."""
        return self.greedy or self.temperature == 0

    @property
    def filters(self) -> bool:
        """Whether top-k or top-p restrict the support (backends may skip sorting otherwise)."""
        return not self.is_greedy and (self.top_k is not None or self.top_p is not None)


def _stop_tokens(ids: Any) -> tuple[int, ...]:
    """Stop token ids as a tuple of ints >= 0, or a GptjaxError naming the bad one."""
    if isinstance(ids, np.ndarray):
        ids = ids.tolist()
    if isinstance(ids, (str, bytes, Mapping)) or not isinstance(ids, Iterable):
        raise SamplingError(f"stop_tokens must be a list of token ids, got {type(ids).__name__}", "stop_tokens")
    out = []
    for t in ids:
        if len(out) == MAX_STOP_TOKENS:
            raise SamplingError(f"stop_tokens: more than {MAX_STOP_TOKENS} token ids", "stop_tokens")
        if not is_int(t) or t < 0:
            raise SamplingError(f"stop_tokens: {t!r} is not a token id (an integer >= 0)", "stop_tokens", t, "key")
        out.append(int(t))
    return tuple(out)


def _logit_bias(bias: Any) -> tuple[tuple[int, float], ...]:
    """A logit_bias mapping (or (id, bias) pairs; None for none) as sorted (id, bias) pairs, or a GptjaxError
    naming the bad entry. Two spellings of one id ("65" and "065") are refused, not merged."""
    if bias is None:
        return ()
    if isinstance(bias, tuple) and all(isinstance(p, tuple) and len(p) == 2 for p in bias):
        items = bias  # the normalised form, e.g. from dataclasses.replace
    elif isinstance(bias, Mapping):
        items = tuple(bias.items())
    else:
        raise SamplingError(f"logit_bias must be a mapping of token id to bias, got {type(bias).__name__}",
                            "logit_bias")
    if len(items) > MAX_LOGIT_BIAS:
        raise SamplingError(f"logit_bias has {len(items)} entries; at most {MAX_LOGIT_BIAS}", "logit_bias")
    pairs: dict[int, float] = {}
    for key, value in items:
        token = _bias_token(key)
        if not is_real(value) or not -100 <= value <= 100:
            raise SamplingError(f"logit_bias: bias {value!r} of token {token} must be a finite number in [-100, 100]",
                                "logit_bias", key, "bias")
        if token in pairs:
            raise SamplingError(f"logit_bias: token id {token} is given twice", "logit_bias", key, "twice")
        pairs[token] = float(value)
    return tuple(sorted(pairs.items()))


def _bias_token(key: Any) -> int:
    if isinstance(key, str) and re.fullmatch(r"[0-9]{1,10}", key):
        return int(key)
    if is_int(key) and key >= 0:
        return int(key)
    raise SamplingError(f"logit_bias: key {key!r} is not a token id (an integer >= 0 or a decimal string)",
                        "logit_bias", key, "key")


GREEDY = SamplingParams(greedy=True)  # argmax decoding


def legacy_sampling(sampling: SamplingParams | None, legacy: dict[str, Any], call: str) -> SamplingParams | None:
    """`sampling`, or, for one release, the SamplingParams of the loose keyword arguments that generate() and
    stream() took before 0.2 (temperature=..., greedy=..., ...), with a DeprecationWarning saying what to write."""
    if not legacy:
        return sampling
    unknown = sorted(set(legacy) - set(SamplingParams.__dataclass_fields__))
    if unknown:
        raise TypeError(f"{call}() got an unexpected keyword argument {unknown[0]!r}")
    written = ", ".join(f"{k}={v!r}" for k, v in legacy.items())
    if sampling is not None:
        raise GptjaxError(f"{call}(): give sampling=SamplingParams(...) or the keywords {written}, not both")
    warnings.warn(f"{call}({written}) is deprecated and will be removed in the next release; write "
                  f"{call}(..., sampling=gptjax.SamplingParams({written}))", DeprecationWarning, stacklevel=3)
    return SamplingParams(**legacy)
