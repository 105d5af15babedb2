"""The JSON files gptjax reads (a checkpoint's config.json, its shard index and tokenizer files, a run's run.json,
train --config, the token files' sidecars) refuse a key given twice, naming the key and the file, as request bodies
and safetensors headers do: json.loads keeps the last value without a word (issue 31: layer_norm_epsilon became
0.5), and the tokenizers library does the same, vocabulary entries included."""

import json
import re
import shutil
from pathlib import Path

import pytest
from tokenizers import ByteLevelBPETokenizer

from gptjax import ByteTokenizer, GPTConfig, GptjaxError, init_params, load_checkpoint, load_tokenizer, save_checkpoint
from gptjax.cli import main
from gptjax.data import encode_to_memmap, read_token_meta
from gptjax.errors import parse_json
from gptjax.train import load_run_config

TINY = GPTConfig(vocab_size=50, n_positions=16, n_layer=2, n_head=2, n_embd=8)
TWICE = "the key \"layer_norm_epsilon\" appears twice in one JSON object"


def _twice(text: str, key: str, value: str) -> str:
    """JSON object text with `"key": value` added in front, so that key appears twice."""
    return text.replace("{", f'{{"{key}": {value}, ', 1)


def test_parse_json_refuses_what_json_loads_lets_through():
    assert parse_json('{"a": 1.5, "b": [1, {"c": null}]}', "f") == {"a": 1.5, "b": [1, {"c": None}]}
    for text, needle in [('{"a": 1, "a": 2}', 'f: the key "a" appears twice'),
                         ('{"a": {"b": 1, "b": 1}}', 'f: the key "b" appears twice'),  # the same value too
                         ('{"a": NaN}', "f is not valid JSON: NaN is not a finite number"),
                         ('[-Infinity]', "-Infinity is not a finite number"),
                         ('{"a": 1e400}', "1e400 is not a finite number"),
                         ("[" * 100_000 + "]" * 100_000, "f is not valid JSON: it nests too deeply"),
                         ('{"a": 1' + "0" * 5000 + "}", "f is not valid JSON: Exceeds the limit"),
                         (b"\xff\xfe\xfd", "f is not valid JSON")]:
        with pytest.raises(GptjaxError, match=needle.replace("[", r"\[")):
            parse_json(text, "f")


def test_a_checkpoint_config_with_a_key_twice_names_key_and_file(tmp_path):
    save_checkpoint(TINY, init_params(TINY), tmp_path / "ck")
    config = tmp_path / "ck" / "config.json"
    config.write_text(_twice(config.read_text(), "layer_norm_epsilon", "0.5"))
    with pytest.raises(GptjaxError, match=f"{config}: {TWICE}"):  # before: loaded with layer_norm_epsilon=0.5
        load_checkpoint(tmp_path / "ck")
    with pytest.raises(GptjaxError, match=TWICE):
        GPTConfig.from_json_file(str(config))


def test_a_shard_index_mapping_a_tensor_twice_is_refused(tmp_path):
    save_checkpoint(TINY, init_params(TINY), tmp_path / "ck")
    shutil.move(tmp_path / "ck" / "model.safetensors", tmp_path / "ck" / "a.safetensors")
    index = tmp_path / "ck" / "model.safetensors.index.json"
    index.write_text('{"weight_map": {"transformer.wte.weight": "a.safetensors", '
                     '"transformer.wte.weight": "b.safetensors"}}')
    with pytest.raises(GptjaxError, match='is not a safetensors index .*the key "transformer.wte.weight" appears '
                                          "twice"):
        load_checkpoint(tmp_path / "ck")


@pytest.fixture
def bpe_dir(tmp_path) -> Path:
    trained = ByteLevelBPETokenizer()
    trained.train_from_iterator(["def f(x): return x * 2\n"] * 20, vocab_size=270, min_frequency=1,
                                show_progress=False)
    trained.save(str(tmp_path / "tokenizer.json"))
    trained.save_model(str(tmp_path))  # vocab.json + merges.txt too
    return tmp_path


def test_tokenizer_files_with_a_key_twice_are_refused(bpe_dir):
    file = bpe_dir / "tokenizer.json"
    body = file.read_text()
    file.write_text(re.sub(r'"vocab":\s*{', '"vocab": {"def": 5, ', body, count=1))  # before: "def" kept its last id
    with pytest.raises(GptjaxError, match=f'not a valid tokenizers file: {file}: the key "def" appears twice'):
        load_tokenizer(bpe_dir)
    file.unlink()
    vocab = bpe_dir / "vocab.json"
    vocab.write_text(vocab.read_text().replace("{", '{"def":5,', 1))
    with pytest.raises(GptjaxError, match=f'{vocab}: the key "def" appears twice'):
        load_tokenizer(bpe_dir)


def test_run_json_and_train_config_with_a_key_twice_are_refused(tmp_path, capsys):
    run = tmp_path / "run.json"
    run.write_text(json.dumps({"model": TINY.__dict__ | {"n_layer": 1}, "train": {}, "data": None}))
    assert load_run_config(run)[0].n_layer == 1
    run.write_text(_twice(run.read_text(), "data", '"elsewhere"'))
    with pytest.raises(GptjaxError, match=f'{run}: the key "data" appears twice'):
        load_run_config(run)
    assert main(["train", "--out", str(tmp_path), "--resume"]) == 2
    assert f'{run}: the key "data" appears twice' in capsys.readouterr().err
    spec = tmp_path / "spec.json"
    spec.write_text('{"preset": "tiny", "train": {"lr": 0.1, "lr": 0.2}}')
    assert main(["train", "--config", str(spec), "--out", str(tmp_path / "new")]) == 2
    assert f'--config: {spec}: the key "lr" appears twice' in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_a_token_sidecar_with_a_key_twice_is_not_trusted(tmp_path):
    docs = [("a", "hello world"), ("b", "more text")]
    path = tmp_path / "train.bin"
    encode_to_memmap(docs, ByteTokenizer(), path)
    side = tmp_path / "train.bin.json"
    side.write_text(_twice(side.read_text(), "n_tokens", "3"))
    with pytest.raises(GptjaxError, match='the key "n_tokens" appears twice'):
        read_token_meta(path)
    assert list(encode_to_memmap(docs, ByteTokenizer(), path)) == list(b"hello world\n\nmore text")  # re-encoded
    assert json.loads(side.read_text())["n_tokens"] == 22
