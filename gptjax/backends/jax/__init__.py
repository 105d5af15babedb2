"""The JAX backend, in the order a reader meets it: model.py (the float GPT-2 in Flax NNX, top to bottom),
kv.py (the KV cache types), layers.py + lowp.py (reduced-precision weight modules and their matmuls),
convert.py (params -> the model for a precision; the CPU-kernel choice), decode.py (prefill and the jitted
decode loop), backend.py (JaxBackend) and session.py (continuous batching)."""

from gptjax.backends.jax.backend import JaxBackend
from gptjax.backends.jax.convert import JaxWeights, build
from gptjax.backends.jax.decode import bucket_length
from gptjax.backends.jax.kv import KVCache, Masks
from gptjax.backends.jax.model import GPT, to_params

__all__ = ["GPT", "JaxBackend", "JaxWeights", "KVCache", "Masks", "bucket_length", "build", "to_params"]
