"""Both backends: parity with each other and with transformers' logits, input checks, the registry."""

import sys
import textwrap

import numpy as np
import pytest

from gptjax import GPTConfig, GptjaxError, available_backends, get_backend, init_params, load_checkpoint
from gptjax.backends.base import Backend

SHAPES = [  # (config, batch, seq_len): several widths, head counts, odd lengths, an untied head, n_inner
    (GPTConfig(vocab_size=101, n_positions=32, n_layer=1, n_head=1, n_embd=16), 1, 1),
    (GPTConfig(vocab_size=101, n_positions=32, n_layer=2, n_head=4, n_embd=32), 3, 17),
    (GPTConfig(vocab_size=257, n_positions=70, n_layer=3, n_head=3, n_embd=48), 2, 70),
    (GPTConfig(vocab_size=64, n_positions=40, n_layer=2, n_head=2, n_embd=24, n_inner=40,
               tie_word_embeddings=False), 4, 9),
]


def _random_model(config, seed=0):
    """GPT-2 init, then every parameter perturbed so LayerNorm gains and biases matter."""
    rng = np.random.default_rng(seed)
    return {k: v + rng.normal(0, 0.1, v.shape).astype(np.float32) for k, v in init_params(config, seed).items()}


@pytest.mark.parametrize("config,B,T", SHAPES)
def test_numpy_and_jax_logits_agree(config, B, T):
    params = _random_model(config)
    tokens = np.random.default_rng(1).integers(0, config.vocab_size, (B, T))
    ref = get_backend("numpy", config, dtype="float64").forward(params, tokens)
    np32 = get_backend("numpy", config).forward(params, tokens)
    jx = get_backend("jax", config).forward(params, tokens)
    assert ref.shape == jx.shape == (B, T, config.vocab_size) and jx.dtype == np.float32
    assert np.abs(np32 - ref).max() <= 1e-4
    assert np.abs(jx - ref).max() <= 1e-4


@pytest.mark.parametrize("name", ["numpy", "jax"])
def test_last_only_is_the_last_row_of_full_logits(name):
    config, B, T = SHAPES[1]
    params = _random_model(config)
    backend = get_backend(name, config)
    tokens = np.random.default_rng(2).integers(0, config.vocab_size, (B, T))
    last = backend.forward(params, tokens, last_only=True)
    assert last.shape == (B, config.vocab_size)
    np.testing.assert_allclose(last, backend.forward(params, tokens)[:, -1], atol=1e-5)


@pytest.mark.parametrize("name", ["numpy", "jax"])
def test_matches_transformers_golden_logits(name, hf_tiny_dir, golden):
    config, params = load_checkpoint(hf_tiny_dir)
    logits = get_backend(name, config).forward(params, golden["input_ids"])
    assert logits.shape == golden["logits"].shape
    assert np.abs(logits - golden["logits"]).max() <= 1e-4
    last = get_backend(name, config).forward(params, golden["input_ids"], last_only=True)
    assert np.abs(last - golden["logits"][:, -1]).max() <= 1e-4


def test_golden_logits_are_not_trivial(golden):
    assert golden["logits"].std() > 0.5  # a wrong bias or LayerNorm gain would move these by far more than 1e-4


def test_jax_pads_to_buckets_without_changing_results():
    from gptjax.backends.jax import bucket_length

    assert [bucket_length(t, 1024) for t in (1, 8, 9, 64, 65, 128, 1000)] == [8, 8, 16, 64, 128, 128, 1024]
    assert bucket_length(50, 40) == 40
    config = SHAPES[1][0]
    params = _random_model(config)
    backend = get_backend("jax", config)
    tokens = np.random.default_rng(3).integers(0, config.vocab_size, (2, 20))
    short = backend.forward(params, tokens[:, :11])  # padded to 16
    np.testing.assert_allclose(short, backend.forward(params, tokens)[:, :11], atol=1e-5)


def test_prepared_weights_and_conversion_cache():
    config = SHAPES[1][0]
    params = _random_model(config)
    backend = get_backend("jax", config)
    tokens = np.zeros((1, 4), np.int64)
    prepared = backend.prepare(params)
    np.testing.assert_array_equal(backend.forward(prepared, tokens), backend.forward(params, tokens))
    first = backend._cache[2]
    backend.forward(params, tokens)
    assert backend._cache[2] is first  # same dict, same arrays: converted once
    params["ln_f.bias"] = params["ln_f.bias"] + 1.0  # a new array: must reconvert
    changed = backend.forward(params, tokens)
    assert backend._cache[2] is not first
    np.testing.assert_allclose(changed, get_backend("numpy", config).forward(params, tokens), atol=1e-4)


BAD_TOKENS = [
    ([[1, 2, 101]], r"token id 101 at \[0, 2\] is outside \[0, 101\)"),
    ([[1, -1]], r"token id -1 at \[0, 1\] is outside \[0, 101\)"),
    (np.zeros((1, 33), np.int32), r"T=33 exceeds the context n_positions=32"),
    (np.zeros((0, 4), np.int32), r"non-empty, got shape \(0, 4\)"),
    (np.zeros((2, 0), np.int32), r"non-empty, got shape \(2, 0\)"),
    ([1, 2, 3], r"shape \[B, T\] \(rank 2\), got shape \(3,\)"),
    (np.zeros((1, 2, 3), np.int32), r"rank 2\), got shape \(1, 2, 3\)"),
    ([[0.5, 1.0]], r"integers, got dtype float64"),
    ([[1, 2], [3]], r"rectangular"),
    ([["a"]], r"integers, got dtype <U1"),
]


@pytest.mark.parametrize("name", ["numpy", "jax"])
@pytest.mark.parametrize("tokens,pattern", BAD_TOKENS)
def test_bad_tokens_get_a_clear_error(name, tokens, pattern):
    config = SHAPES[1][0]
    backend = get_backend(name, config)
    with pytest.raises(GptjaxError, match=pattern):
        backend.forward(init_params(config), tokens)


def test_wrong_params_get_a_clear_error():
    config = SHAPES[1][0]
    params = init_params(config)
    params["h.1.attn.c_attn.weight"] = params["h.1.attn.c_attn.weight"][:, :90]
    with pytest.raises(GptjaxError, match=r"'h.1.attn.c_attn.weight' has shape \(32, 90\)"):
        get_backend("jax", config).forward(params, [[1, 2]])


def test_registry_lists_builtins_and_rejects_unknowns():
    assert {"numpy", "jax"} <= set(available_backends())
    config = SHAPES[0][0]
    with pytest.raises(GptjaxError, match=r"unknown backend 'torch'; available: \[.*'jax'.*'numpy'"):
        get_backend("torch", config)
    with pytest.raises(GptjaxError, match=r"backend 'numpy' has no option 'mesh'"):
        get_backend("numpy", config, mesh=None)
    with pytest.raises(GptjaxError, match=r"dtype='float16'; allowed: \['float32', 'float64'\]"):
        get_backend("numpy", config, dtype="float16")
    with pytest.raises(GptjaxError, match="config must be a GPTConfig"):
        get_backend("numpy", {"n_layer": 2})


def test_third_party_backend_registers_through_entry_points(tmp_path, monkeypatch):
    (tmp_path / "fake_gptjax_plugin.py").write_text(textwrap.dedent("""
        import numpy as np
        from gptjax.backends.numpy_ref import NumpyBackend

        class DoubledBackend(NumpyBackend):
            name = "doubled"
            def _forward(self, weights, tokens, last_only):
                return 2 * super()._forward(weights, tokens, last_only)

        class NotABackend:
            pass
    """))
    dist = tmp_path / "fake_gptjax_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-gptjax-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[gptjax.backends]\ndoubled = fake_gptjax_plugin:DoubledBackend\n"
        "broken = fake_gptjax_plugin:NotABackend\nnumpy = fake_gptjax_plugin:NotABackend\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert {"doubled", "broken"} <= set(available_backends())
    config = SHAPES[1][0]
    params, tokens = init_params(config), [[1, 2, 3]]
    doubled = get_backend("doubled", config)
    assert isinstance(doubled, Backend)
    expected = 2 * get_backend("numpy", config).forward(params, tokens)
    np.testing.assert_allclose(doubled.forward(params, tokens), expected)
    with pytest.raises(GptjaxError, match="is not a gptjax.backends.Backend subclass"):
        get_backend("broken", config)
    assert type(get_backend("numpy", config)).__module__ == "gptjax.backends.numpy_ref"  # no shadowing
    sys.modules.pop("fake_gptjax_plugin", None)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_numpy_backend_computes_in_its_dtype(dtype):
    """Regression: NumPy float64 scalars (np.sqrt(2/pi)) silently promoted the float32 oracle to float64."""
    from gptjax.backends.numpy_ref import gpt2

    config = SHAPES[1][0]
    weights = get_backend("numpy", config, dtype=dtype).prepare(init_params(config))
    logits = gpt2(np.array([[1, 2, 3]]), weights, config.n_layer, config.n_head, 1e-5, last_only=False)
    assert logits.dtype == np.dtype(dtype)


def test_jax_backend_computes_half_precision_params_in_float32():
    config = SHAPES[1][0]
    params = {k: v.astype(np.float16) for k, v in _random_model(config).items()}
    tokens = np.random.default_rng(4).integers(0, config.vocab_size, (2, 9))
    ref = get_backend("numpy", config).forward(params, tokens)
    assert np.abs(get_backend("jax", config).forward(params, tokens) - ref).max() <= 1e-4


def test_prepared_weights_of_another_kind_or_config_are_refused():
    config = SHAPES[1][0]
    params = init_params(config)
    jax_weights = get_backend("jax", config).prepare(params)
    with pytest.raises(GptjaxError, match="got JaxWeights"):
        get_backend("numpy", config).forward(jax_weights, [[1]])
    with pytest.raises(GptjaxError, match="prepared weights are for"):
        get_backend("jax", config.replace(n_positions=64)).forward(jax_weights, [[1]])
    with pytest.raises(GptjaxError, match="got list"):
        get_backend("jax", config).forward([1, 2], [[1]])
    from types import MappingProxyType

    np.testing.assert_allclose(get_backend("jax", config).forward(MappingProxyType(params), [[1, 2]]),
                               get_backend("jax", config).forward(params, [[1, 2]]))


def test_broken_or_duplicate_plugins_get_clear_errors(tmp_path, monkeypatch):
    for dist, eps in {"plug_a-1.0": "missing = no_such_module_xyz:Thing\nnoattr = json:NoSuch\ndup = json:a\n",
                      "plug_b-1.0": "dup = json:b\n"}.items():
        d = tmp_path / f"{dist}.dist-info"
        d.mkdir()
        (d / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist.split('-')[0]}\nVersion: 1.0\n")
        (d / "entry_points.txt").write_text("[gptjax.backends]\n" + eps)
    monkeypatch.syspath_prepend(str(tmp_path))
    config = SHAPES[0][0]
    with pytest.raises(GptjaxError, match=r"'missing' \(no_such_module_xyz:Thing\) cannot be loaded: "
                                          r"ModuleNotFoundError"):
        get_backend("missing", config)
    with pytest.raises(GptjaxError, match=r"'noattr' \(json:NoSuch\) cannot be loaded: AttributeError"):
        get_backend("noattr", config)
    with pytest.raises(GptjaxError, match=r"'dup' is registered twice"):
        get_backend("dup", config)
