"""Strict checks of a POST /v1/completions body: every bad field becomes a 400 with an OpenAI-style error body
naming the field and what it allows, before any work is queued."""

from __future__ import annotations

import json
import math
import numbers
import secrets
from dataclasses import dataclass
from typing import Any

from gptjax.config import GPTConfig
from gptjax.errors import GptjaxError
from gptjax.generate import GenerationRequest, make_request
from gptjax.tokenizer import Tokenizer

FIELDS = ("model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream",
          "stream_options", "n", "user")
DEFAULT_MAX_TOKENS = 16  # OpenAI's default
MAX_STOP = 4


class RequestError(Exception):
    """An HTTP error for the client: status, message, and the OpenAI error fields (type, param, code)."""

    def __init__(self, status: int, message: str, param: str | None = None, *,
                 type: str = "invalid_request_error", code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """The OpenAI error object."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Limits:
    """What the server accepts: the model's context and vocabulary, and the configured max_tokens cap."""

    config: GPTConfig
    model_id: str
    max_tokens_cap: int


@dataclass(frozen=True)
class Completion:
    """A validated completion request: the generation request (one row) plus how to answer."""

    request: GenerationRequest
    prompt: list[int]
    stream: bool
    include_usage: bool


def parse_completion(body: bytes, limits: Limits, tokenizer: Tokenizer | None) -> Completion:
    """Parse and check a request body; a RequestError names the first bad field."""
    data = _json_object(body)
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise _bad(f"unknown field {unknown[0]!r}; allowed fields: {', '.join(FIELDS)}", unknown[0])
    _check_model(data.get("model"), limits.model_id)
    _check_n(data.get("n", 1))
    _get(data, "user", str, "a string")
    prompt = _prompt(data.get("prompt"), limits.config, tokenizer)
    max_tokens = _max_tokens(data.get("max_tokens"), len(prompt), limits)
    temperature = _number(data, "temperature", 1.0, lambda x: 0 <= x <= 2, "a number in [0, 2] (0 means greedy)")
    top_p = _number(data, "top_p", 1.0, lambda x: 0 < x <= 1, "a number in (0, 1]")
    V = limits.config.vocab_size
    top_k = _integer(data, "top_k", None, lambda x: 1 <= x <= V, f"an integer in [1, {V}] or null")
    seed = _integer(data, "seed", None, lambda x: 0 <= x < 2**32, "an integer in [0, 2**32) or null")
    stop = _stop(data.get("stop"), V, tokenizer)
    stream = _get(data, "stream", bool, "true or false")
    include_usage = _stream_options(data.get("stream_options"), bool(stream))
    try:
        request = make_request(limits.config, [prompt], max_tokens, temperature=temperature,
                               top_k=top_k, top_p=None if top_p == 1 else top_p,
                               seed=secrets.randbelow(2**32) if seed is None else seed, stop_tokens=stop)
    except GptjaxError as e:  # the checks above should have caught it: still a client error, never a 500
        raise _bad(str(e)) from None
    return Completion(request, prompt, bool(stream), include_usage)


def _bad(message: str, param: str | None = None) -> RequestError:
    return RequestError(400, message, param)


def _encode(tokenizer: Any, text: str, field: str) -> list[int]:
    """Token ids of text, or a 400 for text UTF-8 cannot encode (a lone surrogate such as "\\ud800")."""
    try:
        return tokenizer.encode(text)
    except UnicodeEncodeError as e:
        raise _bad(f"{field} is not encodable text: {e.reason} at position {e.start}", field) from None


class _DuplicateKey(Exception):
    """A JSON object with the same key twice (json.loads would keep the last silently)."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """object_pairs_hook for json.loads: a dict, or _DuplicateKey naming the first repeated key."""
    data: dict[str, Any] = {}
    for key, value in pairs:
        if key in data:
            raise _DuplicateKey(key)
        data[key] = value
    return data


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body, object_pairs_hook=_unique_keys)
    except _DuplicateKey as e:  # which value was meant is ambiguous: refuse rather than guess
        key = e.args[0]
        raise _bad(f"the key {json.dumps(key)[:50]} appears more than once in a JSON object", key[:50]) from None
    except (ValueError, UnicodeDecodeError) as e:
        raise _bad(f"the request body is not valid JSON: {e}") from None
    except RecursionError:
        raise _bad("the request body nests JSON too deeply") from None
    if not isinstance(data, dict):
        raise _bad(f"the request body must be a JSON object, got {type(data).__name__}")
    return data


def _finite(x: numbers.Real) -> bool:
    """A finite number a float can hold (a JSON integer may have hundreds of digits)."""
    try:
        return math.isfinite(x)
    except OverflowError:
        return False


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _get(data: dict[str, Any], field: str, kind: type, allowed: str) -> Any:
    value = data.get(field)
    if value is not None and not isinstance(value, kind):
        raise _bad(f"{field} must be {allowed}, got {json.dumps(value)[:50]}", field)
    return value


def _number(data: dict[str, Any], field: str, default: float, ok: Any, allowed: str) -> float:
    value = data.get(field)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not _finite(value) or not ok(value):
        raise _bad(f"{field} must be {allowed}, got {json.dumps(value)[:50]}", field)
    return float(value)


def _integer(data: dict[str, Any], field: str, default: int | None, ok: Any, allowed: str) -> int | None:
    value = data.get(field)
    if value is None:
        return default
    if not _is_int(value) or not ok(value):
        raise _bad(f"{field} must be {allowed}, got {json.dumps(value)[:50]}", field)
    return value


def _check_model(model: Any, model_id: str) -> None:
    if model is None:
        return
    if not isinstance(model, str):
        raise _bad(f"model must be a string (this server serves {model_id!r})", "model")
    if model != model_id:
        raise RequestError(404, f"the model {model!r} does not exist; this server serves {model_id!r}", "model",
                           code="model_not_found")


def _check_n(n: Any) -> None:
    if not _is_int(n) or n != 1:
        raise _bad(f"n must be 1 (one completion per request), got {json.dumps(n)[:50]}", "n")


def _prompt(prompt: Any, config: GPTConfig, tokenizer: Tokenizer | None) -> list[int]:
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        if len(prompt) != 1:  # OpenAI's list of prompts
            raise _bad(f"prompt: one prompt per request, got a list of {len(prompt)}", "prompt")
        prompt = prompt[0]
    if prompt is None:
        raise _bad("prompt is required: a non-empty string or a list of token ids", "prompt")
    if isinstance(prompt, str):
        if tokenizer is None:
            raise _bad("prompt: this model has no tokenizer; give the prompt as a list of token ids", "prompt")
        ids = _encode(tokenizer, prompt, "prompt")
    elif isinstance(prompt, list):
        if not all(_is_int(t) for t in prompt):
            raise _bad("prompt must be a string or a list of integer token ids", "prompt")
        bad = [t for t in prompt if not 0 <= t < config.vocab_size]
        if bad:
            raise _bad(f"prompt: token id {bad[0]} is outside [0, {config.vocab_size})", "prompt")
        ids = list(prompt)
    else:
        raise _bad(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}", "prompt")
    if not ids:
        raise _bad("prompt must not be empty", "prompt")
    if len(ids) >= config.n_positions:
        raise _bad(f"prompt is {len(ids)} tokens; the context is {config.n_positions} tokens, and at least one "
                   "must be left to generate", "prompt")
    return ids


def _max_tokens(value: Any, prompt_length: int, limits: Limits) -> int:
    room = limits.config.n_positions - prompt_length
    if value is None:
        return max(1, min(DEFAULT_MAX_TOKENS, limits.max_tokens_cap, room))
    if not _is_int(value) or not 1 <= value <= limits.max_tokens_cap:
        raise _bad(f"max_tokens must be an integer in [1, {limits.max_tokens_cap}], got {json.dumps(value)[:50]}",
                   "max_tokens")
    if value > room:
        raise _bad(f"prompt ({prompt_length} tokens) + max_tokens ({value}) = {prompt_length + value} exceeds the "
                   f"context of {limits.config.n_positions} tokens; max_tokens may be at most {room}", "max_tokens")
    return value


def _stop(stop: Any, V: int, tokenizer: Tokenizer | None) -> list[int]:
    """Stop sequences as token ids: strings of exactly one token each, or token ids."""
    if stop is None:
        return []
    items = [stop] if isinstance(stop, (str, int)) and not isinstance(stop, bool) else stop
    if not isinstance(items, list) or not 1 <= len(items) <= MAX_STOP:
        raise _bad(f"stop must be a string, a token id, or a list of 1 to {MAX_STOP} of them", "stop")
    ids = []
    for item in items:
        if _is_int(item) and 0 <= item < V:
            ids.append(item)
        elif isinstance(item, str) and tokenizer is not None and len(_encode(tokenizer, item, "stop")) == 1:
            ids.append(_encode(tokenizer, item, "stop")[0])
        else:
            raise _bad(f"stop: {json.dumps(item)[:50]} is not a single-token string or a token id in [0, {V}) "
                       "(this server stops on single tokens)", "stop")
    return ids


def _stream_options(options: Any, stream: bool) -> bool:
    if options is None:
        return False
    if not stream:
        raise _bad("stream_options is only allowed with stream: true", "stream_options")
    if not isinstance(options, dict) or set(options) - {"include_usage"} or \
            not isinstance(options.get("include_usage", False), bool):
        raise _bad('stream_options must be {"include_usage": true|false}', "stream_options")
    return options.get("include_usage", False)
