"""The OpenAI-style request side: parsing a POST /v1/completions (/tokenize, /detokenize) body into a
`Completion` (one gptjax GenerationRequest per choice, each with its SamplingParams), and the error object.

Every bad field becomes a 400 with an OpenAI error body naming the field and what it allows, before any work is
queued. The ranges of sampling settings are SamplingParams' own (its SamplingError is mapped to that 400); this
module adds only what the HTTP API limits further: temperature <= 2, max_tokens up to a cap, n, prompt and stop
sizes, the JSON shapes.
"""

from __future__ import annotations

import json
import math
import secrets
from dataclasses import dataclass, replace
from typing import Any

from gptjax.checks import is_int, is_real
from gptjax.config import GPTConfig
from gptjax.generate import GenerationRequest, make_request
from gptjax.sampling import MAX_LOGIT_BIAS, SamplingError, SamplingParams
from gptjax.tokenizer import Tokenizer

FIELDS = ("model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream",
          "stream_options", "n", "best_of", "user", "echo", "logprobs", "presence_penalty", "frequency_penalty",
          "logit_bias")
DEFAULT_MAX_TOKENS = 16  # OpenAI's default
MAX_STOP = 4  # stop strings or token ids per request (OpenAI's limit)
MAX_STOP_BYTES = 256  # UTF-8 bytes per stop string
MAX_PROMPTS = 64  # prompts in one request
MAX_N = 16  # completions per prompt
MAX_CHOICES = 64  # prompts × n: the jobs one request may queue (also at most the queue's size)
MAX_LOGPROBS = 5  # top alternatives per token (OpenAI's limit)
MAX_TOKENIZE = 65536  # token ids one /tokenize answer holds (with token_strs: about 1 MB of JSON)
MAX_TEMPERATURE = 2.0  # OpenAI's limit (SamplingParams takes any finite temperature >= 0)
# What the API accepts in each number field of SamplingParams (its own range, within the limits above): the 400
# for a bad value says this.
ALLOWED = {"temperature": "a number in [0, 2] (0 means greedy)", "top_p": "a number in (0, 1]",
           "top_k": "an integer in [1, {V}] or null", "seed": "an integer in [0, 2**32) or null",
           "presence_penalty": "a number in [-2, 2]", "frequency_penalty": "a number in [-2, 2]"}


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
    max_choices: int = MAX_CHOICES  # prompts × n per request (the server's queue size when smaller)


@dataclass(frozen=True)
class Completion:
    """A validated completion request: one generation request (one row) per choice, plus how to answer.

    Choice c = p * n + j is prompt p's j-th sample; with a seed s it samples with seed (s + j) mod 2**32 (every
    prompt with the same seeds, as vLLM does), so each choice's tokens are `backend.generate` with that seed alone.
    `requests` is empty when max_tokens is 0 (echo only: score the prompts)."""

    prompts: list[list[int]]
    requests: list[GenerationRequest]
    n: int
    stream: bool
    include_usage: bool
    echo: bool = False
    logprobs: int | None = None  # top alternatives per token, or None: no log-probabilities
    stops: tuple[str, ...] = ()  # stop strings, matched on the decoded completion

    @property
    def choices(self) -> int:
        """Choices in the answer: prompts × n."""
        return len(self.prompts) * self.n


def parse_completion(body: bytes, limits: Limits, tokenizer: Tokenizer | None) -> Completion:
    """Parse and check a request body; a RequestError names the first bad field."""
    data = _fields(body, FIELDS)
    _check_model(data.get("model"), limits.model_id)
    _get(data, "user", str, "a string")
    echo = bool(_get(data, "echo", bool, "true or false"))
    logprobs = _logprobs(data.get("logprobs"))
    prompts = _prompts(data.get("prompt"), limits.config, tokenizer)
    n = _n(data, len(prompts), limits.max_choices)
    max_tokens = _max_tokens(data.get("max_tokens"), max(len(p) for p in prompts), limits, echo)
    if max_tokens == 0 and n != 1:  # nothing is sampled: n > 1 would return copies
        raise _bad("n must be 1 with max_tokens: 0 (nothing is sampled)", "n")
    stop_tokens, stops = _stop(data.get("stop"), limits.config.vocab_size, tokenizer)
    samplings = _sampling(data, stop_tokens, n, limits.config.vocab_size)
    stream = bool(_get(data, "stream", bool, "true or false"))
    include_usage = _stream_options(data.get("stream_options"), stream)
    requests = [make_request(limits.config, [prompt], max_tokens, samplings[j]) for prompt in prompts
                for j in range(n)] if max_tokens > 0 else []
    return Completion(prompts, requests, n, stream, include_usage, echo, logprobs, stops)


TOKENIZE_FIELDS = ("model", "prompt", "add_special_tokens", "return_token_strs")
DETOKENIZE_FIELDS = ("model", "tokens")


def parse_tokenize(body: bytes, limits: Limits, tokenizer: Tokenizer | None) -> tuple[list[int], bool]:
    """A POST /tokenize body (vLLM's: {"prompt": text}) → the prompt's token ids and whether each token's text
    is wanted too (return_token_strs). add_special_tokens changes nothing: GPT-2 adds none."""
    data = _fields(body, TOKENIZE_FIELDS)
    _check_model(data.get("model"), limits.model_id)
    _get(data, "add_special_tokens", bool, "true or false")
    strings = bool(_get(data, "return_token_strs", bool, "true or false"))
    prompt = data.get("prompt")
    if not isinstance(prompt, str):
        raise _bad(f"prompt is required: a string, got {json.dumps(prompt)[:50]}", "prompt")
    if tokenizer is None:
        raise _bad("prompt: this model has no tokenizer (it takes token ids only)", "prompt")
    ids = _encode(tokenizer, prompt, "prompt")
    if len(ids) > MAX_TOKENIZE:
        raise _bad(f"prompt is {len(ids)} tokens; /tokenize returns at most {MAX_TOKENIZE}", "prompt")
    return ids, strings


def parse_detokenize(body: bytes, limits: Limits, tokenizer: Tokenizer | None) -> list[int]:
    """A POST /detokenize body (vLLM's: {"tokens": [ids]}) → the checked token ids."""
    data = _fields(body, DETOKENIZE_FIELDS)
    _check_model(data.get("model"), limits.model_id)
    tokens, V = data.get("tokens"), limits.config.vocab_size
    if not isinstance(tokens, list) or not all(is_int(t) for t in tokens):
        raise _bad("tokens is required: a list of integer token ids", "tokens")
    bad = [t for t in tokens if not 0 <= t < V]
    if bad:
        raise _bad(f"tokens: token id {bad[0]} is outside [0, {V})", "tokens")
    if tokenizer is None:
        raise _bad("tokens: this model has no tokenizer to decode with", "tokens")
    return tokens


def _fields(body: bytes, allowed: tuple[str, ...]) -> dict[str, Any]:
    """The JSON object of a body whose keys are all allowed."""
    data = _json_object(body)
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise _bad(f"unknown field {unknown[0]!r}; allowed fields: {', '.join(allowed)}", unknown[0])
    return data


def _bad(message: str, param: str | None = None) -> RequestError:
    return RequestError(400, message, param)


def _encode(tokenizer: Any, text: str, field: str, name: str | None = None) -> list[int]:
    """Token ids of text, or a 400 for text UTF-8 cannot encode (a lone surrogate such as "\\ud800")."""
    try:
        return tokenizer.encode(text)
    except UnicodeEncodeError as e:
        raise _bad(f"{name or field} is not encodable text: {e.reason} at position {e.start}", field) from None


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


def _get(data: dict[str, Any], field: str, kind: type, allowed: str) -> Any:
    value = data.get(field)
    if value is not None and not isinstance(value, kind):
        raise _bad(f"{field} must be {allowed}, got {json.dumps(value)[:50]}", field)
    return value


def _logprobs(value: Any) -> int | None:
    if value is not None and (not is_int(value) or not 0 <= value <= MAX_LOGPROBS):
        raise _bad(f"logprobs must be an integer in [0, {MAX_LOGPROBS}] or null, got {json.dumps(value)[:50]}",
                   "logprobs")
    return value


def _check_model(model: Any, model_id: str) -> None:
    if model is None:
        return
    if not isinstance(model, str):
        raise _bad(f"model must be a string (this server serves {model_id!r})", "model")
    if model != model_id:
        raise RequestError(404, f"the model {model!r} does not exist; this server serves {model_id!r}", "model",
                           code="model_not_found")


def _n(data: dict[str, Any], prompts: int, max_choices: int) -> int:
    """n (completions per prompt); best_of only as n (this server returns every sample it draws)."""
    n = data.get("n", 1)
    if n is None:
        n = 1
    if not is_int(n) or not 1 <= n <= MAX_N:
        raise _bad(f"n must be an integer in [1, {MAX_N}], got {json.dumps(n)[:50]}", "n")
    best_of = data.get("best_of")
    if best_of is not None and (not is_int(best_of) or best_of != n):
        raise _bad(f"best_of must equal n ({n}) or be null (this server returns every sample), got "
                   f"{json.dumps(best_of)[:50]}", "best_of")
    if prompts * n > max_choices:
        raise _bad(f"n: {prompts} prompt(s) × n={n} = {prompts * n} completions; at most {max_choices} per request",
                   "n")
    return n


def _prompts(prompt: Any, config: GPTConfig, tokenizer: Tokenizer | None) -> list[list[int]]:
    """The prompts as token ids: a string, a list of token ids, or a list of strings or of token-id lists."""
    if prompt is None:
        raise _bad("prompt is required: a string, a list of token ids, or a list of either", "prompt")
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        if len(prompt) > MAX_PROMPTS:
            raise _bad(f"prompt: a list of {len(prompt)} prompts; at most {MAX_PROMPTS} per request", "prompt")
        return [_one_prompt(p, config, tokenizer, f"prompt[{i}]") for i, p in enumerate(prompt)]
    return [_one_prompt(prompt, config, tokenizer, "prompt")]


def _one_prompt(prompt: Any, config: GPTConfig, tokenizer: Tokenizer | None, name: str) -> list[int]:
    if isinstance(prompt, str):
        if tokenizer is None:
            raise _bad(f"{name}: this model has no tokenizer; give the prompt as a list of token ids", "prompt")
        ids = _encode(tokenizer, prompt, "prompt", name)
    elif isinstance(prompt, list):
        if not all(is_int(t) for t in prompt):
            raise _bad(f"{name} must be a string or a list of integer token ids (or a list of those)", "prompt")
        bad = [t for t in prompt if not 0 <= t < config.vocab_size]
        if bad:
            raise _bad(f"{name}: token id {bad[0]} is outside [0, {config.vocab_size})", "prompt")
        ids = list(prompt)
    else:
        raise _bad(f"{name} must be a string or a list of token ids, got {type(prompt).__name__}", "prompt")
    if not ids:
        raise _bad(f"{name} must not be empty", "prompt")
    if len(ids) > config.n_positions:
        raise _bad(f"{name} is {len(ids)} tokens; the context is {config.n_positions} tokens", "prompt")
    return ids


def _max_tokens(value: Any, longest: int, limits: Limits, echo: bool) -> int:
    """max_tokens: in [1, cap], or 0 with echo (score the prompt only); the longest prompt plus it must fit."""
    room = limits.config.n_positions - longest
    if value is None:
        if room < 1:
            raise _bad(f"prompt is {longest} tokens; the context is {limits.config.n_positions} tokens, and at least "
                       "one must be left to generate (or send max_tokens: 0 with echo: true to score it)", "prompt")
        return max(1, min(DEFAULT_MAX_TOKENS, limits.max_tokens_cap, room))
    low = 0 if echo else 1
    if not is_int(value) or not low <= value <= limits.max_tokens_cap:
        zero = "" if echo else " (0 only with echo: true)"
        raise _bad(f"max_tokens must be an integer in [{low}, {limits.max_tokens_cap}]{zero}, got "
                   f"{json.dumps(value)[:50]}", "max_tokens")
    if value > room:
        raise _bad(f"prompt ({longest} tokens) + max_tokens ({value}) = {longest + value} exceeds the "
                   f"context of {limits.config.n_positions} tokens; max_tokens may be at most {max(room, 0)}",
                   "max_tokens")
    return value


def _stop(stop: Any, V: int, tokenizer: Tokenizer | None) -> tuple[list[int], tuple[str, ...]]:
    """Stop token ids and stop strings. A string is matched on the decoded completion; one that is a single
    token is also a stop token, so the row stops on the device at once (same text either way)."""
    if stop is None:
        return [], ()
    items = [stop] if isinstance(stop, (str, int)) and not isinstance(stop, bool) else stop
    if not isinstance(items, list) or len(items) > MAX_STOP:
        raise _bad(f"stop must be a string, a token id, or a list of at most {MAX_STOP} of them", "stop")
    ids, strings = [], []
    for item in items:
        if is_int(item) and 0 <= item < V:
            ids.append(item)
        elif isinstance(item, str) and item:
            ids += _stop_string(item, tokenizer)
            strings.append(item)
        else:
            raise _bad(f"stop: {json.dumps(item)[:50]} is neither a non-empty string nor a token id in [0, {V})",
                       "stop")
    return ids, tuple(strings)


def _stop_string(item: str, tokenizer: Tokenizer | None) -> list[int]:
    """A stop string's token id when it is one token, else none; a 400 for one too long or without a tokenizer."""
    size = len(item.encode("utf-8", errors="surrogatepass"))
    if size > MAX_STOP_BYTES:
        raise _bad(f"stop: a stop string of {size} UTF-8 bytes; at most {MAX_STOP_BYTES}", "stop")
    if tokenizer is None:
        raise _bad("stop: this model has no tokenizer, so stop strings cannot be matched; give token ids", "stop")
    encoded = _encode(tokenizer, item, "stop")
    return encoded if len(encoded) == 1 else []


def _sampling(data: dict[str, Any], stop_tokens: list[int], n: int, V: int) -> list[SamplingParams]:
    """The SamplingParams of each prompt's samples 0..n-1, built once each: sample j draws with seed
    (seed + j) mod 2**32, or with a seed of its own when none is given. SamplingParams checks the ranges (its
    SamplingError becomes a 400 naming the field)."""
    seed = data.get("seed")
    try:
        first = SamplingParams(**_settings(data, V), stop_tokens=stop_tokens,
                               seed=secrets.randbelow(2**32) if seed is None else seed)
        first.check_vocab(V)
    except SamplingError as e:
        raise _sampling_error(e, data, V) from None
    return [first] + [replace(first, seed=secrets.randbelow(2**32) if seed is None else (seed + j) % 2**32)
                      for j in range(1, n)]


def _settings(data: dict[str, Any], V: int) -> dict[str, Any]:
    """The body's sampling fields as SamplingParams keywords (JSON numbers of float fields as floats; null: the
    default); a 400 over the one HTTP limit, temperature <= 2."""
    settings = {name: _as_float(data[name]) for name in ("temperature", "top_p", "presence_penalty",
                                                         "frequency_penalty") if data.get(name) is not None}
    if settings.get("top_p") == 1:  # the default: no nucleus, so no filtering pass to compile
        del settings["top_p"]
    temperature = settings.get("temperature")
    if is_real(temperature) and temperature > MAX_TEMPERATURE:
        raise _not_allowed("temperature", data, V)
    bias = data.get("logit_bias")
    return settings | {"top_k": data.get("top_k"),
                       "logit_bias": {k: _as_float(v) for k, v in bias.items()} if isinstance(bias, dict) else bias}


def _as_float(value: Any) -> Any:
    """A JSON integer as the float a float field reads (±inf beyond float64's range, as json reads 1e400: a JSON
    integer may have hundreds of digits); anything else as it is, for SamplingParams to check."""
    if not is_int(value):
        return value
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def _sampling_error(e: SamplingError, data: dict[str, Any], V: int) -> RequestError:
    """A failed SamplingParams check as the 400 naming the request's field and what the API accepts there."""
    if e.field in ALLOWED:
        return _not_allowed(e.field, data, V)
    if e.field == "logit_bias":
        return _bad(_bias_message(e, data.get("logit_bias"), V), "logit_bias")
    return _bad(str(e), "stop" if e.field == "stop_tokens" else e.field)


def _not_allowed(field: str, data: dict[str, Any], V: int) -> RequestError:
    """The 400 for a number field of SamplingParams: what the API accepts there, and what it got."""
    return _bad(f"{field} must be {ALLOWED[field].format(V=V)}, got {json.dumps(data.get(field))[:50]}", field)


def _bias_message(e: SamplingError, bias: Any, V: int) -> str:
    """What is wrong with a logit_bias (an object of "token id": bias entries), in the API's words."""
    if e.part is None:
        return f'logit_bias must be an object of at most {MAX_LOGIT_BIAS} "token id": bias entries'
    if e.part == "key":
        return f"logit_bias: key {json.dumps(str(e.key))[:50]} is not a token id in [0, {V})"
    if e.part == "bias":
        return (f"logit_bias: the bias of token {e.key} must be a number in [-100, 100], got "
                f"{json.dumps(bias[e.key])[:50]}")
    return str(e)  # a token id given twice ("5" and "05")


def _stream_options(options: Any, stream: bool) -> bool:
    if options is None:
        return False
    if not stream:
        raise _bad("stream_options is only allowed with stream: true", "stream_options")
    if not isinstance(options, dict) or set(options) - {"include_usage"} or \
            not isinstance(options.get("include_usage", False), bool):
        raise _bad('stream_options must be {"include_usage": true|false}', "stream_options")
    return options.get("include_usage", False)
