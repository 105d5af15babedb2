"""The backend interface, the input checks every backend shares, and the registry (with entry points)."""

from __future__ import annotations

import abc
from importlib import import_module
from importlib.metadata import entry_points
from typing import Any, ClassVar

import numpy as np

from gptjax.config import GPTConfig
from gptjax.errors import GptjaxError
from gptjax.weights import Params, validate_params

ENTRY_POINT_GROUP = "gptjax.backends"
_BUILTIN = {
    "numpy": "gptjax.backends.numpy_ref:NumpyBackend",
    "jax": "gptjax.backends.jax_flax:JaxBackend",
}


class Backend(abc.ABC):
    """One way to run a GPT-2: bound to a config, fed canonical params, returning float32 NumPy logits.

    Subclasses implement `_convert` (canonical dict → their own layout, done once) and `_forward`.
    """

    name: ClassVar[str]
    options: ClassVar[dict[str, tuple]] = {}  # option name → allowed values (empty tuple: any)

    def __init__(self, config: GPTConfig, **options: Any) -> None:
        if not isinstance(config, GPTConfig):
            raise GptjaxError(f"config must be a GPTConfig, got {type(config).__name__}")
        for key, value in options.items():
            if key not in self.options:
                raise GptjaxError(f"backend {self.name!r} has no option {key!r}; options: {sorted(self.options)}")
            allowed = self.options[key]
            if allowed and value not in allowed:
                raise GptjaxError(f"backend {self.name!r}: {key}={value!r}; allowed: {list(allowed)}")
        self.config = config
        self._cache: tuple[Params, tuple[Any, ...], Any] | None = None

    def prepare(self, params: Params) -> Any:
        """Validate canonical params and convert them to this backend's layout (reusable across calls)."""
        validate_params(self.config, params)
        return self._convert(params)

    def forward(self, params: Params | Any, tokens: Any, *, last_only: bool = False) -> np.ndarray:
        """Logits, float32 [B, T, V] (or [B, V] at the last position with last_only) for int tokens [B, T].

        `params` is the canonical dict (converted once, cached while the same dict holds the same arrays)
        or what `prepare` returned.
        """
        tokens = validate_tokens(tokens, self.config)
        return self._forward(self._prepared(params), tokens, last_only)

    def _prepared(self, params: Params | Any) -> Any:
        """Converted weights for params: reused while the same dict holds the same array objects
        (the cache keeps those arrays alive, so their identities cannot be recycled). In-place writes
        into an array are not seen: call prepare() after them."""
        if not isinstance(params, dict):
            return params
        arrays = tuple(params.values())
        cached = self._cache
        if cached is None or cached[0] is not params or len(cached[1]) != len(arrays) or any(
                a is not b for a, b in zip(cached[1], arrays)):
            self._cache = cached = (params, arrays, self.prepare(params))
        return cached[2]

    @abc.abstractmethod
    def _convert(self, params: Params) -> Any: ...

    @abc.abstractmethod
    def _forward(self, weights: Any, tokens: np.ndarray, last_only: bool) -> np.ndarray: ...


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


def _registry() -> dict[str, str]:
    found = {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}
    return {**found, **_BUILTIN}  # built-in names cannot be shadowed by a plugin


def available_backends() -> list[str]:
    """Names get_backend accepts: the built-ins and those registered under the `gptjax.backends` entry points."""
    return sorted(_registry())


def get_backend(name: str, config: GPTConfig, **options: Any) -> Backend:
    """An instance of the backend called `name`, bound to `config`, with backend options."""
    registry = _registry()
    if name not in registry:
        raise GptjaxError(f"unknown backend {name!r}; available: {sorted(registry)}")
    module, _, attr = registry[name].partition(":")
    cls = getattr(import_module(module), attr)
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise GptjaxError(f"backend {name!r} ({registry[name]}) is not a gptjax.backends.Backend subclass")
    return cls(config, **options)
