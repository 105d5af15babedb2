"""int4 weight-only precision: nibble packing, the groupwise quantiser, the CPU int4 kernel against an exact integer
reference, both backends' greedy tokens, the bytes against the size calculator, int4 checkpoints and bad input
(on the byte-level model trained by `gptjax train`, tests/fixtures/trained_byte_tiny: width 64, MLP 256)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import needs_kernels

from gptjax import get_backend
from gptjax import precision as registry
from gptjax.backends import cpu_kernels
from gptjax.cli import main
from gptjax.errors import GptjaxError
from gptjax.quantize import convert, pack_int4, quantize_int4, unpack_int4, weight_bytes
from gptjax.safetensors_io import read_header
from gptjax.sampling import GREEDY
from gptjax.weights import load_checkpoint, save_checkpoint, stored_precision

FIXTURE = Path(__file__).parent / "fixtures" / "trained_byte_tiny"
CONFIG, PARAMS = load_checkpoint(FIXTURE)
TEXT = np.frombuffer(b"def main(argv):\n    for name in sorted(argv):\n        print(name, len(name))\n",
                     np.uint8).astype(np.int64)
PROMPTS = [list(TEXT[:20]), list(TEXT[30:39]), list(TEXT[5:36])]


# ---- packing and the quantiser
@pytest.mark.parametrize("shape,axis", [((6, 5), 0), ((3, 10), 1), ((2, 4, 3), 1), ((16,), 0)])
def test_pack_unpack_round_trip_is_exact(shape, axis):
    q = (np.arange(np.prod(shape)) % 16 - 8).astype(np.int8).reshape(shape)  # every value of [-8, 7]
    packed = pack_int4(q, axis)
    assert packed.dtype == np.uint8 and packed.shape[axis] == shape[axis] // 2 and packed.nbytes * 2 == q.size
    np.testing.assert_array_equal(unpack_int4(packed, axis), q)
    first = np.moveaxis(q, axis, 0).astype(np.int16)
    low_high = np.moveaxis(packed, axis, 0)[0]  # byte 0: index 0 in the low nibble, index 1 in the high one
    np.testing.assert_array_equal(low_high, (first[0] + 8) | ((first[1] + 8) << 4))


def test_packing_rejects_odd_lengths_and_values_out_of_range():
    with pytest.raises(GptjaxError, match="int4 packing pairs values along axis 1, whose length 5 is odd"):
        pack_int4(np.zeros((4, 5), np.int8), 1)
    with pytest.raises(GptjaxError, match=r"int4 values must be in \[-8, 7\], got \[-9, 0\]"):
        pack_int4(np.array([-9, 0], np.int8), 0)


def test_the_quantiser_maps_each_groups_extreme_to_minus_8_and_rounds_the_rest():
    w = np.random.default_rng(0).standard_normal((64, 3)).astype(np.float32)
    w[:32, 2] = 0  # an all-zero group: scale 1, values 0
    packed, scale = quantize_int4(w, 0, 32)
    assert packed.shape == (32, 3) and scale.shape == (2, 3) and scale.dtype == np.float32
    q = unpack_int4(packed, 0).reshape(2, 32, 3)
    grouped = w.reshape(2, 32, 3)
    extreme = np.abs(grouped).argmax(1)  # [2, 3]
    assert np.all(np.take_along_axis(q, extreme[:, None], 1) == np.where(scale == 1, 0, -8)[:, None])
    assert scale[0, 2] == 1 and not q[0, :, 2].any()
    err, step = np.abs(q * scale[:, None] - grouped), np.abs(scale)[:, None]
    assert np.all(err <= np.where(q == 7, step, step / 2) + 1e-7)  # +8 steps (the extreme's opposite) clip to 7


# ---- the CPU kernel against an exact integer reference
def _kernel_case(M: int, K: int, N: int, gs: int, seed: int):
    rng = np.random.default_rng(seed)
    x = rng.integers(-128, 128, (M, K), dtype=np.int8)
    q = rng.integers(-8, 8, (N, K), dtype=np.int8)
    x[:, 0], q[0] = -128, -8  # the extremes
    ws = (2.0 ** -rng.integers(0, 4, (N, K // gs))).astype(np.float32)  # powers of two: exact float sums
    ref = np.einsum("mgi,ngi->mng", x.reshape(M, -1, gs).astype(np.int64), q.reshape(N, -1, gs).astype(np.int64))
    return x, pack_int4(q, 1), ws, (ref * ws.astype(np.float64)).sum(-1)  # [M, N]


@needs_kernels
@pytest.mark.parametrize("M,K,N,gs", [(2, 768, 2304, 64), (1, 96, 13, 32), (3, 160, 9, 32), (5, 256, 67, 128),
                                      (2, 64, 5, 64), (4, 8192, 3, 128), (2, 128, 64, 32), (7, 3072, 6, 64)])
def test_int4_kernel_is_exact(M, K, N, gs):
    # K / 2 bytes per row of w: 48, 80 (tails of a 64-byte load), 4096 (one page per row), 64 x 64 = 4096 bytes
    x, w, ws, ref = _kernel_case(M, K, N, gs, seed=K + N + gs)
    got = np.asarray(jax.jit(cpu_kernels.int4_matmul)(x, w, ws))
    assert got.dtype == np.float32 and got.shape == (M, N)
    np.testing.assert_array_equal(got, ref)  # the integer sums, scaled by powers of two: exact in float32


@needs_kernels
def test_int4_kernel_takes_leading_dims_and_refuses_bad_shapes():
    x, w, ws, ref = _kernel_case(6, 128, 10, 32, seed=1)
    got = np.asarray(cpu_kernels.int4_matmul(x.reshape(2, 3, 128), w, ws))
    np.testing.assert_array_equal(got, ref.reshape(2, 3, 10))
    with pytest.raises(ValueError, match=r"w \[N, K/2\] and ws \[N, G\] with G dividing K expected, got \(6, 128\), "
                                         r"\(10, 128\) and \(10, 4\)"):
        cpu_kernels.int4_matmul(x, unpack_int4(w, 1), ws)
    with pytest.raises(Exception, match="groups of K / G inputs must be a multiple of 8"):
        cpu_kernels.int4_matmul(x, w, np.ones((10, 32), np.float32)).block_until_ready()  # groups of 4 inputs


# ---- both backends, the bytes, the kernel choice
@pytest.mark.parametrize("options,kernels", [({}, "1"), ({"group_size": 32}, "0"), ({"keep_head": True}, "1")])
def test_both_backends_give_the_same_greedy_tokens(options, kernels, monkeypatch):
    # the JAX backend on gptjax's CPU int4 kernel (where built), or on its XLA formulation (GPTJAX_CPU_KERNELS=0)
    monkeypatch.setenv(cpu_kernels.ENV, kernels)
    jax_b, np_b = (get_backend(name, CONFIG, precision="int4", **options) for name in ("jax", "numpy"))
    weights = jax_b.prepare(PARAMS)
    assert weights.cpu_kernels == (kernels == "1" and cpu_kernels.available())
    logits = [b.forward(w, TEXT[None, :48]) for b, w in ((jax_b, weights), (np_b, PARAMS))]
    # the kernels feed x as 16-bit fixed point (lowp.split_rows); XLA's formulation computes as NumPy does
    np.testing.assert_allclose(logits[0], logits[1], atol=2e-3 if weights.cpu_kernels else 1e-4)
    tokens = [b.generate(w, PROMPTS, 20, sampling=GREEDY).tokens for b, w in ((jax_b, weights), (np_b, PARAMS))]
    assert tokens[0] == tokens[1] and all(len(t) == 20 for t in tokens[0])


@pytest.mark.parametrize("group_size,keep_head", [(None, False), (32, False), (64, True)])
def test_bytes_equal_the_size_calculators(group_size, keep_head, monkeypatch):
    params = convert(PARAMS, CONFIG, "int4", group_size=group_size, keep_head=keep_head)
    expected = registry.weight_bytes(CONFIG, "int4", group_size, keep_head)
    assert weight_bytes(params) == expected
    for kernels in ("1", "0"):  # out-major on the kernels or XLA's layout: the same bytes on device
        monkeypatch.setenv(cpu_kernels.ENV, kernels)
        state = get_backend("jax", CONFIG, precision="int4").prepare(params).state
        assert sum(a.nbytes for a in jax.tree.leaves(state)) == expected
    assert CONFIG.weight_bytes("int4") == registry.weight_bytes(CONFIG, "int4", 64)  # the default G


@pytest.mark.parametrize("changes", [{"n_inner": 64}, {"tie_word_embeddings": False}])
def test_the_calculator_counts_every_storage_and_option(changes):
    # n_inner = n_embd: both input widths equal (the formula once keyed groups by width); an untied head: two tables
    from gptjax import GPTConfig, init_params

    config = GPTConfig(vocab_size=64, n_positions=16, n_layer=2, n_head=2, n_embd=64, **changes)
    params = init_params(config)
    for storage, group_size, keep_head in (("int4", None, False), ("int4", 32, True), ("int8", None, False),
                                           ("int8", 32, False), ("int8", None, True)):
        converted = convert(params, config, storage, group_size=group_size, keep_head=keep_head)
        assert weight_bytes(converted) == registry.weight_bytes(config, storage, group_size, keep_head)


@needs_kernels
def test_decode_reads_the_packed_bytes_through_the_kernel(decode_hlo, monkeypatch):
    monkeypatch.setenv(cpu_kernels.ENV, "1")
    b = get_backend("jax", CONFIG, precision="int4")
    w = b.prepare(PARAMS)
    assert w.cpu_kernels and w.state["blocks"][0]["mlp"]["c_fc"]["kernel"]["kernel"][...].shape == (256, 32)
    hlo = decode_hlo(lambda: b.generate(w, PROMPTS[:1], 4, sampling=GREEDY))
    assert "gptjax_int4_matmul" in hlo
    D, F, V = CONFIG.n_embd, CONFIG.mlp_width, CONFIG.vocab_size
    for out, width in ((3 * D, D), (F, D), (D, F), (V, D)):  # no unpacked copy of a weight, int8 or float
        assert not re.search(rf"(s8|f32)\[({out},{width}|{width},{out})\]", hlo), (out, width)


# ---- checkpoints and bad input
def test_quantize_cli_writes_an_int4_checkpoint_that_loads_as_stored(tmp_path, capsys):
    out = tmp_path / "q4"
    argv = ["quantize", "--checkpoint", str(FIXTURE), "--to", "int4", "--group-size", "32", "--out", str(out)]
    assert main(argv) == 0
    assert "(int4, groups of 32)" in capsys.readouterr().out
    metadata = read_header(str(out / "model.safetensors"))[1]
    assert metadata["gptjax.precision"] == "int4" and metadata["gptjax.group_size"] == "32"
    assert stored_precision(out) == "int4"
    _, loaded = load_checkpoint(out)
    expected = convert(PARAMS, CONFIG, "int4", group_size=32)
    assert loaded.keys() == expected.keys()
    for key, value in expected.items():
        assert loaded[key].dtype == value.dtype and np.array_equal(loaded[key], value), key
    assert loaded["h.0.mlp.c_fc.weight"].shape == (32, 256) and loaded["h.0.mlp.c_fc.weight_scale"].shape == (2, 256)
    assert get_backend("numpy", CONFIG, precision="int4").prepare(loaded)["h.1.mlp.c_proj.weight"].packed is \
        loaded["h.1.mlp.c_proj.weight"]  # used as stored, never quantised again
    stored = get_backend("jax", CONFIG, precision="int4").forward(loaded, TEXT[None, :32])
    direct = get_backend("jax", CONFIG, precision="int4", group_size=32).forward(PARAMS, TEXT[None, :32])
    np.testing.assert_array_equal(stored, direct)  # quantising ahead of time or at load: the same model
    with pytest.raises(GptjaxError, match="already int4 \\(a quantised checkpoint\\) and are used as stored"):
        get_backend("jax", CONFIG, precision="int4", group_size=64).prepare(loaded)


def test_the_default_group_size_is_recorded(tmp_path, capsys):
    assert main(["quantize", "--checkpoint", str(FIXTURE), "--to", "int4", "--keep-head", "--out",
                 str(tmp_path / "q")]) == 0
    assert "(int4, groups of 64, head kept int8)" in capsys.readouterr().out
    assert read_header(str(tmp_path / "q" / "model.safetensors"))[1]["gptjax.group_size"] == "64"
    assert load_checkpoint(tmp_path / "q")[1]["wte.weight"].dtype == np.int8


@pytest.mark.parametrize("group_size,message", [
    (48, "group_size=48 for int4; allowed: 32, 64, 128"),
    (16, "group_size=16 for int4; allowed: 32, 64, 128"),
    (128, "group_size=128 must be a positive integer dividing the input width 64"),
])
def test_bad_group_size_is_a_clear_error(group_size, message, tmp_path, capsys):
    with pytest.raises(GptjaxError, match=message):
        get_backend("jax", CONFIG, precision="int4", group_size=group_size).prepare(PARAMS)
    assert main(["quantize", "--checkpoint", str(FIXTURE), "--to", "int4", "--group-size", str(group_size), "--out",
                 str(tmp_path / "q")]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "q").exists()


def test_the_default_group_size_falls_back_to_one_that_divides_the_widths():
    from gptjax import GPTConfig, init_params

    narrow = GPTConfig(vocab_size=64, n_positions=16, n_layer=1, n_head=2, n_embd=32)  # 64 does not divide 32
    params = convert(init_params(narrow), narrow, "int4")
    assert params["h.0.attn.c_attn.weight_scale"].shape == (1, 96)  # groups of 32
    assert weight_bytes(params) == narrow.weight_bytes("int4") == registry.weight_bytes(narrow, "int4", 32)
    odd = GPTConfig(vocab_size=64, n_positions=16, n_layer=1, n_head=2, n_embd=48)
    with pytest.raises(GptjaxError, match="int4 needs input widths divisible by a group size of 32, 64, 128; got 48"):
        convert(init_params(odd), odd, "int4")


def test_the_size_table_says_where_int4_does_not_apply(capsys):
    assert main(["info", "gpt2", "--n-embd", "48", "--n-head", "6"]) == 0  # no allowed group divides 48
    out = capsys.readouterr().out
    assert "| weights int4 | 69.73 MiB | n/a |  |" in out and "| weights int8 | 121.78 MiB | 3.04 MiB | 0.025x |" in out


def test_corrupt_int4_params_are_named(tmp_path):
    q = convert(PARAMS, CONFIG, "int4", group_size=32)
    bad = dict(q, **{"h.0.attn.c_proj.weight_scale": np.ones((4, 64), np.float32)})  # groups of 16 inputs
    with pytest.raises(GptjaxError, match="'h.0.attn.c_proj.weight_scale': int4 groups of 16 inputs; allowed: 32"):
        get_backend("numpy", CONFIG, precision="int4").prepare(bad)
    bad = dict(q, **{"h.0.mlp.c_fc.weight": np.zeros((64, 256), np.uint8)})  # not packed
    with pytest.raises(GptjaxError, match=r"'h.0.mlp.c_fc.weight' has shape \(64, 256\), expected \(32, 256\)"):
        get_backend("jax", CONFIG, precision="int4").prepare(bad)
    save_checkpoint(CONFIG, q, tmp_path / "ck")
    with pytest.raises(GptjaxError, match=r"params are int4; run them with precision='int4' \(precision='int8' needs"):
        get_backend("jax", CONFIG, precision="int8").prepare(load_checkpoint(tmp_path / "ck")[1])
    header = json.loads(json.dumps(read_header(str(tmp_path / "ck" / "model.safetensors"))[0]))
    assert header["transformer.h.0.mlp.c_fc.weight"]["dtype"] == "U8"
