"""Canonical params, GPT-2 init, checkpoint save/load in the transformers layout, and every bad-file error."""

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import gptjax.weights as weights
from gptjax import GPTConfig, GptjaxError, get_preset, init_params, load_checkpoint, save_checkpoint
from gptjax.weights import param_shapes, validate_params

TINY = GPTConfig(vocab_size=50, n_positions=16, n_layer=2, n_head=2, n_embd=8)


def test_init_is_deterministic_and_gpt2_like():
    a, b = init_params(TINY, seed=3), init_params(TINY, seed=3)
    assert list(a) == list(param_shapes(TINY)) and all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["wte.weight"], init_params(TINY, seed=4)["wte.weight"])
    assert all(v.dtype == np.float32 for v in a.values())
    assert np.all(a["h.0.ln_1.weight"] == 1) and np.all(a["ln_f.bias"] == 0) and np.all(a["h.1.mlp.c_fc.bias"] == 0)
    big = init_params(get_preset("byte-mini"), seed=0)
    assert big["h.0.mlp.c_fc.weight"].std() == pytest.approx(0.02, rel=0.02)
    assert big["h.0.attn.c_proj.weight"].std() == pytest.approx(0.02 / np.sqrt(8), rel=0.02)
    assert big["h.3.mlp.c_proj.weight"].std() == pytest.approx(0.02 / np.sqrt(8), rel=0.02)


def test_validate_params_names_the_key():
    p = init_params(TINY)
    p["h.1.mlp.c_fc.weight"] = np.zeros((8, 31), np.float32)
    with pytest.raises(GptjaxError, match=r"'h.1.mlp.c_fc.weight' has shape \(8, 31\), expected \(8, 32\)"):
        validate_params(TINY, p)
    del p["h.1.mlp.c_fc.weight"]
    with pytest.raises(GptjaxError, match=r"missing keys \['h.1.mlp.c_fc.weight'\]"):
        validate_params(TINY, p)


def test_save_load_round_trip_is_bit_exact(tmp_path):
    p = init_params(TINY, seed=1)
    save_checkpoint(TINY, p, tmp_path / "ckpt")
    config, q = load_checkpoint(tmp_path / "ckpt")
    assert config == TINY and list(q) == list(p)
    assert all(q[k].dtype == np.float32 and np.array_equal(q[k], p[k]) for k in p)


def test_saved_file_is_the_transformers_layout_and_readable_by_safetensors(tmp_path):
    p = init_params(TINY)
    save_checkpoint(TINY, p, tmp_path / "c")
    raw = load_file(str(tmp_path / "c" / "model.safetensors"))
    assert set(raw) == {"transformer." + k for k in p}
    assert np.array_equal(raw["transformer.h.1.attn.c_attn.weight"], p["h.1.attn.c_attn.weight"])
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())
    assert cfg["model_type"] == "gpt2" and cfg["n_layer"] == 2 and cfg["architectures"] == ["GPT2LMHeadModel"]


def test_untied_head_round_trip(tmp_path):
    c = TINY.replace(tie_word_embeddings=False)
    p = init_params(c, seed=2)
    assert "lm_head.weight" in p
    save_checkpoint(c, p, tmp_path / "u")
    assert "lm_head.weight" in load_file(str(tmp_path / "u" / "model.safetensors"))
    c2, q = load_checkpoint(tmp_path / "u")
    assert c2 == c and np.array_equal(q["lm_head.weight"], p["lm_head.weight"])


def test_transformers_checkpoint_loads(hf_tiny_dir):
    config, p = load_checkpoint(hf_tiny_dir)
    assert (config.n_layer, config.n_head, config.n_embd, config.vocab_size) == (2, 4, 32, 97)
    validate_params(config, p)


def _write_raw(tmp_path, tensors, config=TINY, name="model.safetensors"):
    d = tmp_path / "raw"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps(config.to_hf_dict()))
    save_file(tensors, str(d / name), metadata={"format": "pt"})
    return d


@pytest.mark.parametrize("prefix", ["", "transformer."])
def test_hf_key_variants_load(tmp_path, prefix):
    p = init_params(TINY, seed=5)
    tensors = {prefix + k: v for k, v in p.items()}
    tensors |= {f"{prefix}h.{i}.attn.bias": np.tril(np.ones((1, 1, 16, 16), np.float32)) for i in range(2)}
    tensors |= {f"{prefix}h.0.attn.masked_bias": np.array(-1e4, np.float32)}
    tensors["lm_head.weight"] = p["wte.weight"].copy()
    _, q = load_checkpoint(_write_raw(tmp_path, tensors))
    assert set(q) == set(p) and all(np.array_equal(q[k], p[k]) for k in p)


def test_bf16_checkpoint_is_converted_to_float32(tmp_path):
    p = init_params(TINY, seed=6)
    d = _write_raw(tmp_path, {k: v.astype(ml_dtypes.bfloat16) for k, v in p.items()})
    _, q = load_checkpoint(d)
    assert q["wte.weight"].dtype == np.float32
    assert np.array_equal(q["wte.weight"], p["wte.weight"].astype(ml_dtypes.bfloat16).astype(np.float32))


def test_sharded_checkpoint_loads(tmp_path):
    p = init_params(TINY, seed=7)
    d = tmp_path / "sharded"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(TINY.to_hf_dict()))
    keys = list(p)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name, ks in shards.items():
        save_file({"transformer." + k: p[k] for k in ks}, str(d / name))
    weight_map = {"transformer." + k: name for name, ks in shards.items() for k in ks}
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    _, q = load_checkpoint(d)
    assert all(np.array_equal(q[k], p[k]) for k in p)


def _expect(tmp_path, tensors, pattern, config=TINY):
    with pytest.raises(GptjaxError, match=pattern):
        load_checkpoint(_write_raw(tmp_path, tensors, config))


@pytest.mark.parametrize("changes, message", [
    ({"h.1.ln_2.bias": None}, r"missing tensor\(s\) \['h.1.ln_2.bias'\]"),
    ({"h.2.ln_1.weight": np.ones(8, np.float32)}, r"unexpected tensor 'h.2.ln_1.weight'"),
    ({"wpe.weight": np.zeros((17, 8), np.float32)}, r"'wpe.weight' has shape \(17, 8\), expected \(16, 8\)"),
    ({"ln_f.bias": np.zeros(8, np.int32)}, r"'ln_f.bias' has dtype int32"),
    ({"lm_head.weight": np.zeros((50, 8), np.float32)}, r"lm_head.weight differs from wte.weight"),
], ids=["missing", "unexpected", "wrong-shape", "integer-dtype", "untied-head-under-tied-config"])
def test_a_bad_tensor_is_refused_naming_it(tmp_path, changes, message):
    p = {k: v for k, v in (init_params(TINY) | changes).items() if v is not None}  # None: the tensor left out
    _expect(tmp_path, p, message)


def test_pickle_checkpoint_is_refused_without_unpickling(tmp_path):
    d = tmp_path / "pt"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(TINY.to_hf_dict()))
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04 not to be unpickled")
    with pytest.raises(GptjaxError, match=r"pytorch_model.bin.*never unpickles"):
        load_checkpoint(d)


@pytest.mark.parametrize("content,needle", [
    (b"\x01\x02", "shorter than its 8-byte header"),
    (struct.pack("<Q", 10**12) + b"{}", "header length"),
    (struct.pack("<Q", 4) + b"nope", "header is not valid JSON"),
    (struct.pack("<Q", 8) + b'{"a": 1}', "malformed header entry"),
])
def test_corrupt_safetensors_is_named(tmp_path, content, needle):
    d = tmp_path / "bad"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(TINY.to_hf_dict()))
    (d / "model.safetensors").write_bytes(content)
    with pytest.raises(GptjaxError, match=needle) as e:
        load_checkpoint(d)
    assert "model.safetensors" in str(e.value)


def test_missing_dir_config_and_weights(tmp_path):
    with pytest.raises(GptjaxError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(GptjaxError, match="has no config.json"):
        load_checkpoint(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text("{not json")
    with pytest.raises(GptjaxError, match="not valid JSON"):
        load_checkpoint(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text(json.dumps(TINY.to_hf_dict()))
    with pytest.raises(GptjaxError, match="neither model.safetensors nor"):
        load_checkpoint(tmp_path / "empty")


def test_index_with_path_traversal_is_refused(tmp_path):
    d = tmp_path / "idx"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(TINY.to_hf_dict()))
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"wte.weight": "../x.safetensors"}}))
    with pytest.raises(GptjaxError, match="plain"):
        load_checkpoint(d)


def test_save_replaces_an_existing_checkpoint_and_a_failed_save_keeps_it(tmp_path, monkeypatch):
    target = tmp_path / "ckpt"
    save_checkpoint(TINY, init_params(TINY, seed=1), target)
    save_checkpoint(TINY, init_params(TINY, seed=2), target)
    assert np.array_equal(load_checkpoint(target)[1]["wte.weight"], init_params(TINY, seed=2)["wte.weight"])

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(weights, "write_safetensors", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(TINY, init_params(TINY, seed=3), target)
    assert np.array_equal(load_checkpoint(target)[1]["wte.weight"], init_params(TINY, seed=2)["wte.weight"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp dirs left behind


def test_save_validates_before_writing(tmp_path):
    p = init_params(TINY)
    del p["wte.weight"]
    with pytest.raises(GptjaxError, match="missing keys"):
        save_checkpoint(TINY, p, tmp_path / "x")
    assert not (tmp_path / "x").exists()


_PEAK_SCRIPT = """
import re, sys
from gptjax import load_checkpoint
def hwm():  # peak RSS of this process image (ru_maxrss would include the forking parent's)
    return int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
before = hwm()
config, params = load_checkpoint(sys.argv[1])
print(before, hwm(), sum(v.nbytes for v in params.values()))
"""


@pytest.mark.integration
def test_loading_peak_memory_stays_near_checkpoint_size(tmp_path):
    config = GPTConfig(vocab_size=50257, n_positions=1024, n_layer=4, n_head=12, n_embd=768)  # ~200 MB fp32
    save_checkpoint(config, init_params(config), tmp_path / "big")
    out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(tmp_path / "big")], check=True,
                         capture_output=True, text=True).stdout
    before, peak, size = map(int, out.split())
    assert size == 4 * config.num_params()
    assert peak - before < 1.25 * size, f"loading grew RSS by {(peak - before) / size:.2f}x the checkpoint"
    shutil.rmtree(tmp_path / "big")


def test_save_keeps_tokenizer_files_and_drops_stale_shards(tmp_path):
    target = tmp_path / "ck"
    target.mkdir()
    (target / "tokenizer.json").write_text("{}")
    (target / "README.md").write_text("mine")
    (target / "model-00001-of-00002.safetensors").write_bytes(b"stale")
    (target / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    save_checkpoint(TINY, init_params(TINY, seed=1), target)
    assert sorted(p.name for p in target.iterdir()) == ["README.md", "config.json", "model.safetensors",
                                                        "tokenizer.json"]
    assert (target / "README.md").read_text() == "mine"
    load_checkpoint(target)


def test_saved_directory_is_not_private(tmp_path):
    save_checkpoint(TINY, init_params(TINY), tmp_path / "ck")
    assert (tmp_path / "ck").stat().st_mode & 0o777 == 0o777 & ~weights._umask()
    assert (tmp_path / "ck").stat().st_mode & 0o055  # group/others can read (under the usual umask 022)


def test_big_endian_params_are_saved_little_endian(tmp_path):
    p = {k: v.astype(">f4") for k, v in init_params(TINY, seed=9).items()}
    save_checkpoint(TINY, p, tmp_path / "be")
    _, q = load_checkpoint(tmp_path / "be")
    assert np.array_equal(q["wte.weight"], p["wte.weight"])


def _header_file(tmp_path, header: bytes, data: bytes = b"") -> Path:
    d = tmp_path / "hostile"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps(TINY.to_hf_dict()))
    (d / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + data)
    return d


@pytest.mark.parametrize("header,data,needle", [
    (b'{"a": {"dtype": "F32", "shape": [1180591620717411303424], "data_offsets": [0, 4]}}', b"", "malformed"),
    (b'{"a": {"dtype": "F32", "shape": [4294967296, 4294967296], "data_offsets": [0, 0]}}', b"", "malformed"),
    (b'{"a": {"dtype": "F32", "shape": [true], "data_offsets": [0, 4]}}', b"\0" * 4, "malformed"),
    (b'{"a": {"dtype": "F32", "shape": [' + b"1," * 99 + b'1], "data_offsets": [0, 4]}}', b"\0" * 4, "malformed"),
    (b"[" * 200_000 + b"]" * 200_000, b"", "not valid JSON"),
    (b'{"a": 1' + b"0" * 5000 + b"}", b"", "not valid JSON"),
    (b'{"a": {"dtype": "F8_E5M2", "shape": [1], "data_offsets": [0, 1]}}', b"\0", "dtype 'F8_E5M2'"),
    (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
     b'"b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', b"\0" * 4, "must not overlap"),
    (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}', b"\0" * 8, "starts at byte 4, expected 0"),
    (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', b"\0" * 8, "cover 4 bytes but"),
    (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
     b'"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', b"\0" * 4, "names a tensor twice"),
    (b'{"__metadata__": {"format": 1}}', b"", "__metadata__ must map strings to strings"),
])
def test_hostile_headers_get_a_named_error(tmp_path, header, data, needle):
    with pytest.raises(GptjaxError, match=needle):
        load_checkpoint(_header_file(tmp_path, header, data))


def test_non_utf8_config_and_index(tmp_path):
    d = tmp_path / "enc"
    d.mkdir()
    (d / "config.json").write_bytes(b"\xff\xfe")
    with pytest.raises(GptjaxError, match="config.json is not valid JSON"):
        load_checkpoint(d)
    (d / "config.json").write_text(json.dumps(TINY.to_hf_dict()))
    (d / "model.safetensors.index.json").write_bytes(b"\xff\xfe")
    with pytest.raises(GptjaxError, match="is not a safetensors index"):
        load_checkpoint(d)


def test_integer_params_are_refused():
    p = init_params(TINY)
    p["ln_f.bias"] = np.zeros(8, np.int64)
    with pytest.raises(GptjaxError, match="'ln_f.bias' has dtype int64; params must be floating point"):
        validate_params(TINY, p)


# ---- issue 15: hostile checkpoints -------------------------------------------------------------
def _load_in_child(directory, timeout=60):
    """load_checkpoint in a child process (a hang or a memory blow-up must not take the test run with it)."""
    code = ("import sys\nfrom gptjax import GptjaxError, load_checkpoint\n"
            "try:\n    load_checkpoint(sys.argv[1])\nexcept GptjaxError as e:\n    print('REFUSED', e)\n")
    return subprocess.run([sys.executable, "-c", code, str(directory)], capture_output=True, text=True,
                          timeout=timeout)


def test_a_huge_n_layer_is_refused_before_anything_proportional_is_built(tmp_path):
    save_checkpoint(TINY, init_params(TINY), tmp_path / "ck")
    (tmp_path / "ck" / "config.json").write_text(json.dumps(TINY.replace(n_layer=10**9).to_hf_dict()))
    out = _load_in_child(tmp_path / "ck")  # before the fix: loops in param_shapes, ~100 MB/s of dicts
    assert out.stdout.startswith("REFUSED") and "n_layer=1000000000" in out.stdout, out.stderr[-2000:]


@pytest.mark.parametrize("dtype", [b"5", b"null", b'["F32"]'])
def test_a_non_string_dtype_is_named(tmp_path, dtype):
    header = b'{"wte.weight": {"dtype": ' + dtype + b', "shape": [1], "data_offsets": [0, 4]}}'
    with pytest.raises(GptjaxError, match=r"tensor 'wte.weight' has dtype .*must be a string"):
        load_checkpoint(_header_file(tmp_path, header, b"\0" * 4))


@pytest.mark.parametrize("content", [b"[" * 100_000 + b"]" * 100_000, b'{"n_layer": 1' + b"0" * 5000 + b"}"])
def test_a_hostile_config_or_index_names_the_file(tmp_path, content):
    d = tmp_path / "ck"
    save_checkpoint(TINY, init_params(TINY), d)
    (d / "config.json").write_bytes(content)
    with pytest.raises(GptjaxError, match="config.json is not valid JSON"):
        load_checkpoint(d)
    (d / "config.json").write_text(json.dumps(TINY.to_hf_dict()))
    (d / "model.safetensors.index.json").write_bytes(content)
    with pytest.raises(GptjaxError, match="index.json is not a safetensors index"):
        load_checkpoint(d)


def test_header_size_is_capped_before_reading(tmp_path):
    d = _header_file(tmp_path, b"{}")
    with open(d / "model.safetensors", "r+b") as f:  # a sparse 64 MiB file claiming a 32 MiB header
        f.write(struct.pack("<Q", 32 * 2**20))
        f.truncate(64 * 2**20)
    with pytest.raises(GptjaxError, match=r"header of 33554432 bytes exceeds gptjax's limit of 16777216"):
        load_checkpoint(d)


def test_tensor_count_is_capped_and_each_header_parsed_once(tmp_path, monkeypatch):
    many = b",".join(b'"t%d": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}' % i for i in range(5000))
    with pytest.raises(GptjaxError, match="5000 tensors; gptjax reads at most 4096"):
        load_checkpoint(_header_file(tmp_path, b"{" + many + b"}"))
    import gptjax.safetensors_io as sio
    parses = []
    real = sio._parse_json
    monkeypatch.setattr(sio, "_parse_json", lambda *a: parses.append(a[0]) or real(*a))
    save_checkpoint(TINY, init_params(TINY), tmp_path / "ok")
    load_checkpoint(tmp_path / "ok")
    assert len(parses) == 1  # before: 2 (stored_precision, then iter_tensors)


def test_a_shard_linking_outside_the_directory_is_refused(tmp_path):
    save_checkpoint(TINY, init_params(TINY), tmp_path / "elsewhere")
    d = tmp_path / "ck"
    d.mkdir()
    shutil.copy(tmp_path / "elsewhere" / "config.json", d / "config.json")
    (d / "model.safetensors").symlink_to(tmp_path / "elsewhere" / "model.safetensors")
    with pytest.raises(GptjaxError, match="links outside the checkpoint directory"):
        load_checkpoint(d)
    (d / "model.safetensors").unlink()  # a link that stays inside is fine (and so is a HF cache snapshot's)
    shutil.copy(tmp_path / "elsewhere" / "model.safetensors", d / "blob")
    (d / "model.safetensors").symlink_to("blob")
    load_checkpoint(d)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_non_finite_weight_is_refused_naming_the_tensor(tmp_path, bad):
    p = init_params(TINY)
    p["h.1.attn.c_proj.weight"][3, :2] = bad  # two bad values
    save_checkpoint(TINY, p, tmp_path / "ck")
    with pytest.raises(GptjaxError, match=r"h\.1\.attn\.c_proj\.weight' has 2 non-finite value\(s\)"):
        load_checkpoint(tmp_path / "ck")


def test_a_non_finite_int8_scale_is_refused_naming_it(tmp_path):
    from gptjax.quantize import convert

    q = convert(init_params(TINY), TINY, "int8")
    scale = next(k for k in q if k.endswith("_scale"))
    q[scale] = q[scale].copy()
    q[scale].flat[0] = np.nan
    save_checkpoint(TINY, q, tmp_path / "ck")
    with pytest.raises(GptjaxError, match=rf"{scale}' has 1 non-finite value\(s\)"):
        load_checkpoint(tmp_path / "ck")
