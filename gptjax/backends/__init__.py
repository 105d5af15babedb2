"""Pluggable backends: `get_backend(name, config, **options)`; plugins register under the `gptjax.backends`
entry-point group with a `Backend` subclass."""

from gptjax.backends.base import Backend, validate_tokens
from gptjax.backends.registry import available_backends, get_backend

__all__ = ["Backend", "available_backends", "get_backend", "validate_tokens"]
