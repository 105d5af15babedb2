"""The int8 GEMM kernel (gptjax/_kernels/gemm_int8.cc), which gptjax_int8_matmul runs from kInt8GemmMinRows rows
of x on: exact int32 sums on shapes with tails of its tiles (8 rows x 48 outputs, 384 k's per block, 192 outputs
per work item), and the int8 / w8a8 prefill formulations on it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import needs_kernels

from gptjax import get_backend
from gptjax.backends import cpu_kernels
from gptjax.backends.jax import lowp
from gptjax.config import GPTConfig
from gptjax.weights import init_params

GEMM_MIN_ROWS = 64  # kInt8GemmMinRows in gemm_int8.h


def _exact(lead: tuple[int, ...], K: int, N: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = rng.integers(-128, 128, (*lead, K), dtype=np.int8)
    w = rng.integers(-128, 128, (N, K), dtype=np.int8)
    x[..., 0], w[0], w[-1, -1] = -128, 127, -128  # the extremes: x + 128 = 0 and the largest products
    got = np.asarray(jax.jit(cpu_kernels.int8_matmul)(x, w))
    assert got.dtype == np.int32 and got.shape == (*lead, N)
    np.testing.assert_array_equal(got, x.astype(np.int64) @ w.astype(np.int64).T)


@needs_kernels
@pytest.mark.parametrize("M", [GEMM_MIN_ROWS - 1, GEMM_MIN_ROWS, GEMM_MIN_ROWS + 1, 23, 128])
def test_rows_at_and_around_the_threshold_are_exact(M):
    # below it the GEMV blocks, from it the GEMM: the same integers; 771 = 2 blocks of k's with a 3-byte tail,
    # 209 outputs = one full work item (192) and a panel of 17 (one full vector of 16 and one output)
    _exact((M,), 771, 209, seed=M)


@needs_kernels
@pytest.mark.parametrize("lead,K,N", [((16,), 1, 1), ((17,), 5, 47), ((2, 9), 64, 49), ((3, 11), 385, 96),
                                      ((40,), 768, 2304), ((19,), 3072, 50), ((16,), 4096, 3), ((16,), 64, 64)])
def test_tails_of_every_tile_and_leading_dims_are_exact(lead, K, N):
    # K = 1 and 5: no whole 64-byte column of w (the 16 x 16 transpose is skipped); 385 = 384 + 1;
    # 4096: one page per row of w; 64 x 64 bytes of w and 16 x 64 int32 of out: exactly one page each
    _exact(lead, K, N, seed=K * N)


@needs_kernels
@pytest.mark.parametrize("value", [-128, 127])
def test_extreme_values_everywhere(value):
    # every product 128 * 128 (or 127 * 127) over K = 3072: 50,331,648, and the offset sums at their largest
    x = np.full((20, 3072), value, np.int8)
    w = np.full((50, 3072), -128, np.int8)
    got = np.asarray(cpu_kernels.int8_matmul(x, w))
    np.testing.assert_array_equal(got, np.full((20, 50), value * -128 * 3072, np.int64))


@needs_kernels
def test_no_rows_or_no_inputs():
    assert cpu_kernels.int8_matmul(jnp.zeros((0, 64), jnp.int8), jnp.ones((8, 64), jnp.int8)).shape == (0, 8)
    got = cpu_kernels.int8_matmul(jnp.ones((32, 0), jnp.int8), jnp.ones((8, 0), jnp.int8))
    np.testing.assert_array_equal(np.asarray(got), np.zeros((32, 8), np.int32))  # empty sums


@needs_kernels
@pytest.mark.parametrize("M", [4, 128])
def test_weight_only_prefill_is_within_its_bound_of_float64(M):
    # two int8 terms per token (lowp.split_rows): each input within sx / 508 (sx = max|x| / 127) of x, so each
    # output within sx / 508 * sum_k |w[n, k]| of x . w, plus float32 rounding; on the GEMV (M=4) and GEMM paths
    rng = np.random.default_rng(M)
    K, N = 768, 200
    x = (rng.standard_normal((1, M, K)) * rng.uniform(0.1, 10, (1, M, 1))).astype(np.float32)
    q = rng.integers(-127, 128, (N, K), dtype=np.int8)
    s = rng.uniform(1e-3, 1e-2, (N, 1)).astype(np.float32)
    got = np.asarray(jax.jit(lowp.int8_matmul_nk)(x, q, s), np.float64)
    w = q.astype(np.float64) * s  # [N, K] dequantised
    ref = x.astype(np.float64) @ w.T
    sx = np.abs(x).max(-1, keepdims=True).astype(np.float64) / 127
    bound = sx / 508 * np.abs(w).sum(-1) + 1e-6 * (np.abs(x).astype(np.float64) @ np.abs(w).T)
    assert np.all(np.abs(got - ref) <= bound)
    assert np.abs(got - ref).max() > 0.01 * bound.max()  # the bound is not vacuous: the error is of its order


CONFIG = GPTConfig(vocab_size=96, n_positions=80, n_embd=64, n_layer=2, n_head=4)
PARAMS = init_params(CONFIG, seed=5)
PROMPTS = np.random.default_rng(6).integers(0, 96, (2, 40))  # 80 rows of x per matmul: the GEMM path


@needs_kernels
@pytest.mark.parametrize("precision", ["int8", "w8a8"])
def test_prefill_on_the_gemm_matches_the_xla_formulation(precision, monkeypatch):
    # the same int32 sums as XLA's int8 dot, so the same logits but for float32 summation order downstream
    logits = {}
    for kernels in ("1", "0"):
        monkeypatch.setenv(cpu_kernels.ENV, kernels)
        b = get_backend("jax", CONFIG, precision=precision)
        w = b.prepare(PARAMS)
        assert w.cpu_kernels == (kernels == "1")
        logits[kernels] = b.forward(w, PROMPTS)
    np.testing.assert_allclose(logits["1"], logits["0"], atol=1e-4)
    assert np.abs(logits["1"]).max() > 0.1  # real logits, not zeros


@needs_kernels
def test_the_int8_kernel_peak_is_a_ceiling_and_rows_report_mfu_against_it():
    from gptjax.bench.ceilings import kernel_peaks
    from gptjax.bench.report import ceilings_table
    from gptjax.bench.suite import _row
    from gptjax.bench.workloads import Job, Shape

    peaks = kernel_peaks(64, runs=1)
    assert set(peaks) == {"bf16", "int8"} and peaks["int8"] > 0
    ceiling = {"matmul_n": 64, "matmul_flops": {"int8": 4e9, "fp32": 2e9}, "kernel_flops": {"int8": 8e9},
               "bandwidth_bytes": 2**20, "bandwidth": {"read": 8e9}}
    job = Job(call=lambda i: None, flops=10**9, bytes_moved=2e9, memory={"params_bytes": 4})
    row = _row({"precision": "w8a8"}, Shape("prefill", 1, seq=128), job, [1.0], ceiling, None)
    assert row["mfu_kernel"] == 0.125 and row["mfu_measured"] == 0.25
    assert _row({"precision": "fp32"}, Shape("prefill", 1, seq=128), job, [1.0], ceiling, None)["mfu_kernel"] is None
    assert "| gptjax int8 kernel (64³) | 0.008 TOP/s | – |" in ceilings_table(ceiling)
