"""The GEMM-shaped bf16 kernel (gptjax/_kernels/gemm_bf16.cc, gptjax_bf16_matmul from 128 rows of x) against a
float64 reference of the bfloat16-rounded inputs, and bf16 training on it (backends/jax/bf16_train.py): gradients
against jax.grad of the float32 model, one step against XLA's bf16 path."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from conftest import needs_kernels

from gptjax.backends import cpu_kernels
from gptjax.backends.jax import bf16_train
from gptjax.backends.jax.model import FloatLayers
from gptjax.config import GPTConfig
from gptjax.train import TrainConfig, create_state, export_params, loss_fn, train_step

GEMM_ROWS = 128  # gemm_bf16.h: kBf16GemmMinRows
CONFIG = GPTConfig(vocab_size=256, n_positions=64, n_layer=2, n_head=2, n_embd=32)


def _check(x: np.ndarray, w: np.ndarray, in_major: bool = False) -> None:
    """The kernel's x [..., K] @ w [N, K].T within float32 rounding of the exact sums of the bf16 inputs; with
    in_major, gptjax_bf16_matmul_kn's x @ w stored [K, N] (the same w, transposed in memory)."""
    if in_major:
        got = np.asarray(jax.jit(cpu_kernels.bf16_matmul_kn)(x, np.ascontiguousarray(w.T)))
    else:
        got = np.asarray(jax.jit(cpu_kernels.bf16_matmul)(x, w))
    xb = x.astype(ml_dtypes.bfloat16).astype(np.float64)
    wb = w.astype(np.float64)
    ref = xb @ wb.T
    bound = 1e-6 * (np.abs(xb) @ np.abs(wb).T) * 8 + 1e-30  # float32 sums of K terms, in another order
    assert got.dtype == np.float32 and got.shape == (*x.shape[:-1], w.shape[0])
    finite = np.isfinite(ref)
    assert np.all(np.abs(got[finite] - ref[finite]) <= bound[finite])
    np.testing.assert_array_equal(got[~finite], ref[~finite])  # inf and NaN where the exact sums are


def _case(shape: tuple[int, ...], N: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape).astype(np.float32),
            rng.standard_normal((N, shape[-1])).astype(ml_dtypes.bfloat16))


@needs_kernels
@pytest.mark.parametrize("M,K,N", [
    (GEMM_ROWS - 1, 768, 33), (GEMM_ROWS, 768, 33), (GEMM_ROWS + 1, 77, 65),  # GEMV | GEMM, the threshold
    (GEMM_ROWS + 11, 1, 17), (300, 3, 1), (GEMM_ROWS, 1025, 31),  # K = 1, odd K, odd K past a 512-input block
    (GEMM_ROWS + 13, 512, 96), (1, 5, 3), (8, 64, 40),  # a tile tail of rows; decode's rows (the GEMV)
    (GEMM_ROWS, 2048, 64),  # rows of 4096 bytes: x [128, 2048] and w [64, 2048] end on a page boundary
    (GEMM_ROWS + 1, 2048, 31),  # the same rows split over x (M > 2N, w packed once), ending on a page boundary
])
def test_bf16_matmul_within_float32_rounding(M, K, N):
    _check(*_case((M, K), N, seed=M * K + N))


@needs_kernels
@pytest.mark.parametrize("M,K,N", [
    (1, 1, 1), (3, 5, 7), (16, 33, 17),  # any rows: the in-major matmul is always the GEMM
    (GEMM_ROWS + 1, 77, 65), (GEMM_ROWS, 1025, 31),  # odd K (a half pair), past a 512-input block; N tails
    (GEMM_ROWS + 13, 512, 96), (40, 2048, 64),  # w [2048, 64]: rows of 128 bytes, 256 KB, ends on a page boundary
    (301, 77, 33),  # M > 2N and a small w: packed once, the work split over rows of x (a weight gradient's shape)
])
def test_bf16_matmul_over_in_major_weights_within_float32_rounding(M, K, N):
    _check(*_case((M, K), N, seed=M * K + N + 1), in_major=True)


@needs_kernels
@pytest.mark.parametrize("in_major", [False, True])
def test_gemm_takes_leading_dims_and_extremes(in_major):
    x, w = _case((2, 150, 70), 45, seed=3)  # 300 rows in two leading dims
    x[0, 0] = 2.0 ** 60
    w[0] = 2.0 ** 60  # a product of 2^120: finite in float32
    x[0, 1, :] = 0.0
    x[1, 2, 69] = np.inf  # the odd K's last input: inf times w's last column, the padding half stays 0
    w[1, 69] = -1.0
    x[1, 3, 5] = np.nan
    _check(x, w, in_major)


@needs_kernels
@pytest.mark.parametrize("M,K,N", [
    (1, 1, 1), (13, 5, 17),  # one K block: each tile rounds as it stores
    (97, 1025, 33),  # w packed once (M > 2N): every K summed in registers, rounded as stored
    (200, 600, 130),  # K past a 512-input block: float32 scratch per 96 rows, M and N tails
    (40, 2048, 64),  # the scratch path over rows that end on a page boundary
])
def test_bfloat16_sums_are_the_float32_sums_rounded_as_astype_rounds(M, K, N):
    x, w = _case((M, K), N, seed=M + K + N)
    w = np.ascontiguousarray(w.T)  # [K, N]: the in-major weights (a weight gradient's dy)
    x[0, 0] = np.nan
    f = jax.jit(cpu_kernels.bf16_matmul_kn, static_argnums=2)
    want = np.asarray(f(x, w, jnp.float32).astype(jnp.bfloat16))  # XLA's convert of the kernel's float32 sums
    got = np.asarray(f(x, w, jnp.bfloat16))
    assert got.dtype == ml_dtypes.bfloat16 and got.shape == (M, N)
    np.testing.assert_array_equal(got.view(np.uint16)[1:], want.view(np.uint16)[1:])  # bit for bit
    assert np.isnan(got[0].astype(np.float32)).all()  # a NaN input row stays NaN
    with pytest.raises(ValueError, match="out_dtype float32 or bfloat16 expected, got int32"):
        cpu_kernels.bf16_matmul_kn(x, w, jnp.int32)


@needs_kernels
def test_the_lookup_gradient_is_added_into_the_heads_summing_each_ids_rows_in_float32_rounded_once():
    rng = np.random.default_rng(7)
    V, D = 50, 37  # D: two 16-lane blocks and a tail
    ids = np.array([[3, 7, 3, -1], [49, 3, 0, 60]], np.int32)  # repeats, a negative id (49), one past V (-> 49)
    g = rng.standard_normal((2, 4, D)).astype(np.float32) * np.float32(1 + 2 ** -9)  # sums that need rounding
    g[0, 1, :2] = [np.inf, np.nan]  # id 7 alone: inf and NaN written as such
    base = rng.standard_normal((V, D)).astype(ml_dtypes.bfloat16)  # the head's gradient
    got = np.asarray(jax.jit(cpu_kernels.bf16_rows_add)(base, ids, g))
    rows = np.clip(np.where(ids < 0, ids + V, ids), 0, V - 1).ravel()
    want = base.astype(np.float32)
    for r, row in zip(rows, g.reshape(-1, D)):
        want[r] += row  # float32 sums (in the ids' order, as the kernel adds them)
    np.testing.assert_array_equal(got.view(np.uint16), want.astype(ml_dtypes.bfloat16).view(np.uint16))
    untouched = np.setdiff1d(np.arange(V), rows)
    np.testing.assert_array_equal(got[untouched].view(np.uint16), base[untouched].view(np.uint16))

    table = jnp.asarray(rng.standard_normal((V, D)), jnp.bfloat16)  # the custom_vjp, tied and untied
    head = jnp.asarray(rng.standard_normal((2, 4, V)), jnp.float32)
    ids[1, 3] = 5  # in range: XLA's scatter drops an id past V that its gather clamped
    rows = np.where(ids < 0, ids + V, ids).ravel()

    def tied(t):
        rows16, w = bf16_train.kernel_lookup(t, ids)
        return jnp.sum(rows16 * g) + jnp.sum(jnp.einsum("btd,vd->btv", rows16, w.astype(jnp.float32)) * head)

    def reference(t):  # the same function through XLA's gather and its transpose
        rows16 = t[ids].astype(jnp.float32)
        return jnp.sum(rows16 * g) + jnp.sum(jnp.einsum("btd,vd->btv", rows16, t.astype(jnp.float32)) * head)

    g[0, 1, :2] = 0.0  # finite cotangents from here
    grad, want_grad = jax.grad(tied)(table), jax.grad(reference)(table)
    assert grad.dtype == jnp.bfloat16
    # both bf16 sums of terms up to ~20 (an ulp of 2^-4 at 16): the head's part missing would be off by ~10
    np.testing.assert_allclose(np.asarray(grad, np.float32), np.asarray(want_grad, np.float32), rtol=2e-2, atol=0.15)
    untied = jax.grad(lambda t: jnp.sum(bf16_train.kernel_lookup(t, ids)[0] * g))(table)  # the head's part: zeros
    want_untied = np.zeros((V, D), np.float32)
    for r, row in zip(rows, g.reshape(-1, D)):
        want_untied[r] += row
    np.testing.assert_array_equal(np.asarray(untied).view(np.uint16),
                                  want_untied.astype(ml_dtypes.bfloat16).view(np.uint16))
    with pytest.raises(ValueError, match=r"base \[V, D\] \(V >= 1\), ids \[...\] and g \[..., D\] expected"):
        cpu_kernels.bf16_rows_add(base, ids, g[:, :3])


def _tiny_state(compute_dtype: str, mesh: object = None):
    tc = TrainConfig(batch_size=4, seq_len=64, compute_dtype=compute_dtype, warmup_steps=0, lr=1e-3)
    return tc, *create_state(CONFIG, tc, mesh=mesh)


def _batch(seed: int) -> tuple[jax.Array, jax.Array]:
    tokens = jax.random.randint(jax.random.key(seed), (4, 65), 0, CONFIG.vocab_size)  # B T = 256 rows: the GEMM
    return tokens[:, :-1], tokens[:, 1:]


@needs_kernels
def test_training_layers_choose_the_kernels_only_for_bf16_without_a_mesh():
    assert type(bf16_train.training_layers("bf16")) is bf16_train.KernelTrainingLayers
    assert type(bf16_train.training_layers("fp32")) is FloatLayers
    assert type(bf16_train.training_layers("bf16", mesh=object())) is FloatLayers


@needs_kernels
def test_kernel_gradients_match_jax_grad_of_the_float32_model():
    _, graphdef, state = _tiny_state("bf16")
    _, graphdef32, _ = _tiny_state("fp32")
    assert "kernel_matmul" in str(jax.make_jaxpr(lambda w: loss_fn(w, graphdef, *_batch(0), "bf16"))(state.params))
    x, y = _batch(0)
    loss16, g16 = jax.value_and_grad(loss_fn)(state.params, graphdef, x, y, "bf16")
    loss32, g32 = jax.value_and_grad(loss_fn)(state.params, graphdef32, x, y, "fp32")
    assert abs(float(loss16) - float(loss32)) < 1e-2 * float(loss32)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g16), jax.tree.leaves(g32)):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert a.dtype == b.dtype and a.shape == b.shape
        # bf16 operands (8 significant bits) in every matmul of the forward and backward pass
        assert np.linalg.norm(a - b) <= 3e-2 * np.linalg.norm(b) + 1e-7, jax.tree_util.keystr(path)


@needs_kernels
def test_a_bf16_step_on_the_kernels_matches_xlas_bf16_path(monkeypatch):
    tc, graphdef, state = _tiny_state("bf16")
    with monkeypatch.context() as m:
        m.setattr(bf16_train.cpu_kernels, "available", lambda: False)  # XLA's bf16 dots: the path without kernels
        _, graphdef_xla, state_xla = _tiny_state("bf16")
    assert graphdef != graphdef_xla
    x, y = _batch(1)
    new, metrics = train_step(graphdef, tc, state, x[None], y[None])
    new_xla, metrics_xla = train_step(graphdef_xla, tc, state_xla, x[None], y[None])
    assert abs(float(metrics.loss) - float(metrics_xla.loss)) < 2e-3 * float(metrics_xla.loss)
    assert abs(float(metrics.grad_norm) - float(metrics_xla.grad_norm)) < 2e-2 * float(metrics_xla.grad_norm)
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(new.params))  # master weights stay float32
    d = np.concatenate([np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).ravel()
                        for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(new_xla.params))])
    # AdamW's first update is about lr * sign(g): a gradient near 0 may take the other sign (2 lr apart)
    assert d.max() <= 2.1 * tc.lr and np.mean(d > 1e-4) < 0.01
    exported = export_params(graphdef, new.params)  # the kernel-trained model exports as any float model
    np.testing.assert_array_equal(exported["wte.weight"], np.asarray(new.params["wte"]["embedding"][...]))


@needs_kernels
def test_the_suite_measures_the_kernels_peak_only_where_they_run(monkeypatch):
    from gptjax.bench.ceilings import kernel_peaks

    peaks = kernel_peaks(64, runs=1)
    assert set(peaks) == {"bf16", "int8"} and peaks["bf16"] > 0
    monkeypatch.setenv(cpu_kernels.ENV, "0")
    assert kernel_peaks(64, runs=1) == {}
