"""The `gptjax` command: help, info tables, demo, errors (exit code 2, no traceback)."""

import re
import subprocess
import sys

import numpy as np
import pytest
from conftest import FIXTURES, stdlib_corpus

from gptjax import ByteTokenizer, data, init_params, save_checkpoint
from gptjax.bench.studies import STUDIES
from gptjax.cli import COMMANDS, main
from gptjax.config import get_preset
from gptjax.heldout import checkpoint_validation_tokens, validation_windows
from gptjax.sampling import SamplingParams
from gptjax.weights import load_config


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert all(cmd in out for cmd in ("info", "demo", "backends"))


def test_info_preset(capsys):
    assert main(["info", "gpt2"]) == 0
    out = capsys.readouterr().out
    assert "| parameters | 124,439,808 |" in out
    assert "| weights fp32 | 474.70 MiB |" in out
    assert "| KV cache per token fp32 | 72.00 KiB |" in out


def test_info_overrides_show_what_shrinking_buys(capsys):
    assert main(["info", "gpt2", "--n-layer", "6", "--n-embd", "384", "--n-head", "6", "--seq-len", "256"]) == 0
    out = capsys.readouterr().out
    assert "| parameters | 124,439,808 | 30,339,456 | 0.244x |" in out
    assert "gpt2 (T=256)" in out


def test_info_checkpoint(tmp_path, capsys):
    config = get_preset("tiny")
    save_checkpoint(config, init_params(config), tmp_path / "ck")
    assert main(["info", str(tmp_path / "ck")]) == 0
    out = capsys.readouterr().out
    assert "| parameters | 35,712 |" in out and "stored tensors: 28 x F32" in out


@pytest.mark.parametrize("argv,needle", [
    (["info", "gpt5"], "unknown preset 'gpt5'"),
    (["info", "gpt2", "--n-head", "7"], "n_embd=768 must be divisible by n_head=7"),
    (["info", "gpt2", "--n-layer", "0"], "n_layer=0 must be a positive integer"),
    (["info", "gpt2", "--seq-len", "5000"], "--seq-len 5000 must be in [1, n_positions]"),
    (["info", "./no/such/dir"], "does not exist"),
    (["demo", "--preset", "tiny", "--seq-len", "65"], "--seq-len 65 must be in [1, 64] for tiny"),
])
def test_errors_are_one_line_with_exit_2(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_demo_backends_agree(capsys):
    assert main(["demo", "--preset", "tiny", "--batch", "2", "--seq-len", "20"]) == 0
    out = capsys.readouterr().out
    assert "numpy backend: logits (2, 20, 256)" in out and "jax backend: logits (2, 20, 256)" in out
    assert "argmax agreement 100.0%" in out


@pytest.mark.integration
def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "gptjax.cli", "backends"], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["jax", "numpy"]


def test_corrupt_checkpoint_in_cli_is_one_line(tmp_path, capsys):
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "config.json").write_bytes(b"\xff\xfe")
    assert main(["info", str(tmp_path / "ck")]) == 2
    err = capsys.readouterr().err
    assert "is not valid JSON" in err and "Traceback" not in err


def test_generate_streams_text_and_ids_matching_the_backend(tmp_path, capsys):
    from gptjax import ByteTokenizer, get_backend

    config = get_preset("tiny")
    params = init_params(config, seed=1)
    save_checkpoint(config, params, tmp_path / "ck")
    prompt = ByteTokenizer().encode("def f")
    expected = get_backend("numpy", config).generate(params, [prompt], 12,
                                                     sampling=SamplingParams(seed=4, temperature=0.8)).tokens[0]
    expected_jax = get_backend("jax", config).generate(params, [prompt], 12,
                                                       sampling=SamplingParams(seed=4, temperature=0.8)).tokens[0]
    assert main(["generate", "--checkpoint", str(tmp_path / "ck"), "--tokens", ",".join(map(str, prompt)),
                 "--max-new-tokens", "12", "--seed", "4", "--temperature", "0.8", "--chunk-size", "5",
                 "--backend", "numpy"]) == 0
    out = capsys.readouterr()
    assert out.out == ",".join(map(str, expected)) and "finish_reason=length" in out.err
    assert main(["generate", "--checkpoint", str(tmp_path / "ck"), "--prompt", "def f", "--max-new-tokens", "12",
                 "--seed", "4", "--temperature", "0.8"]) == 0
    assert capsys.readouterr().out == "def f" + ByteTokenizer().decode(expected_jax).rstrip("\ufffd")


def test_generate_needs_tokens_without_a_tokenizer(tmp_path, capsys):
    config = get_preset("tiny").replace(vocab_size=300)
    save_checkpoint(config, init_params(config), tmp_path / "ck")
    assert main(["generate", "--checkpoint", str(tmp_path / "ck"), "--prompt", "hi"]) == 2
    assert "give the prompt as --tokens 1,2,3" in capsys.readouterr().err
    assert main(["generate", "--checkpoint", str(tmp_path / "ck"), "--tokens", "1,x"]) == 2
    assert "--tokens '1,x' must be comma-separated integers" in capsys.readouterr().err
    assert main(["generate", "--checkpoint", str(tmp_path / "ck"), "--tokens", "1", "--top-p", "0",
                 "--max-new-tokens", "4"]) == 2
    assert "top_p=0.0 must be a number in (0, 1]" in capsys.readouterr().err


def test_generate_refuses_a_huge_n_layer_in_one_line(tmp_path):
    import json

    config = get_preset("tiny")
    save_checkpoint(config, init_params(config), tmp_path / "ck")
    (tmp_path / "ck" / "config.json").write_text(json.dumps(config.replace(n_layer=10**9).to_hf_dict()))
    out = subprocess.run([sys.executable, "-m", "gptjax.cli", "generate", "--checkpoint", str(tmp_path / "ck"),
                          "--tokens", "1,2", "--max-new-tokens", "2"], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "n_layer=1000000000" in lines[0], out.stderr[-2000:]


@pytest.mark.parametrize("dtype", ["5", "null", '["F32"]'])
@pytest.mark.parametrize("command", ["generate", "quantize"])
def test_a_non_string_dtype_is_one_line_for_generate_and_quantize(tmp_path, capsys, command, dtype):
    config = get_preset("tiny")
    save_checkpoint(config, init_params(config), tmp_path / "ck")
    path = tmp_path / "ck" / "model.safetensors"
    blob = path.read_bytes()
    n = int.from_bytes(blob[:8], "little")
    header = blob[8:8 + n].replace(b'"dtype":"F32"', b'"dtype":' + dtype.encode(), 1)
    path.write_bytes(len(header).to_bytes(8, "little") + header + blob[8 + n:])
    argv = (["generate", "--tokens", "1,2", "--max-new-tokens", "2"] if command == "generate"
            else ["quantize", "--to", "int8", "--out", str(tmp_path / "q")])
    assert main([*argv, "--checkpoint", str(tmp_path / "ck")]) == 2
    assert "must be a string" in capsys.readouterr().err


def test_generate_refuses_a_nan_weight_in_one_line(tmp_path):
    config = get_preset("tiny")
    params = init_params(config)
    params["h.0.mlp.c_fc.weight"][0, 0] = float("nan")
    save_checkpoint(config, params, tmp_path / "ck")
    out = subprocess.run([sys.executable, "-m", "gptjax.cli", "generate", "--checkpoint", str(tmp_path / "ck"),
                          "--tokens", "1,2", "--max-new-tokens", "2"], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "h.0.mlp.c_fc.weight' has 1 non-finite value(s)" in lines[0], out.stderr[-2000:]


def test_a_checkpoints_held_out_tokens_are_the_training_split_in_its_tokenizer(tmp_path):
    corpus = stdlib_corpus(tmp_path)
    checkpoint = FIXTURES / "trained_byte_tiny"  # byte-level: no tokenizer files, 256 tokens
    config = load_config(checkpoint)
    tokens, docs = checkpoint_validation_tokens(checkpoint, config, corpus, 0.4)
    want, want_docs = data.validation_tokens(corpus, ByteTokenizer(), 0.4, 256)
    assert np.array_equal(tokens, want) and docs == want_docs
    windows = validation_windows(checkpoint, config, 3, corpus, 0.4)
    assert windows.shape == (3, config.n_positions + 1)
    assert np.array_equal(windows, data.eval_windows(want, config.n_positions, 3))


def test_eval_refuses_what_the_held_out_split_cannot_be_made_of(tmp_path, capsys):
    checkpoint = str(FIXTURES / "trained_byte_tiny")
    assert main(["eval", "--checkpoint", checkpoint, "--val-fraction", "1.0"]) == 2
    assert "val_fraction 1.0 must be in (0, 1)" in capsys.readouterr().err
    config = get_preset("tiny").replace(vocab_size=300)
    save_checkpoint(config, init_params(config), tmp_path / "ck")
    assert main(["eval", "--checkpoint", str(tmp_path / "ck")]) == 2
    assert "has no tokenizer files and a 300-token vocabulary" in capsys.readouterr().err


# ---- paths in help texts and docs: only what a command writes ------------------------------------------------
# the last part of a runs/.../X path must be something `gptjax train` (model, tb, checkpoints[/N], profile,
# run.json) or a bench run or study (results.jsonl) writes; runs/NAME alone is an --out directory
WRITTEN = {"model", "tb", "checkpoints", "profile", "run.json", "results.jsonl"}
RUNS_PATH = re.compile(r"runs/[^\s'\"`),;:]+")
# study helps naming a path nothing writes, each with who fixes it; the test fails once one is fixed
KNOWN_STALE_STUDIES: dict[str, str] = {}  # study -> where its --help names a path nothing writes


def never_written(text: str) -> list[str]:
    """The runs/... paths in text whose last part no gptjax command writes (e.g. runs/latest/export)."""
    bad = []
    for path in RUNS_PATH.findall(text):
        parts = path.rstrip(".").split("/")[1:]
        last = parts[-1] if not parts[-1].isdigit() else parts[-2]  # runs/x/checkpoints/40: a checkpoint step
        if "latest" in parts or (len(parts) > 1 and last not in WRITTEN):
            bad.append(path)
    return bad


def _help(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit):
        main([*argv, "--help"])
    return capsys.readouterr().out


def test_never_written_knows_the_difference():
    assert never_written("--checkpoint runs/latest/export or runs/big/export") == ["runs/latest/export",
                                                                                   "runs/big/export"]
    assert never_written("runs/<timestamp>/model, runs/x/checkpoints/40, --out runs/student, runs/a/tb.") == []


@pytest.mark.parametrize("command", [c.NAME for c in COMMANDS])
def test_help_names_only_paths_that_commands_write(capsys, command):
    assert never_written(_help(capsys, [command])) == []


def test_study_helps_name_only_paths_that_studies_write(capsys):
    stale = {name for name in STUDIES if never_written(_help(capsys, ["bench", "--study", name]))}
    assert stale == set(KNOWN_STALE_STUDIES), "update KNOWN_STALE_STUDIES: fixed, or newly stale"


def test_docs_name_only_paths_that_commands_write():
    root = FIXTURES.parent.parent
    for page in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        assert never_written(page.read_text(encoding="utf-8")) == [], page.name


def test_train_tensorboard_hint_says_how_to_install_it_when_it_is_missing(monkeypatch):
    """`gptjax train`'s last line names a command that runs: the install step first when tensorboard is absent."""
    from gptjax.cli import train as cli_train

    monkeypatch.setattr(cli_train.shutil, "which", lambda name: None)
    assert cli_train.tensorboard_hint("runs/x/tb") == \
        "pip install tensorboard (or '.[tour]'), then tensorboard --logdir runs/x/tb"
    monkeypatch.setattr(cli_train.shutil, "which", lambda name: "/usr/bin/tensorboard")
    assert cli_train.tensorboard_hint("runs/x/tb") == "tensorboard --logdir runs/x/tb"
