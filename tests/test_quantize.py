"""int8/bf16 conversion math: error bounds, exact scales, memory accounting, bad input."""

import ml_dtypes
import numpy as np
import pytest

from gptjax import GPTConfig, GptjaxError, get_preset, init_params
from gptjax.quantize import convert, dequantize_int8, precision_of, quantize_int8, weight_bytes


@pytest.mark.parametrize("axis,group", [(0, None), (1, None), (0, 16), (1, 8)])
def test_dequantised_values_are_within_half_a_scale(axis, group):
    w = np.random.default_rng(0).normal(0, 0.05, (64, 48)).astype(np.float32)
    q, scale = quantize_int8(w, axis, group)
    assert q.dtype == np.int8 and scale.dtype == np.float32 and np.abs(q).max() == 127
    back = dequantize_int8(q, scale, axis, group)
    per_element = dequantize_int8(np.ones_like(q), scale, axis, group)  # each element's own scale
    assert np.all(np.abs(back - w) <= per_element / 2 + 1e-8)


def test_scales_on_crafted_matrices():
    w = np.zeros((4, 3), np.float32)  # Conv1D [in=4, out=3]
    w[:, 1] = [0.5, -1.0, 0.25, 0.0]
    w[2, 2] = 1000.0  # one huge outlier owns its channel's scale, and only that channel's
    w[0, 2] = 1.0
    q, scale = quantize_int8(w, axis=0)
    np.testing.assert_array_equal(scale, np.array([1.0, 1.0 / 127, 1000.0 / 127], np.float32))
    np.testing.assert_array_equal(q[:, 0], 0)  # an all-zero channel: scale 1, values 0, exact round trip
    np.testing.assert_array_equal(q[:, 1], [64, -127, 32, 0])  # 0.5 * 127 = 63.5 rounds to even: 64
    assert q[2, 2] == 127 and q[0, 2] == 0  # the outlier's channel loses the small value
    np.testing.assert_array_equal(dequantize_int8(q, scale, 0)[:, 0], 0)


def test_int8_weight_bytes_match_the_size_calculator():
    for config in (get_preset("tiny"), GPTConfig(vocab_size=50, n_positions=16, n_layer=2, n_head=2, n_embd=8,
                                                 tie_word_embeddings=False)):
        params = init_params(config)
        assert weight_bytes(params) == config.weight_bytes("fp32")
        assert weight_bytes(convert(params, config, "bf16")) == config.weight_bytes("bf16")
        assert weight_bytes(convert(params, config, "int8")) == config.weight_bytes("int8")


def test_conversions_are_deterministic_and_labelled():
    config = get_preset("tiny")
    params = init_params(config)
    a, b = convert(params, config, "int8"), convert(params, config, "int8")
    assert all(np.array_equal(a[k], b[k]) for k in a) and precision_of(a) == "int8"
    assert a["h.0.mlp.c_fc.weight"].dtype == np.int8 and a["h.0.mlp.c_fc.weight_scale"].shape == (128,)
    assert a["wte.weight_scale"].shape == (256,) and a["ln_f.weight"].dtype == np.float32
    kept = convert(params, config, "int8", keep_head=True)
    assert kept["wte.weight"].dtype == np.float32 and "wte.weight_scale" not in kept
    bf = convert(params, config, "bf16")
    assert precision_of(bf) == "bf16" and bf["wpe.weight"].dtype == ml_dtypes.bfloat16


def test_bad_input():
    config = get_preset("tiny")
    params = init_params(config)
    with pytest.raises(GptjaxError, match="precision 'int3'; allowed: fp32, bf16, int8, int4"):
        convert(params, config, "int3")
    with pytest.raises(GptjaxError, match="params are already int8"):
        convert(convert(params, config, "int8"), config, "int8")
    with pytest.raises(GptjaxError, match="group_size=48 must be a positive integer dividing the input width 32"):
        convert(params, config, "int8", group_size=48)


def test_quantize_out_must_not_be_an_ancestor_or_a_foreign_directory(tmp_path, capsys):
    from gptjax import save_checkpoint
    from gptjax.cli import main

    config = GPTConfig(vocab_size=50, n_positions=16, n_layer=2, n_head=2, n_embd=8)
    parent = tmp_path / "parent"
    save_checkpoint(config, init_params(config), parent / "src")
    (parent / "other.safetensors").write_bytes(b"keep me")
    (parent / "config.json").write_text('{"mine": 1}')
    src = ["quantize", "--checkpoint", str(parent / "src"), "--to", "int8", "--out"]
    for out in (parent, tmp_path):  # the parent, and an ancestor further up
        assert main([*src, str(out)]) == 2  # before: 0, and parent/other.safetensors deleted
        assert "--out" in capsys.readouterr().err
    assert (parent / "other.safetensors").read_bytes() == b"keep me"
    assert (parent / "config.json").read_text() == '{"mine": 1}'
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("x")
    assert main([*src, str(tmp_path / "busy")]) == 2
    assert "notes.txt" in capsys.readouterr().err and (tmp_path / "busy" / "notes.txt").read_text() == "x"
    for _ in range(2):  # a new directory, then the same one again (it holds only a gptjax checkpoint)
        assert main([*src, str(tmp_path / "q")]) == 0
