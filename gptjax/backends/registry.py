"""Backends by name: the built-ins and the plug-ins registered under the `gptjax.backends` entry-point group
(`[project.entry-points."gptjax.backends"] mybackend = "mypackage.module:MyBackend"`, a Backend subclass)."""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import entry_points
from typing import Any

from gptjax.backends.base import Backend
from gptjax.config import GPTConfig
from gptjax.errors import GptjaxError

ENTRY_POINT_GROUP = "gptjax.backends"  # where plug-ins register (name = "module:BackendSubclass")
_BUILTIN = {
    "numpy": "gptjax.backends.numpy_ref:NumpyBackend",
    "jax": "gptjax.backends.jax:JaxBackend",
}


def registered() -> dict[str, list[str]]:
    """Backend name → the entry-point values that claim it (built-ins first and alone: no shadowing)."""
    found: dict[str, list[str]] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(ep.name, [])
        if ep.value not in found[ep.name]:
            found[ep.name].append(ep.value)
    return found | {name: [value] for name, value in _BUILTIN.items()}


def available_backends() -> list[str]:
    """Names get_backend accepts: the built-ins and those registered under the `gptjax.backends` entry points."""
    return sorted(registered())


def get_backend(name: str, config: GPTConfig, **options: Any) -> Backend:
    """An instance of the backend called `name`, bound to `config` (a model shape), with backend options."""
    registry = registered()
    if name not in registry:
        raise GptjaxError(f"unknown backend {name!r}; available: {sorted(registry)}")
    if len(registry[name]) > 1:
        raise GptjaxError(f"backend {name!r} is registered twice, by {registry[name]}; uninstall one")
    cls = load(name, registry[name][0])
    return cls(config, **options)


def load(name: str, value: str) -> type[Backend]:
    """The Backend subclass an entry-point value ("module:Class") names, or a GptjaxError saying why not."""
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
