"""Precision modes (bf16, int8 weight-only, w8a8, int8/bf16 KV caches) on both backends, quantised checkpoints,
`gptjax quantize`, and the precision report — on a byte-level model trained by `gptjax train`
(tests/fixtures/trained_byte_tiny: 2 layers, width 64, context 64, 400 steps on the stdlib)."""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
import shutil
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest

from gptjax import get_backend
from gptjax.backends.jax import KVCache
from gptjax.cli import main
from gptjax.errors import GptjaxError
from gptjax.precision import INT8_PER_TOKEN_ABOVE
from gptjax.precision_report import DEFAULT_MODES, Mode, report
from gptjax.quantize import convert, for_precision, precision_of, weight_bytes
from gptjax.sampling import GREEDY
from gptjax.weights import load_checkpoint, save_checkpoint, stored_precision

FIXTURE = Path(__file__).parent / "fixtures" / "trained_byte_tiny"
CONFIG, PARAMS = load_checkpoint(FIXTURE)
MODES = [("fp32", {}), ("bf16", {}), ("int8", {}), ("int8", {"group_size": 16}), ("int8", {"keep_head": True}),
         ("w8a8", {}), ("int8", {"kv_cache": "int8"}), ("fp32", {"kv_cache": "bf16"})]


def _text_tokens(n_windows: int = 8, T: int = 64) -> np.ndarray:
    """Byte windows [n, T+1] of real Python source (the kind of text the fixture was trained on)."""
    data = np.frombuffer(inspect.getsource(inspect).encode(), np.uint8).astype(np.int64)
    return np.stack([data[i * 997: i * 997 + T + 1] for i in range(n_windows)])


WINDOWS = _text_tokens()


def _nll(logits: np.ndarray, targets: np.ndarray) -> float:
    logits = logits.astype(np.float64)
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    return float((logz - np.take_along_axis(logits, targets[..., None], -1)[..., 0]).mean())


@pytest.mark.parametrize("precision,max_err,max_dloss", [("bf16", 0.15, 0.005), ("int8", 0.25, 0.01),
                                                         ("w8a8", 0.3, 0.015)])
def test_reduced_precision_logits_stay_close_to_fp32_on_a_trained_model(precision, max_err, max_dloss):
    # thresholds: logits of this model span ~ +-15; bf16 rounds weights to 8 mantissa bits (2^-9 relative),
    # int8 to 1/254 of each channel's max: errors of a few tenths at worst, and the loss barely moves (64-token
    # windows: int8 stays weight-only up to INT8_PER_TOKEN_ABOVE tokens)
    inputs, targets = WINDOWS[:, :-1], WINDOWS[:, 1:]
    ref = get_backend("jax", CONFIG).forward(PARAMS, inputs)
    out = get_backend("jax", CONFIG, precision=precision).forward(PARAMS, inputs)
    err = np.abs(out - ref)
    assert err.max() < max_err and err.mean() < max_err / 10
    assert abs(_nll(out, targets) - _nll(ref, targets)) < max_dloss
    assert (out.argmax(-1) == ref.argmax(-1)).mean() > 0.97


@pytest.mark.parametrize("precision,options", MODES)
def test_both_backends_agree_in_every_mode(precision, options):
    prompts = [list(WINDOWS[0, :20]), list(WINDOWS[1, :9]), list(WINDOWS[2, :31])]
    jax_b = get_backend("jax", CONFIG, precision=precision, **options)
    np_b = get_backend("numpy", CONFIG, precision=precision, **options)
    logits = [b.forward(PARAMS, WINDOWS[:2, :40]) for b in (jax_b, np_b)]
    # int8 on CPU feeds its dot 16-bit fixed-point activations (lowp.split_rows: error <= max|x|/64516);
    # w8a8 quantises activations, and bf16 rounds them to 8 bits: in both a last-bit difference from another
    # summation order (gptjax's CPU kernels, NumPy's BLAS) can move a value across a rounding boundary
    atol = {"int8": 2e-3, "w8a8": 2e-2, "bf16": 1e-3}.get(precision, 2e-4)
    np.testing.assert_allclose(logits[0], logits[1], atol=atol)
    results = [b.generate(PARAMS, prompts, 24, sampling=GREEDY) for b in (jax_b, np_b)]
    assert results[0].tokens == results[1].tokens
    assert all(len(t) == 24 for t in results[0].tokens)


def test_quantised_checkpoint_gives_the_same_greedy_tokens_on_both_backends(tmp_path):
    out = tmp_path / "int8"
    assert main(["quantize", "--checkpoint", str(FIXTURE), "--to", "int8", "--out", str(out)]) == 0
    config, params = load_checkpoint(out)
    assert precision_of(params) == "int8" and stored_precision(out) == "int8"
    prompts = [list(WINDOWS[3, :16]), list(WINDOWS[4, :5])]
    tokens = [get_backend(name, config, precision="int8").generate(params, prompts, 20, sampling=GREEDY).tokens
              for name in ("jax", "numpy")]
    assert tokens[0] == tokens[1]
    direct = get_backend("jax", CONFIG, precision="int8").generate(PARAMS, prompts, 20, sampling=GREEDY).tokens
    assert direct == tokens[0]  # quantising at load time or ahead of time: the same model


def test_quantised_checkpoint_round_trip_is_exact_and_deterministic(tmp_path):
    for name in ("a", "b"):
        assert main(["quantize", "--checkpoint", str(FIXTURE), "--to", "int8", "--group-size", "32",
                     "--out", str(tmp_path / name)]) == 0
    blob = (tmp_path / "a" / "model.safetensors").read_bytes()
    assert blob == (tmp_path / "b" / "model.safetensors").read_bytes()  # fp32 -> int8 is deterministic
    _, loaded = load_checkpoint(tmp_path / "a")
    expected = convert(PARAMS, CONFIG, "int8", group_size=32)
    assert loaded.keys() == expected.keys()
    for key, value in expected.items():
        assert loaded[key].dtype == value.dtype and np.array_equal(loaded[key], value), key  # loaded as stored
    assert loaded["h.0.mlp.c_fc.weight_scale"].shape == (2, 256)  # 64 inputs / 32 per group
    # loading never quantises again: the backend uses the stored int8 arrays as they are
    backend = get_backend("numpy", CONFIG, precision="int8")
    assert backend.prepare(loaded)["h.0.mlp.c_fc.weight"].q is loaded["h.0.mlp.c_fc.weight"]


def test_bf16_checkpoint_round_trip(tmp_path):
    assert main(["quantize", "--checkpoint", str(FIXTURE), "--to", "bf16", "--out", str(tmp_path / "bf")]) == 0
    _, loaded = load_checkpoint(tmp_path / "bf")
    assert {v.dtype for v in loaded.values()} == {np.dtype(ml_dtypes.bfloat16)}
    assert weight_bytes(loaded) == CONFIG.weight_bytes("bf16")
    np.testing.assert_array_equal(loaded["wte.weight"], PARAMS["wte.weight"].astype(ml_dtypes.bfloat16))


def test_quantize_keeps_the_tokenizer_files_and_never_overwrites_the_source(tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(FIXTURE, src)
    (src / "tokenizer.json").write_text("{}")
    assert main(["quantize", "--checkpoint", str(src), "--to", "int8", "--out", str(tmp_path / "q")]) == 0
    assert (tmp_path / "q" / "tokenizer.json").read_text() == "{}"
    ratio = CONFIG.weight_bytes("int8") / CONFIG.weight_bytes("fp32")
    assert f"= {ratio:.3f} x float32's" in capsys.readouterr().out
    before = (src / "model.safetensors").read_bytes()
    assert main(["quantize", "--checkpoint", str(src), "--to", "int8", "--out", str(src)]) == 2
    assert "is the source checkpoint" in capsys.readouterr().err
    assert (src / "model.safetensors").read_bytes() == before


@pytest.mark.parametrize("argv,message", [
    (["--to", "int8", "--out", "X", "--group-size", "48"], "group_size=48 must be a positive integer dividing"),
    (["--to", "int8"], "--to needs --out DIR"),
    ([], "give --to MODE --out DIR"),
    (["--to", "int8", "--out", "X", "--report"], "give --to MODE --out DIR"),
])
def test_quantize_cli_bad_input(tmp_path, capsys, argv, message):
    argv = [a.replace("X", str(tmp_path / "out")) for a in argv]
    assert main(["quantize", "--checkpoint", str(FIXTURE), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_quantize_cli_unknown_mode(capsys):
    with pytest.raises(SystemExit) as e:
        main(["quantize", "--checkpoint", str(FIXTURE), "--to", "int3", "--out", "x"])
    assert e.value.code == 2 and "invalid choice: 'int3'" in capsys.readouterr().err


def test_quantising_a_quantised_checkpoint_is_refused(tmp_path, capsys):
    assert main(["quantize", "--checkpoint", str(FIXTURE), "--to", "int8", "--out", str(tmp_path / "q")]) == 0
    assert main(["quantize", "--checkpoint", str(tmp_path / "q"), "--to", "int8", "--out",
                 str(tmp_path / "qq")]) == 2
    assert "already a int8 checkpoint; quantise from float weights" in capsys.readouterr().err
    _, q = load_checkpoint(tmp_path / "q")
    with pytest.raises(GptjaxError, match="params are already int8; convert from float32 weights"):
        convert(q, CONFIG, "int8")
    with pytest.raises(GptjaxError, match=r"params are int8; run them with precision='int8' or 'w8a8' "
                                          r"\(precision='bf16' needs float32 weights\)"):
        get_backend("jax", CONFIG, precision="bf16").forward(q, WINDOWS[:1, :8])
    with pytest.raises(GptjaxError, match="group_size/keep_head apply when quantising float32 weights"):
        get_backend("jax", CONFIG, precision="int8", group_size=16).forward(q, WINDOWS[:1, :8])


@pytest.mark.parametrize("options,message", [
    ({"precision": "int3"}, "precision='int3'; allowed: ['fp32', 'bf16', 'int8', 'w8a8', 'int4', 'fp8']"),
    ({"kv_cache": "fp8"}, "kv_cache='fp8'; allowed: ['fp32', 'bf16', 'int8']"),
    ({"precision": "int8", "group_size": 0}, "group_size=0 must be a positive integer or None"),
])
def test_backend_option_errors(options, message):
    for name in ("jax", "numpy"):
        with pytest.raises(GptjaxError, match=message.replace("[", r"\[").replace("(", r"\(")):
            get_backend(name, CONFIG, **options)


def test_group_size_must_divide_the_width():
    with pytest.raises(GptjaxError, match="group_size=48 must be a positive integer dividing the input width 64"):
        get_backend("jax", CONFIG, precision="int8", group_size=48).forward(PARAMS, WINDOWS[:1, :8])


def test_corrupt_quantised_params_are_named():
    q = convert(PARAMS, CONFIG, "int8")
    bad = dict(q)
    del bad["h.1.attn.c_proj.weight_scale"]
    with pytest.raises(GptjaxError, match=r"'h.1.attn.c_proj.weight' is int8 but 'h.1.attn.c_proj.weight_scale'"):
        get_backend("numpy", CONFIG, precision="int8").prepare(bad)
    bad = dict(q, **{"h.0.mlp.c_fc.weight_scale": np.ones(7, np.float32)})
    with pytest.raises(GptjaxError, match=r"'h.0.mlp.c_fc.weight_scale' has shape \(7,\)"):
        get_backend("jax", CONFIG, precision="int8").prepare(bad)
    bad = dict(q, **{"h.0.ln_1.weight": q["h.0.ln_1.weight"].astype(np.int8)})
    with pytest.raises(GptjaxError, match="'h.0.ln_1.weight' is int8, but only matmul weights may be quantised"):
        get_backend("jax", CONFIG, precision="int8").prepare(bad)


def test_memory_accounting_is_the_sum_of_array_bytes():
    for mode in ("fp32", "bf16", "int8"):
        params = convert(PARAMS, CONFIG, mode)
        assert weight_bytes(params) == sum(a.nbytes for a in params.values()) == CONFIG.weight_bytes(mode)
        weights = get_backend("jax", CONFIG, precision=mode).prepare(params)
        on_device = sum(a.nbytes for a in jax.tree.leaves(weights.state))
        assert on_device == CONFIG.weight_bytes(mode)  # what the backend holds (the head's scales included)
    assert CONFIG.weight_bytes("int8") / CONFIG.weight_bytes("fp32") < 0.35  # tiny model: LN/bias/wpe weigh more


def test_int8_kv_cache_halves_bf16_and_matches_the_calculator():
    B, S = 4, 32
    nbytes = {kind: sum(a.nbytes for a in jax.tree.leaves(KVCache.zeros(CONFIG, B, S, kind)))
              for kind in ("fp32", "bf16", "int8")}
    for kind, n in nbytes.items():
        assert n == CONFIG.kv_cache_bytes_per_token(kind) * B * S
    K = CONFIG.head_dim
    assert nbytes["int8"] / nbytes["bf16"] == pytest.approx((K + 4) / (2 * K))  # values halve, + a scale per head


@pytest.mark.parametrize("kv_cache", ["bf16", "int8"])
def test_reduced_precision_caches_are_written_in_place(kv_cache, decode_hlo, monkeypatch):
    # regression: XLA:CPU wrote each token into a bfloat16 cache through a float32 copy of the whole buffer, every
    # decode step (gpt2, B=8, 480 cached tokens, XLA's dots: 56.2 vs 48.5 ms per step); it now holds uint16 bits
    monkeypatch.setenv("GPTJAX_CPU_KERNELS", "0")  # the write, whichever way the cache is read
    backend = get_backend("jax", CONFIG, kv_cache=kv_cache)
    hlo = decode_hlo(lambda: backend.generate(PARAMS, [list(WINDOWS[0, :9])], 6, sampling=GREEDY))
    shape = rf"\d+,{CONFIG.n_head},\d+,{CONFIG.head_dim}"  # [B, H, S, K]
    assert not re.search(rf"= f32\[{shape}\]\{{[0-9,]*\}} dynamic-update-slice", hlo)
    assert re.search(rf"= (u16|s8)\[{shape}\]\{{[0-9,]*\}} (dynamic-update-slice|fusion)", hlo)


def test_int8_kv_cache_decodes_like_the_float_cache():
    prompts = [list(WINDOWS[5, :24]), list(WINDOWS[6, :12])]
    ref = get_backend("jax", CONFIG).generate(PARAMS, prompts, 32, sampling=GREEDY).tokens
    out = get_backend("jax", CONFIG, kv_cache="int8").generate(PARAMS, prompts, 32, sampling=GREEDY).tokens
    agree = np.mean([a == b for r, o in zip(ref, out) for a, b in zip(r, o)])
    assert agree > 0.9  # greedy decoding may diverge after a near-tie; most tokens agree


@pytest.mark.slow
def test_precision_report_on_the_trained_model():
    modes = [Mode("fp32"), Mode("bf16"), Mode("int8"), Mode("int8", group_size=32), Mode("w8a8")]
    rows = report(CONFIG, PARAMS, WINDOWS, modes, timing={"prompt": 8, "new_tokens": 4, "batches": (1, 2),
                                                          "prefill_len": 16, "runs": 1})
    assert [r.mode for r in rows] == ["fp32", "bf16", "int8", "int8 g32", "w8a8"]
    assert rows[0].perplexity_change == 0 and rows[0].top1_agreement == 1 and rows[0].max_logit_error == 0
    for r in rows[1:]:
        assert abs(r.perplexity_change) < 0.02 and r.top1_agreement > 0.97 and 0 < r.max_logit_error < 0.3
    assert rows[2].weight_bytes == CONFIG.weight_bytes("int8")
    assert rows[1].kv_bytes_per_token == rows[0].kv_bytes_per_token // 2  # bf16 mode keeps a bf16 cache
    assert all(r.prefill_tokens_per_s > 0 and set(r.decode_tokens_per_s) == {1, 2} for r in rows)
    assert json.loads(json.dumps(rows[0].as_dict()))["decode_tokens_per_s"].keys() == {"1", "2"}
    unmeasured = report(CONFIG, PARAMS, None, modes[:2])[1].as_dict()
    assert unmeasured["loss"] is None and "NaN" not in json.dumps(unmeasured)  # strict JSON
    with pytest.raises(GptjaxError, match="the first mode of a precision report must be fp32"):
        report(CONFIG, PARAMS, WINDOWS, DEFAULT_MODES[1:])


@pytest.mark.slow
def test_quantize_report_cli(capsys):
    assert main(["quantize", "--checkpoint", str(FIXTURE), "--report", "--windows", "4", "--no-speed"]) == 0
    out = capsys.readouterr().out
    for mode in ("| fp32 |", "| bf16 |", "| int8 |", "| int8 g64 |", "| w8a8 |", "| int8 kv:int8 |"):
        assert mode in out
    assert "4 validation windows of 64 tokens" in out


def test_for_precision_passes_matching_params_through():
    bf = for_precision(PARAMS, CONFIG, "bf16")
    assert for_precision(bf, CONFIG, "bf16") is bf
    assert precision_of(for_precision(PARAMS, CONFIG, "w8a8")) == "int8"


def test_generate_cli_runs_a_quantised_checkpoint_as_stored(tmp_path, capsys):
    assert main(["quantize", "--checkpoint", str(FIXTURE), "--to", "int8", "--out", str(tmp_path / "q")]) == 0
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(tmp_path / "q"), "--tokens", "100,101,102", "--greedy",
                 "--max-new-tokens", "6", "--kv-cache", "int8"]) == 0
    printed = capsys.readouterr().out.split("\n")[0]
    expected = get_backend("jax", CONFIG, precision="int8", kv_cache="int8").generate(
        PARAMS, [[100, 101, 102]], 6, sampling=GREEDY).tokens[0]
    assert printed == ",".join(map(str, expected))
    assert main(["generate", "--checkpoint", str(tmp_path / "q"), "--tokens", "1", "--precision", "bf16",
                 "--max-new-tokens", "4"]) == 2
    assert "params are int8; run them with precision='int8' or 'w8a8'" in capsys.readouterr().err


# ---- bugs found in review, each with the test that failed before its fix --------------------------------
def test_training_refuses_int8_params():
    from gptjax.train import TrainConfig, create_state

    with pytest.raises(GptjaxError, match="params are int8 .* training needs float weights"):
        create_state(CONFIG, TrainConfig(), convert(PARAMS, CONFIG, "int8"))


def test_checkpoint_metadata_must_be_strings_and_cannot_relabel(tmp_path):
    save_checkpoint(CONFIG, PARAMS, tmp_path / "ck")
    with pytest.raises(GptjaxError, match="metadata 'step': 100; safetensors metadata maps strings to strings"):
        save_checkpoint(CONFIG, PARAMS, tmp_path / "ck", metadata={"step": 100})
    with pytest.raises(GptjaxError, match="'gptjax.precision' is written by save_checkpoint itself"):
        save_checkpoint(CONFIG, PARAMS, tmp_path / "ck", metadata={"gptjax.precision": "bf16"})
    assert load_checkpoint(tmp_path / "ck")[1].keys() == PARAMS.keys()  # the good checkpoint is still there


def test_generate_passes_no_precision_option_to_a_plugin_for_a_float_checkpoint(monkeypatch, capsys):
    from gptjax.backends.numpy_ref import NumpyBackend

    class Plugin(NumpyBackend):
        name = "plugin"
        options = {"dtype": ("float32",)}  # no precision options, as a third-party backend may have

    expected = get_backend("numpy", CONFIG).generate(PARAMS, [[100, 101]], 3, sampling=GREEDY).tokens[0]
    monkeypatch.setattr("gptjax.backends.registry.registered", lambda: {"plugin": ["x:Plugin"]})
    monkeypatch.setattr("gptjax.backends.registry.load", lambda name, value: Plugin)
    assert main(["generate", "--checkpoint", str(FIXTURE), "--tokens", "100,101", "--greedy",
                 "--max-new-tokens", "3", "--backend", "plugin"]) == 0
    assert capsys.readouterr().out.split("\n")[0] == ",".join(map(str, expected))


def test_quantize_out_inside_the_source_and_other_weight_formats(tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(FIXTURE, src)
    (src / "pytorch_model.bin").write_bytes(b"\0" * 1000)
    (src / "onnx").mkdir()
    assert main(["quantize", "--checkpoint", str(src), "--to", "int8", "--out", str(src / "q8")]) == 2
    assert "is the source checkpoint or inside it" in capsys.readouterr().err and not (src / "q8").exists()
    assert main(["quantize", "--checkpoint", str(src), "--to", "int8", "--out", str(tmp_path / "q8")]) == 0
    assert sorted(p.name for p in (tmp_path / "q8").iterdir()) == ["config.json", "model.safetensors"]


@pytest.mark.slow
def test_quantize_report_on_a_width_that_64_does_not_divide(tmp_path, capsys):
    from gptjax import GPTConfig, init_params

    config = GPTConfig(vocab_size=256, n_positions=32, n_layer=1, n_head=2, n_embd=32)
    save_checkpoint(config, init_params(config), tmp_path / "ck")
    assert main(["quantize", "--checkpoint", str(tmp_path / "ck"), "--report", "--windows", "2", "--no-speed"]) == 0
    out = capsys.readouterr().out
    assert "| int8 |" in out and "g64" not in out
    for bad in (["--runs", "0"], ["--windows", "0"], ["--seq-len", "1"]):
        assert main(["quantize", "--checkpoint", str(tmp_path / "ck"), "--report", *bad]) == 2
        assert "must be >= 1, --seq-len >= 2" in capsys.readouterr().err


def test_option_values_none_and_numpy_ints():
    backend = get_backend("numpy", CONFIG, precision="int8", kv_cache=None, group_size=np.int64(16))
    assert backend.kv_cache == "fp32" and backend.quantization["group_size"] == 16
    backend.forward(PARAMS, WINDOWS[:1, :8])  # groups of 16 divide 64
    assert get_backend("jax", CONFIG, precision=None).precision == "fp32"


def test_group_size_and_keep_head_are_int8_only():
    for mode in ("fp32", "bf16"):
        message = f"group_size/keep_head apply to int8/int4/fp8 quantisation, not to {mode}"
        with pytest.raises(GptjaxError, match=message):
            get_backend("numpy", CONFIG, precision=mode, group_size=16).forward(PARAMS, WINDOWS[:1, :8])
        with pytest.raises(GptjaxError, match="apply to int8/int4/fp8 quantisation"):
            convert(PARAMS, CONFIG, mode, keep_head=True)


def test_a_failed_restore_keeps_the_backup(tmp_path, monkeypatch):
    import os

    from gptjax import weights

    save_checkpoint(CONFIG, PARAMS, tmp_path / "ck")
    real = os.replace
    calls = []

    def flaky(src, dst):
        calls.append((src, dst))
        if len(calls) >= 2:  # the swap and then the restore fail
            raise OSError("disk gone")
        return real(src, dst)

    monkeypatch.setattr(weights.os, "replace", flaky)
    with pytest.raises(OSError, match="disk gone"):
        save_checkpoint(CONFIG, PARAMS, tmp_path / "ck")
    monkeypatch.setattr(weights.os, "replace", real)
    backups = list(tmp_path.glob(".ck.old-*/ck"))
    assert len(backups) == 1 and load_checkpoint(backups[0])[1].keys() == PARAMS.keys()  # nothing lost


def test_the_registry_declares_what_the_modes_were():
    from gptjax import precision
    from gptjax.backends.base import PRECISION_OPTIONS

    assert PRECISION_OPTIONS["precision"] == ("fp32", "bf16", "int8", "w8a8", "int4", "fp8")
    assert PRECISION_OPTIONS["kv_cache"] == ("fp32", "bf16", "int8")
    assert [precision.storage(m) for m in precision.MODES] == ["fp32", "bf16", "int8", "int8", "int4", "fp8"]
    assert [precision.default_kv_cache(m) for m in precision.MODES] == ["fp32", "bf16", "fp32", "fp32", "fp32", "fp32"]
    assert [m.compute_dtype for m in precision.MODES.values()] == ["fp32", "bf16", "fp32", "int8", "fp32", "fp32"]
    assert [m.per_token_above for m in precision.MODES.values()] == [None, None, INT8_PER_TOKEN_ABOVE, None, None, None]
    assert precision.training_modes() == ("fp32", "bf16")
    assert [m.options for m in precision.MODES.values()] == [(), (), *[("group_size", "keep_head")] * 4]
    assert [(s.dtype, s.bits, s.group_size, s.head_storage) for s in precision.STORAGES.values()] == [
        ("float32", 8, None, "fp32"), ("bfloat16", 8, None, "fp32"), ("int8", 8, None, "fp32"),
        ("uint8", 4, 64, "int8"), ("float8_e4m3fn", 8, None, "fp32")]
    assert precision.INT4_GROUP_SIZES == (32, 64, 128)
    assert CONFIG.weight_bytes("w8a8") == CONFIG.weight_bytes("int8")
    with pytest.raises(GptjaxError, match="precision 'int3'; allowed: fp32, bf16, int8, w8a8, int4"):
        precision.mode("int3")


@pytest.mark.parametrize("backend", ["jax", "numpy"])
def test_int8_prefill_computes_as_w8a8_above_its_token_threshold(backend):
    # a pass of more than INT8_PER_TOKEN_ABOVE tokens runs weight-only int8 as w8a8 (one int8 term per token:
    # half the int8 dot of two 16-bit terms); shorter passes (decode, speculative verification) stay weight-only.
    # The JAX backend pads 64 tokens to 64 and 65 to 128: the threshold holds on the tokens given, in both backends
    tokens = _text_tokens(2, INT8_PER_TOKEN_ABOVE + 1)
    config = dataclasses.replace(CONFIG, n_positions=2 * CONFIG.n_positions)  # the trained model, positions twice
    params = {**PARAMS, "wpe.weight": np.concatenate([PARAMS["wpe.weight"]] * 2)}

    def logits(precision, T):
        return get_backend(backend, config, precision=precision).forward(params, tokens[:, :T])

    above, at = INT8_PER_TOKEN_ABOVE + 1, INT8_PER_TOKEN_ABOVE
    np.testing.assert_array_equal(logits("int8", above), logits("w8a8", above))
    assert np.abs(logits("int8", at) - logits("w8a8", at)).max() > 1e-3


def test_every_mode_has_its_code_in_both_backends():
    # the registry declares a mode; both backends build it from tables keyed by the registry's names, with generic
    # entries for a new weight-only storage: every mode resolves a formulation (with and without the CPU kernels)
    from gptjax import precision, quantize
    from gptjax.backends import numpy_ref
    from gptjax.backends.jax import kv, lowp

    assert set(quantize.CONVERTERS) == set(precision.STORAGES)
    assert set(quantize.QUANTISERS) == {s.name for s in precision.STORAGES.values() if s.scaled}
    for m in precision.MODES.values():
        storage = precision.STORAGES[m.storage]
        computes = [m.compute_dtype] + ([precision.PER_TOKEN] if m.per_token_above is not None else [])
        for compute in computes:
            assert all(lowp.formulation(storage, compute, kernels).dense for kernels in (False, True)), m
            assert compute in numpy_ref.GROUP_DOTS if storage.scaled else compute == storage.name, m
        if storage.scaled:  # its tables multiply weight-only
            assert all(lowp.formulation(storage, "fp32", kernels).head for kernels in (False, True)), m
    assert set(kv.KV_FORMATS) == set(numpy_ref.CACHES) == set(precision.KV_CACHES)
    with pytest.raises(GptjaxError, match="no matmul formulation for int4 weights with int8 activations"):
        lowp.formulation(precision.STORAGES["int4"], "int8")


# ---- fp8: a weight-only mode added as a registry entry, a quantiser and a safetensors dtype code -----------------
def test_fp8_quantiser_rounds_to_the_nearest_e4m3_number_and_never_overflows():
    from gptjax.quantize import FP8_MAX, dequantize, quantize_fp8

    w = np.random.default_rng(0).normal(0, 0.05, (64, 48)).astype(np.float32)
    w[:, 3] = 0  # an all-zero channel: scale 1, values 0
    w[5, 7] = 1000.0  # an outlier owns its channel's scale and maps to 448 exactly, never past it (NaN)
    q, scale = quantize_fp8(w, 0)
    assert q.dtype == ml_dtypes.float8_e4m3fn and scale.dtype == np.float32 and scale.shape == (48,)
    values = q.astype(np.float32)
    assert FP8_MAX == 448 and np.isfinite(values).all() and values[5, 7] == 448 and np.abs(values).max() == 448
    assert scale[3] == 1 and not values[:, 3].any()
    back, a = dequantize(q, scale, 0), np.abs(w / scale)
    err = np.abs(back - w) / scale  # in units of each channel's scale
    assert np.all(err[a >= 2**-6] <= a[a >= 2**-6] / 16)  # normals: 3 mantissa bits, within 1/16 of the value
    assert np.all(err[a < 2**-6] <= 2**-10)  # subnormals: steps of 2^-9
    grouped, gscale = quantize_fp8(w, 0, 16)
    assert gscale.shape == (4, 48) and np.abs(dequantize(grouped, gscale, 0, 16) - w).max() < np.abs(back - w).max()


def test_fp8_logits_stay_within_the_registrys_tolerance_of_the_float64_oracle():
    from gptjax.precision import mode

    tokens = WINDOWS[:4, :48]
    oracle = get_backend("numpy", CONFIG, dtype="float64").forward(PARAMS, tokens)
    bound = mode("fp8").tolerance * max(1.0, float(np.abs(oracle).max()))
    for name in ("jax", "numpy"):
        logits = get_backend(name, CONFIG, precision="fp8").forward(PARAMS, tokens)
        err = np.abs(logits - oracle).max()
        assert 1e-3 < err < bound / 2, name  # measured 0.034 of max |logit| (int8: 0.005, int4: 0.077)
    inputs, targets = WINDOWS[:, :-1], WINDOWS[:, 1:]
    ref, out = (get_backend("jax", CONFIG, precision=p).forward(PARAMS, inputs) for p in ("fp32", "fp8"))
    assert abs(_nll(out, targets) - _nll(ref, targets)) < 0.01 * _nll(ref, targets)  # bits/byte within 1%


@pytest.mark.parametrize("options", [{}, {"group_size": 16}, {"keep_head": True}])
def test_fp8_jax_and_numpy_give_the_same_tokens(options):
    from gptjax import precision as registry

    prompts = [list(WINDOWS[0, :20]), list(WINDOWS[1, :9]), list(WINDOWS[2, :31])]
    backends = [get_backend(name, CONFIG, precision="fp8", **options) for name in ("jax", "numpy")]
    logits = [b.forward(PARAMS, WINDOWS[:2, :40]) for b in backends]
    np.testing.assert_allclose(logits[0], logits[1], atol=2e-4)  # the same fp8 values, dequantised in float32
    results = [b.generate(PARAMS, prompts, 24, sampling=GREEDY) for b in backends]
    assert results[0].tokens == results[1].tokens and all(len(t) == 24 for t in results[0].tokens)
    converted = convert(PARAMS, CONFIG, "fp8", **options)
    assert weight_bytes(converted) == registry.weight_bytes(CONFIG, "fp8", **options)  # the size calculator's
    on_device = sum(a.nbytes for a in jax.tree.leaves(backends[0].prepare(PARAMS).state))
    assert on_device == weight_bytes(converted)  # what the JAX backend holds: the fp8 bytes and their scales


def test_fp8_checkpoint_round_trips_through_safetensors_f8_e4m3_bit_exactly(tmp_path, capsys):
    from gptjax.safetensors_io import read_header

    out = tmp_path / "fp8"
    assert main(["quantize", "--checkpoint", str(FIXTURE), "--to", "fp8", "--out", str(out)]) == 0
    assert "(fp8)" in capsys.readouterr().out
    header, metadata, _ = read_header(str(out / "model.safetensors"))
    assert header["transformer.h.0.mlp.c_fc.weight"]["dtype"] == "F8_E4M3" and metadata["gptjax.precision"] == "fp8"
    assert header["transformer.h.0.mlp.c_fc.weight_scale"]["dtype"] == "F32"
    config, loaded = load_checkpoint(out)
    assert stored_precision(out) == "fp8" and precision_of(loaded) == "fp8"
    expected = convert(PARAMS, CONFIG, "fp8")
    assert loaded.keys() == expected.keys()
    for key, value in expected.items():
        assert loaded[key].dtype == value.dtype and loaded[key].tobytes() == value.tobytes(), key  # bit-exact
    assert get_backend("numpy", config, precision="fp8").prepare(loaded)["wte.weight"].q is loaded["wte.weight"]
    prompts = [list(WINDOWS[3, :16]), list(WINDOWS[4, :5])]
    stored = get_backend("jax", config, precision="fp8").generate(loaded, prompts, 16, sampling=GREEDY).tokens
    assert stored == get_backend("jax", CONFIG, precision="fp8").generate(PARAMS, prompts, 16, sampling=GREEDY).tokens
    assert main(["generate", "--checkpoint", str(out), "--tokens", "100,101,102", "--greedy",
                 "--max-new-tokens", "4"]) == 0  # runs as stored: the checkpoint says fp8
    expected_tokens = get_backend("jax", CONFIG, precision="fp8").generate(PARAMS, [[100, 101, 102]], 4,
                                                                            sampling=GREEDY).tokens[0]
    assert capsys.readouterr().out.split("\n")[0] == ",".join(map(str, expected_tokens))
    assert main(["info", str(out)]) == 0
    assert "x F8_E4M3" in capsys.readouterr().out


def test_fp8_bad_input_is_named(tmp_path, capsys):
    q = convert(PARAMS, CONFIG, "fp8")
    with pytest.raises(GptjaxError, match=r"'h.1.attn.c_proj.weight' is fp8 but 'h.1.attn.c_proj.weight_scale'"):
        get_backend("numpy", CONFIG, precision="fp8").prepare({k: v for k, v in q.items()
                                                                if k != "h.1.attn.c_proj.weight_scale"})
    bad = dict(q, **{"h.0.ln_1.weight": q["h.0.ln_1.weight"].astype(ml_dtypes.float8_e4m3fn)})
    with pytest.raises(GptjaxError, match="'h.0.ln_1.weight' is float8_e4m3fn, but only matmul weights may be"):
        get_backend("jax", CONFIG, precision="fp8").prepare(bad)
    with pytest.raises(GptjaxError, match=r"params are fp8; run them with precision='fp8' \(precision='int8' needs"):
        get_backend("jax", CONFIG, precision="int8").prepare(q)
    with pytest.raises(GptjaxError, match="params are already fp8; convert from float32 weights"):
        convert(q, CONFIG, "fp8")
    with pytest.raises(GptjaxError, match="group_size=48 must be a positive integer dividing the input width 64"):
        convert(PARAMS, CONFIG, "fp8", group_size=48)
    save_checkpoint(CONFIG, q, tmp_path / "q")
    assert main(["quantize", "--checkpoint", str(tmp_path / "q"), "--to", "fp8", "--out", str(tmp_path / "qq")]) == 2
    assert "already a fp8 checkpoint; quantise from float weights" in capsys.readouterr().err
    kept = convert(PARAMS, CONFIG, "fp8", keep_head=True)
    assert kept["wte.weight"].dtype == np.float32 and "wte.weight_scale" not in kept
