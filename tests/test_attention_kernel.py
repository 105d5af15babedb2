"""gptjax's causal self-attention kernel (gptjax/_kernels/attention.cc): the model's attention without a cache
within float32 rounding, causal to the bit, nothing read or written past its buffers; and the models that use it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import needs_kernels
from flax import nnx

from gptjax.backends import cpu_kernels
from gptjax.backends.jax import model
from gptjax.backends.jax.bf16_train import training_layers
from gptjax.backends.jax.convert import build
from gptjax.config import GPTConfig
from gptjax.weights import init_params

kernel = jax.jit(cpu_kernels.causal_attention)
xla = jax.jit(model.causal_attention)


def _qkv(B: int, T: int, H: int, K: int, scale: float = 1.0, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((B, T, 3, H, K)) * scale).astype(np.float32)


@needs_kernels
@pytest.mark.parametrize("B,T,H,K", [
    (1, 1, 1, 1),      # one query, one key
    (2, 7, 3, 5),      # T and K below every tile
    (1, 33, 2, 16),    # one query past a 32-key tile and past four 8-query tiles
    (2, 100, 3, 64),   # gpt2's head size, tails in T
    (1, 70, 2, 70),    # K past two 32-lane blocks by 6
    (1, 16, 2, 64),    # qkv 24 KiB and out 8 KiB: both end on a page boundary
])
def test_kernel_matches_the_xla_attention(B, T, H, K):
    for scale in (1.0, 4.0):  # scale 4: scores up to ~100, softmax rows near one-hot
        qkv = _qkv(B, T, H, K, scale)
        got, want = np.asarray(kernel(qkv)), np.asarray(xla(qkv))
        assert got.shape == (B, T, H, K)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * scale)


@needs_kernels
def test_kernel_is_causal_to_the_bit():
    qkv = _qkv(2, 45, 2, 24)
    out = np.asarray(kernel(qkv))
    changed = qkv.copy()
    changed[:, 20:] = 1e3  # every token from 20 on: queries, keys and values
    np.testing.assert_array_equal(np.asarray(kernel(changed))[:, :20], out[:, :20])
    # the first token attends only to itself: probability exactly 1, its own value
    np.testing.assert_array_equal(out[:, 0], qkv[:, 0, 2])


@needs_kernels
def test_kernel_refuses_shapes_it_would_overrun():
    with pytest.raises(ValueError, match=r"qkv \[B, T, 3, H, K\] expected, got \(2, 5, 2, 4, 8\)"):
        cpu_kernels.causal_attention(jnp.zeros((2, 5, 2, 4, 8)))
    with pytest.raises(Exception, match=r"out \[B, T, H, K\] expected"):
        jax.ffi.ffi_call("gptjax_causal_attention", jax.ShapeDtypeStruct((2, 9, 4, 8), jnp.float32))(
            jnp.zeros((2, 5, 3, 4, 8))).block_until_ready()


TINY = GPTConfig(vocab_size=96, n_positions=64, n_embd=48, n_layer=2, n_head=3)


@needs_kernels
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_models_on_the_kernels_run_it_and_training_models_do_not(precision):
    from gptjax.quantize import for_precision

    params = for_precision(init_params(TINY, seed=1), TINY, precision)
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 96, (2, 40)))
    on, off = (build(TINY, params, precision, cpu_kernels=k) for k in (True, False))
    hlo = jax.jit(lambda m, t: m(t)).lower(on, tokens).as_text()
    assert "gptjax_causal_attention" in hlo
    assert "gptjax_causal_attention" not in jax.jit(lambda m, t: m(t)).lower(off, tokens).as_text()
    np.testing.assert_allclose(np.asarray(nnx.jit(lambda m, t: m(t))(on, tokens)),
                               np.asarray(nnx.jit(lambda m, t: m(t))(off, tokens)), atol=1e-5 if precision == "fp32"
                               else 2e-3)
    # the kernel has no backward pass: training models keep XLA's attention, which jax.grad differentiates
    assert training_layers(precision).attention() is model.causal_attention
