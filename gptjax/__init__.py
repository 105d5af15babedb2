"""gptjax: GPT-2 twice, as readable NumPy and as a jit-compiled Flax NNX model, with every performance lever
measurable."""

from gptjax.backends import Backend, available_backends, get_backend
from gptjax.config import PRESETS, GPTConfig, get_preset
from gptjax.errors import GptjaxError
from gptjax.sampling import SamplingParams
from gptjax.tokenizer import ByteTokenizer, load_tokenizer
from gptjax.version import __version__
from gptjax.weights import init_params, load_checkpoint, param_shapes, save_checkpoint, validate_params

__all__ = [
    "PRESETS", "Backend", "ByteTokenizer", "GPTConfig", "GptjaxError", "SamplingParams", "available_backends",
    "get_backend", "get_preset", "init_params", "load_checkpoint", "load_tokenizer", "param_shapes", "save_checkpoint",
    "validate_params", "__version__",
]


def _warn_if_kernels_unbuilt() -> None:
    """Say once, loudly, that a source checkout runs without its compiled CPU kernels (and how to build them)."""
    import importlib.util

    if importlib.util.find_spec("gptjax._cpu_kernels") is not None:
        return  # the common case decided without importing cpu_kernels (and jax with it: `gptjax --help` stays fast)
    import warnings

    from gptjax.backends.cpu_kernels import build_warning

    message = build_warning()
    if message:
        warnings.warn(message, RuntimeWarning, stacklevel=3)


_warn_if_kernels_unbuilt()
