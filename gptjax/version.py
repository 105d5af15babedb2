"""The package version (one place: gptjax/__init__ and the tracer read it; pyproject.toml repeats it)."""

__version__ = "0.1.0"
