"""gptjax's CPU kernels (gptjax/_kernels/cpu_matmul.cc through the XLA FFI): exact int8 sums, bfloat16 products
accumulated in float32, bfloat16 rows; and the JAX backend's use of them (the same numbers as the pure-XLA
formulations, nothing converted per decode call)."""

from __future__ import annotations

import platform
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from conftest import needs_kernels

from gptjax import get_backend
from gptjax.backends import cpu_kernels
from gptjax.config import GPTConfig
from gptjax.sampling import GREEDY
from gptjax.weights import init_params

CPU_OK = platform.machine() in ("x86_64", "AMD64")


def test_the_kernels_are_built_by_the_install():
    # `pip install` compiles them (setup.py); .ci/run installs g++ first, so CI always has them
    if not CPU_OK:
        pytest.skip(f"the kernels target x86-64, not {platform.machine()}")
    from gptjax import _cpu_kernels

    assert set(_cpu_kernels.targets()) == {"gptjax_int8_matmul", "gptjax_int8_grouped_matmul", "gptjax_bf16_matmul",
                                           "gptjax_bf16_matmul_kn",
                                           "gptjax_bf16_rows", "gptjax_kv_scores_int8", "gptjax_kv_mix_int8",
                                           "gptjax_kv_scores_bf16", "gptjax_kv_mix_bf16", "gptjax_int4_matmul",
                                           "gptjax_causal_attention", "gptjax_adamw", "gptjax_bf16_rows_add"}


@needs_kernels
@pytest.mark.parametrize("lead,K,N", [((1,), 768, 2304), ((3,), 70, 13), ((16,), 200, 67), ((2, 5), 64, 64),
                                      ((2, 1), 5, 1), ((37,), 129, 9)])
def test_int8_matmul_is_exact(lead, K, N):
    rng = np.random.default_rng(K * N)
    x = rng.integers(-128, 128, (*lead, K), dtype=np.int8)
    w = rng.integers(-128, 128, (N, K), dtype=np.int8)
    w[0] = 127
    x[..., 0] = -128  # the extremes: x + 128 = 0 and the largest products
    got = np.asarray(jax.jit(cpu_kernels.int8_matmul)(x, w))
    assert got.dtype == np.int32 and got.shape == (*lead, N)
    np.testing.assert_array_equal(got, x.astype(np.int64) @ w.astype(np.int64).T)


@needs_kernels
@pytest.mark.parametrize("lead,K,N,G", [((1,), 768, 2304, 6), ((3,), 128, 13, 8), ((16,), 96, 67, 2),
                                        ((2, 5), 64, 64, 1), ((37,), 192, 9, 3)])
def test_int8_grouped_matmul_scales_each_groups_exact_sum(lead, K, N, G):
    rng = np.random.default_rng(K * N + G)
    x = rng.integers(-128, 128, (*lead, K), dtype=np.int8)
    w = rng.integers(-128, 128, (N, K), dtype=np.int8)
    ws = rng.uniform(0.001, 0.01, (N, G)).astype(np.float32)
    xs = rng.uniform(0.5, 2, (*lead, G)).astype(np.float32)
    got = np.asarray(jax.jit(cpu_kernels.int8_grouped_matmul)(x, w, ws, xs))
    sums = np.einsum("...gi,ngi->...ng", x.reshape(*lead, G, -1).astype(np.int64),
                     w.reshape(N, G, -1).astype(np.int64))  # exact [..., N, G]
    abs_sums = np.einsum("...gi,ngi->...ng", np.abs(x.reshape(*lead, G, -1).astype(np.int64)),
                         np.abs(w.reshape(N, G, -1).astype(np.int64)))
    scales = ws.astype(np.float64) * xs[..., None, :].astype(np.float64)  # [..., N, G]
    assert got.dtype == np.float32 and got.shape == (*lead, N)
    # float32 products and sums of the per-lane partial sums: a few units of 2^-24 of sum |x w| * scales
    assert np.all(np.abs(got - (sums * scales).sum(-1)) <= 1e-6 * (abs_sums * scales).sum(-1))


@needs_kernels
@pytest.mark.parametrize("lead,K,N", [((1,), 768, 2304), ((3,), 70, 13), ((9,), 40, 67), ((2, 2), 31, 5)])
def test_bf16_matmul_accumulates_in_float32(lead, K, N):
    rng = np.random.default_rng(K + N)
    x = rng.standard_normal((*lead, K)).astype(np.float32)
    w = rng.standard_normal((N, K)).astype(ml_dtypes.bfloat16)
    got = np.asarray(jax.jit(cpu_kernels.bf16_matmul)(x, w))
    xb = x.astype(ml_dtypes.bfloat16).astype(np.float64)  # x rounded to bfloat16, exact products
    ref = xb @ w.astype(np.float64).T
    bound = 1e-6 * (np.abs(xb) @ np.abs(w.astype(np.float64)).T) + 1e-30  # float32 sums of K terms
    assert got.dtype == np.float32 and np.all(np.abs(got - ref) <= bound * 8)


@needs_kernels
def test_bf16_rows_equal_the_float32_rows_and_clamp_like_xla():
    table = np.random.default_rng(1).standard_normal((11, 7)).astype(ml_dtypes.bfloat16)
    ids = np.array([[0, 10, 3], [5, 5, 12]], np.int32)
    got = np.asarray(jax.jit(cpu_kernels.bf16_rows)(table, ids))
    np.testing.assert_array_equal(got, table.astype(np.float32)[np.minimum(ids, 10)])


@needs_kernels
@pytest.mark.parametrize("kind", ["int8", "bf16"])
@pytest.mark.parametrize("B,H,T,S,K", [(2, 3, 1, 37, 64), (1, 2, 3, 5, 20), (3, 1, 2, 16, 16)])
def test_kv_kernels_read_the_stored_cache(kind, B, H, T, S, K):
    rng = np.random.default_rng(S * K + T)
    if kind == "int8":
        cache = rng.integers(-127, 128, (B, H, S, K), dtype=np.int8)
        values = cache.astype(np.float64)
    else:
        as_bf16 = rng.standard_normal((B, H, S, K)).astype(ml_dtypes.bfloat16)
        cache, values = as_bf16.view(np.uint16), as_bf16.astype(np.float64)  # bf16 bits, as a KV cache holds them
    q = rng.standard_normal((B, H, T, K)).astype(np.float32)
    p = rng.uniform(0, 1, (B, H, T, S)).astype(np.float32)
    scores = np.asarray(jax.jit(cpu_kernels.kv_scores)(q, cache))
    mix = np.asarray(jax.jit(cpu_kernels.kv_mix)(p, cache))
    ref_scores = np.einsum("bhtk,bhsk->bhts", q.astype(np.float64), values)
    ref_mix = np.einsum("bhts,bhsk->bhtk", p.astype(np.float64), values)
    bound_s = 1e-6 * np.einsum("bhtk,bhsk->bhts", np.abs(q.astype(np.float64)), np.abs(values)) + 1e-30
    bound_m = 1e-6 * np.einsum("bhts,bhsk->bhtk", p.astype(np.float64), np.abs(values)) + 1e-30
    assert scores.shape == (B, H, T, S) and mix.shape == (B, H, T, K)
    assert np.all(np.abs(scores - ref_scores) <= bound_s) and np.all(np.abs(mix - ref_mix) <= bound_m)
    with pytest.raises(ValueError, match="int8 or uint16 cache expected"):
        cpu_kernels.kv_scores(q, cache.astype(np.float32))


@needs_kernels
def test_kernels_run_inside_jitted_loops():
    # the decode loop calls them from a while_loop body; results must not depend on where they run
    rng = np.random.default_rng(2)
    x = rng.integers(-127, 128, (4, 96), dtype=np.int8)
    w = jnp.asarray(rng.integers(-127, 128, (40, 96), dtype=np.int8))

    def body(i, acc):
        return acc + cpu_kernels.int8_matmul(jnp.roll(x, i, axis=0), w)

    got = jax.jit(lambda: jax.lax.fori_loop(0, 4, body, jnp.zeros((4, 40), jnp.int32)))()
    ref = sum(np.roll(x, i, axis=0).astype(np.int64) @ np.asarray(w, np.int64).T for i in range(4))
    np.testing.assert_array_equal(np.asarray(got), ref)


def test_bad_shapes_name_both_shapes():
    with pytest.raises(ValueError, match=r"\(2, 5\) and \(3, 4\)"):
        cpu_kernels.int8_matmul(jnp.zeros((2, 5), jnp.int8), jnp.zeros((3, 4), jnp.int8))
    with pytest.raises(ValueError, match=r"w \[K, N\] expected, got \(2, 5\) and \(4, 5\)"):
        cpu_kernels.bf16_matmul_kn(jnp.zeros((2, 5)), jnp.zeros((4, 5)))


# ---- the JAX backend on the kernels
CONFIG = GPTConfig(vocab_size=96, n_positions=80, n_embd=64, n_layer=2, n_head=4)
PARAMS = init_params(CONFIG, seed=3)
TOKENS = np.random.default_rng(4).integers(0, 96, (2, 24))


def _backend(precision: str, kernels: bool, monkeypatch, **options):
    monkeypatch.setenv(cpu_kernels.ENV, "1" if kernels else "0")
    b = get_backend("jax", CONFIG, precision=precision, **options)
    return b, b.prepare(PARAMS)


@pytest.mark.slow
@needs_kernels
@pytest.mark.parametrize("precision,options,atol", [("fp32", {}, 1e-5), ("bf16", {}, 2e-3), ("int8", {}, 1e-3),
                                                    ("w8a8", {}, 1e-3),
                                                    ("int8", {"group_size": 16}, 1e-3),
                                                    ("w8a8", {"group_size": 32}, 1e-3),
                                                    ("int8", {"kv_cache": "int8"}, 1e-3),
                                                    ("fp32", {"kv_cache": "bf16"}, 1e-4),
                                                    ("fp32", {"kv_cache": "int8"}, 1e-4)])
def test_backend_on_the_kernels_matches_the_xla_formulation(precision, options, atol, monkeypatch):
    b, w = _backend(precision, True, monkeypatch, **options)
    assert w.cpu_kernels
    b0, w0 = _backend(precision, False, monkeypatch, **options)
    # (the forward pass has no cache; generate() below decodes through it, greedy, on both formulations)
    assert not w0.cpu_kernels
    # per-channel int8 / w8a8 matmuls give the very same int32 sums; the tied head's formulation differs (the
    # kernel feeds it x's two int8 terms where XLA dequantises the table), and so does grouped int8's; bf16
    # accumulates in another order, where a last-bit difference can move an activation across a bfloat16
    # rounding step (2^-9 relative) downstream
    np.testing.assert_allclose(b.forward(w, TOKENS), b0.forward(w0, TOKENS), atol=atol)
    prompts = [TOKENS[0, :10].tolist(), TOKENS[1, :3].tolist()]
    assert b.generate(w, prompts, 16, sampling=GREEDY).tokens == b0.generate(w0, prompts, 16, sampling=GREEDY).tokens


@needs_kernels
@pytest.mark.parametrize("precision", ["bf16", "int8", "w8a8"])
def test_kernel_weights_are_stored_out_major_with_the_same_bytes(precision, monkeypatch):
    b, w = _backend(precision, True, monkeypatch)
    b0, w0 = _backend(precision, False, monkeypatch)
    kernel = w.state["blocks"][0]["mlp"]["c_fc"]["kernel"]["kernel"][...]
    assert kernel.shape == (4 * 64, 64)  # [out, in]
    nbytes = [sum(a.nbytes for a in jax.tree.leaves(x.state)) for x in (w, w0)]
    assert nbytes[0] == nbytes[1]


@needs_kernels
def test_grouped_scales_are_stored_per_output_row_and_meshes_keep_the_xla_formulation(monkeypatch):
    from gptjax.sharding import make_mesh

    b, w = _backend("int8", True, monkeypatch, group_size=16)
    c_fc = w.state["blocks"][0]["mlp"]["c_fc"]["kernel"]
    assert c_fc["kernel"][...].shape == (4 * 64, 64) and c_fc["scale"][...].shape == (4 * 64, 64 // 16)
    mesh_b = get_backend("jax", CONFIG, precision="int8", mesh=make_mesh(1, 1, 2, devices=jax.devices()[:2]))
    assert not mesh_b.prepare(PARAMS).cpu_kernels


@needs_kernels
@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_decode_converts_no_table_per_call(precision, decode_hlo, monkeypatch):
    # regression: XLA:CPU gathered the bfloat16 wte from a float32 copy of the whole table and hoisted that out
    # of the decode loop, so every decode call wrote V x D float32 (gpt2: 150 MB, ~40 ms per one-token chunk)
    b, w = _backend(precision, True, monkeypatch)
    hlo = decode_hlo(lambda: b.generate(w, [TOKENS[0, :5].tolist()], 4, sampling=GREEDY))
    assert f"f32[{CONFIG.vocab_size},{CONFIG.n_embd}]" not in hlo  # the (tied) table
    if precision == "bf16":  # int8 mode keeps the position table in float32
        assert f"f32[{CONFIG.n_positions},{CONFIG.n_embd}]" not in hlo


def test_without_the_built_module_the_status_says_why_and_the_backend_uses_xla(monkeypatch):
    import sys

    import gptjax

    monkeypatch.setitem(sys.modules, "gptjax._cpu_kernels", None)  # as if the install had no compiler
    monkeypatch.delattr(gptjax, "_cpu_kernels", raising=False)
    cpu_kernels._module_status.cache_clear()
    try:
        assert cpu_kernels.status().startswith("not built") and "pip install -e ." in cpu_kernels.status()
        assert not get_backend("jax", CONFIG, precision="int8").prepare(PARAMS).cpu_kernels
        with pytest.raises(RuntimeError, match="CPU kernels cannot run: not built"):
            cpu_kernels.int8_matmul(jnp.zeros((1, 4), jnp.int8), jnp.zeros((2, 4), jnp.int8))
    finally:
        cpu_kernels._module_status.cache_clear()
    monkeypatch.undo()
    assert cpu_kernels.status() in ("enabled", cpu_kernels._module_status())


@needs_kernels
@pytest.mark.parametrize("precision,kv_cache", [("bf16", "bf16"), ("int8", "int8"), ("fp32", "int8")])
def test_decode_reads_a_reduced_precision_cache_without_a_float32_copy(precision, kv_cache, decode_hlo,
                                                                       monkeypatch):
    # XLA's dots convert the whole [B, H, S, K] cache to float32 first, every decode step (gpt2, B=8, 480 cached
    # tokens: 50-56 ms per step against 29 ms for a float32 cache); the kernels read the stored bytes
    b, w = _backend(precision, True, monkeypatch, kv_cache=kv_cache)
    hlo = decode_hlo(lambda: b.generate(w, [TOKENS[0, :5].tolist()], 4, sampling=GREEDY))
    cache_f32 = rf"f32\[\d+,{CONFIG.n_head},\d{{2,}},{CONFIG.head_dim}\]"  # S = 16 entries (the new token's: 1)
    assert not re.search(cache_f32, hlo) and "gptjax_kv_scores" in hlo


def test_to_params_refuses_models_it_cannot_export():
    from flax import nnx

    from gptjax.backends.jax import GPT, build, to_params
    from gptjax.errors import GptjaxError
    from gptjax.quantize import for_precision

    np.testing.assert_array_equal(to_params(GPT(CONFIG, PARAMS))["h.0.mlp.c_fc.weight"], PARAMS["h.0.mlp.c_fc.weight"])
    bf16 = for_precision(PARAMS, CONFIG, "bf16")
    with pytest.raises(GptjaxError, match="float models built in XLA.s layout \\(not int8 or out-major"):
        to_params(nnx.merge(*nnx.split(build(CONFIG, bf16, "bf16", cpu_kernels=True))))


@needs_kernels
def test_handlers_refuse_an_output_shape_they_would_overrun():
    # found in review: the handlers checked only out's last dim and wrote M x N (or B x H x T x S) values anyway;
    # a direct ffi_call with a smaller out segfaulted the process
    cpu_kernels._require()
    x, w = jnp.ones((16, 64), jnp.int8), jnp.ones((256, 64), jnp.int8)
    with pytest.raises(Exception, match="out must be"):
        jax.ffi.ffi_call("gptjax_int8_matmul", jax.ShapeDtypeStruct((1, 256), jnp.int32))(x, w).block_until_ready()
    q, cache = jnp.ones((4, 4, 2, 16)), jnp.ones((4, 4, 64, 16), jnp.int8)
    with pytest.raises(Exception, match="kv kernel"):
        jax.ffi.ffi_call("gptjax_kv_scores_int8", jax.ShapeDtypeStruct((1, 1, 2, 64), jnp.float32))(
            q, cache).block_until_ready()
    with pytest.raises(Exception, match="out must be"):  # an in-major w [K, N] checked as the [N, K] it stands for
        jax.ffi.ffi_call("gptjax_bf16_matmul_kn", jax.ShapeDtypeStruct((16, 99), jnp.float32))(
            jnp.ones((16, 64), jnp.bfloat16), jnp.ones((64, 256), jnp.bfloat16)).block_until_ready()
    with pytest.raises(Exception, match="non-empty table"):
        cpu_kernels.bf16_rows(jnp.zeros((0, 8), jnp.bfloat16), jnp.array([0, 3])).block_until_ready()


@needs_kernels
def test_edge_shapes_match_xla():
    # an empty reduction (K = 0) gives zeros, not a division by a zero group size; negative ids count from the end
    got = cpu_kernels.int8_grouped_matmul(jnp.zeros((2, 0), jnp.int8), jnp.ones((4, 0), jnp.int8), jnp.ones((4, 1)),
                                          jnp.ones((2, 1)))
    np.testing.assert_array_equal(np.asarray(got), np.zeros((2, 4), np.float32))
    table = jnp.asarray(np.arange(21, dtype=np.float32).reshape(7, 3), jnp.bfloat16)
    ids = jnp.array([-1, -7, 0, 6, 9])
    np.testing.assert_array_equal(np.asarray(cpu_kernels.bf16_rows(table, ids)),
                                  np.asarray(table[ids].astype(jnp.float32)))
