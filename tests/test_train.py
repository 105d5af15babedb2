"""Training: exact resume, crash safety, non-finite handling, TensorBoard logs, export, bad input, the CLI."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import wait_until

from gptjax import GPTConfig, GptjaxError, get_backend, load_checkpoint
from gptjax.cli import main
from gptjax.sampling import GREEDY
from gptjax.train import (TrainConfig, TrainingStopped, TrainOptions, create_state, loss_fn, make_train_step, train,
                          train_step)

CONFIG = GPTConfig(vocab_size=256, n_positions=32, n_layer=2, n_head=2, n_embd=32)
TC = TrainConfig(batch_size=4, seq_len=32, max_steps=6, warmup_steps=2, eval_every=3, eval_batches=2,
                 checkpoint_every=3, log_every=1, lr=3e-3, min_lr=3e-4)


def _run(out, corpus, tc=TC, **kwargs):
    return train(CONFIG, tc, out, TrainOptions(data_spec=corpus, progress=False, peak_flops=1e11, **kwargs))


def _nan_loss(*args, **kwargs):
    return loss_fn(*args, **kwargs) + jnp.nan  # a non-finite loss (its gradients stay finite)


NAN_STEP = make_train_step(_nan_loss)


def _nan_at(monkeypatch, steps):
    """Make the loop's 1-based `steps` non-finite, through the seam gptjax.train.loop.step_function."""
    monkeypatch.setattr("gptjax.train.loop.step_function", lambda step: NAN_STEP if step in steps else train_step)


@pytest.mark.slow
def test_resume_gives_exactly_the_uninterrupted_losses_and_weights(tmp_path, corpus):
    straight = _run(tmp_path / "a", corpus)
    first = _run(tmp_path / "b", corpus, stop_at_step=3)
    assert first.steps == 3 and first.stop_reason == "stop_at_step"
    second = train(CONFIG, TC, tmp_path / "b", TrainOptions(resume=True, progress=False, peak_flops=1e11))
    assert second.steps == 6
    assert first.losses + second.losses == straight.losses  # bit-equal on CPU
    a, b = load_checkpoint(tmp_path / "a" / "model")[1], load_checkpoint(tmp_path / "b" / "model")[1]
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert np.isfinite(straight.val_loss) and straight.losses[-1] < straight.losses[0]


def test_export_loads_in_the_inference_backends_and_eval_agrees(tmp_path, corpus, capsys):
    result = _run(tmp_path / "r", corpus, tc=dataclasses.replace(TC, max_steps=3))
    config, params = load_checkpoint(tmp_path / "r" / "model")
    assert config == CONFIG
    tokens = np.arange(10)[None]
    np.testing.assert_allclose(get_backend("jax", config).forward(params, tokens),
                               get_backend("numpy", config).forward(params, tokens), atol=1e-4)
    assert main(["eval", "--checkpoint", str(tmp_path / "r" / "model"), "--data", corpus, "--batch-size", "4",
                 "--max-batches", "2"]) == 0
    out = capsys.readouterr().out
    reported = float(out.split("loss ")[1].split()[0])
    assert reported == pytest.approx(result.val_loss, abs=1e-4)
    assert "bits/byte" in out and "perplexity" in out


@pytest.mark.integration
def test_nonfinite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, corpus, monkeypatch):
    _nan_at(monkeypatch, {5})
    with pytest.raises(TrainingStopped, match=r"step 5: non-finite loss nan .* last good checkpoint is step 3"):
        _run(tmp_path / "n", corpus)
    import orbax.checkpoint as ocp

    manager = ocp.CheckpointManager((tmp_path / "n" / "checkpoints").absolute())
    assert manager.all_steps() == [3]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "n" / "tb"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("train/nonfinite_step")] == [5]
    assert len(acc.Scalars("train/loss")) == 4  # the metrics up to the failure were written


def test_skip_nonfinite_skips_the_update(tmp_path, corpus, monkeypatch):
    _nan_at(monkeypatch, {2, 5})
    result = _run(tmp_path / "s", corpus, skip_nonfinite=True)
    assert result.skipped_steps == [2, 5] and result.steps == 6
    assert len(result.losses) == 4 and all(np.isfinite(result.losses))


def test_a_nonfinite_step_leaves_weights_and_optimizer_untouched():
    graphdef, state = create_state(CONFIG, TC)
    x = np.random.default_rng(0).integers(0, 256, (1, 4, 33)).astype(np.int32)
    before = jax.tree.map(np.asarray, state)
    after, metrics = NAN_STEP(graphdef, TC, state, x[..., :-1], x[..., 1:])
    assert not bool(metrics.finite) and int(after.step) == 1
    for a, b in zip(jax.tree.leaves(before.params) + jax.tree.leaves(before.opt_state),
                    jax.tree.leaves(after.params) + jax.tree.leaves(after.opt_state)):
        np.testing.assert_array_equal(a, np.asarray(b))


def test_gradient_accumulation_equals_the_big_batch():
    x = np.random.default_rng(1).integers(0, 256, (4, 33)).astype(np.int32)
    big = dataclasses.replace(TC, batch_size=4, grad_accum=1)
    small = dataclasses.replace(TC, batch_size=2, grad_accum=2)
    g, s1 = create_state(CONFIG, big)
    _, s2 = create_state(CONFIG, small)
    s1, m1 = train_step(g, big, s1, x[None, :, :-1], x[None, :, 1:])
    s2, m2 = train_step(g, small, s2, x.reshape(2, 2, 33)[..., :-1], x.reshape(2, 2, 33)[..., 1:])
    assert float(m1.loss) == pytest.approx(float(m2.loss), abs=1e-6)
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_bf16_compute_and_dropout():
    x = np.random.default_rng(2).integers(0, 256, (1, 4, 33)).astype(np.int32)
    losses = {}
    for name, tc in {"fp32": TC, "bf16": dataclasses.replace(TC, compute_dtype="bf16"),
                     "dropout": dataclasses.replace(TC, dropout=0.2)}.items():
        g, s = create_state(CONFIG, tc)
        s, m = train_step(g, tc, s, x[..., :-1], x[..., 1:])
        losses[name] = float(m.loss)
        assert jax.tree.leaves(s.params)[0].dtype == jnp.float32  # master weights stay float32
    assert losses["bf16"] == pytest.approx(losses["fp32"], abs=0.02) and losses["bf16"] != losses["fp32"]
    assert losses["dropout"] != losses["fp32"]


@pytest.mark.integration
def test_tensorboard_events_read_back(tmp_path, corpus):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _run(tmp_path / "tb", corpus)
    acc = EventAccumulator(str(tmp_path / "tb" / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/learning_rate", "train/grad_norm", "train/tokens_per_s", "train/step_time_s",
            "train/mfu", "val/loss", "val/perplexity", "val/bits_per_byte"} <= tags
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]
    assert [e.step for e in acc.Scalars("val/loss")] == [3, 6]
    lr = [e.value for e in acc.Scalars("train/learning_rate")]
    assert lr[0] == 0.0 and max(lr) == pytest.approx(3e-3, rel=1e-5)  # warm-up from 0 to the peak
    assert all(0 < e.value < 1 for e in acc.Scalars("train/mfu"))


_KILL_SCRIPT = """
import sys
from gptjax import GPTConfig
from gptjax.train import TrainConfig, TrainOptions, train
config = GPTConfig(vocab_size=256, n_positions=32, n_layer=2, n_head=2, n_embd=256)
tc = TrainConfig(batch_size=2, seq_len=32, max_steps=10000, eval_every=10000, checkpoint_every=1,
                 keep_checkpoints=3, warmup_steps=1)
train(config, tc, sys.argv[1], TrainOptions(data_spec=sys.argv[2], progress=False, peak_flops=1e11,
                                            resume=sys.argv[3] == "1"))
"""


def _save_in_flight(ckpts: Path, written: bool) -> bool:
    """Whether a save orbax started is not committed yet (its step directory still has a temporary name) and,
    with `written`, has written files already."""
    try:
        tmp = [d for d in ckpts.glob("*.orbax-checkpoint-tmp*") if d.is_dir()]
        return bool(tmp) and (not written or any(f.is_file() for d in tmp for f in d.rglob("*")))
    except OSError:  # orbax renamed or removed it while we looked
        return False


@pytest.mark.slow
@pytest.mark.integration
def test_sigkill_during_saves_leaves_a_restorable_checkpoint(tmp_path, corpus):
    import orbax.checkpoint as ocp

    out = tmp_path / "k"
    ckpts = out / "checkpoints"
    committed = lambda: [int(p) for p in os.listdir(ckpts) if p.isdigit()] if ckpts.exists() else []  # noqa: E731
    # where the kill lands: right after a commit, as a save starts, once the save has written files
    phases = (lambda: True, lambda: _save_in_flight(ckpts, False), lambda: _save_in_flight(ckpts, True))
    previous = 0
    for attempt, phase in enumerate(phases):
        proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(out), corpus, "1" if attempt else "0"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # polled every 5 ms: a save is in flight for only milliseconds
        wait_until(lambda: max(committed(), default=0) >= previous + 2, f"step {previous + 2}'s checkpoint", 120.0,
                   process=proc, poll=0.005)
        wait_until(phase, "a save in flight", 120.0, process=proc, poll=0.005)
        proc.send_signal(signal.SIGKILL)  # a save runs every step: this lands in one
        proc.wait()
        manager = ocp.CheckpointManager(ckpts.absolute())
        latest = manager.latest_step()
        assert latest is not None and latest >= previous + 2
        restored = manager.restore(latest)
        leaves = jax.tree.leaves(restored["state"])
        assert leaves and all(np.isfinite(np.asarray(x)).all() for x in leaves)
        previous = latest
        manager.close()  # the next attempt resumes from it (resume=True), which restores it for real


@pytest.mark.parametrize("argv,needle", [
    (["--data", "/no/such/place"], "does not exist"),
    (["--preset", "gpt5"], "unknown preset 'gpt5'"),
    (["n_layers=3"], "unknown override key 'n_layers'"),
    (["lr=fast"], "override lr='fast': expected float"),
    (["batch_size=2.5"], "override batch_size='2.5': expected int"),
    (["lr=-1"], "lr=-1.0 must be a number >= 0"),
    (["seq_len=64", "n_positions=32"], "seq_len=64 exceeds the model context n_positions=32"),
    (["compute_dtype=fp16"], "compute_dtype='fp16' must be 'fp32' or 'bf16'"),
    (["--tokenizer", "bpe:x"], "bpe:x"),
])
def test_bad_train_input_fails_before_compiling(tmp_path, corpus, argv, needle, capsys):
    before = train_step._cache_size()
    args = ["train", "--out", str(tmp_path / "bad"), "--no-progress", "--peak-flops", "1e11"]
    if "--data" not in argv:
        args += ["--data", corpus]
    assert main(args + argv) == 2
    assert needle in capsys.readouterr().err
    assert train_step._cache_size() == before


def test_corpus_shorter_than_a_window(tmp_path, capsys):
    (tmp_path / "small.txt").write_text("x = 1\n")
    assert main(["train", "--out", str(tmp_path / "o"), "--data", str(tmp_path / "small.txt"), "--no-progress",
                 "n_positions=64", "n_layer=1", "n_embd=32", "n_head=2"]) == 2
    assert "shorter than one context window" in capsys.readouterr().err


def test_existing_run_needs_resume(tmp_path, corpus, capsys):
    _run(tmp_path / "r", corpus, tc=dataclasses.replace(TC, max_steps=1))
    with pytest.raises(GptjaxError, match="already holds a run: pass --resume"):
        _run(tmp_path / "r", corpus)


@pytest.mark.slow
def test_cli_train_runs_and_profiles(tmp_path, corpus, capsys, caplog):
    out = tmp_path / "cli"
    assert main(["train", "--out", str(out), "--data", corpus, "--no-progress", "--max-steps", "4", "--profile", "1",
                 "--tokenizer", "bpe:300", "n_layer=1", "n_embd=32", "n_head=2", "n_positions=32",
                 "batch_size=2", "eval_every=2", "checkpoint_every=2", "--peak-flops", "1e11"]) == 0
    text = capsys.readouterr().out
    assert "done: 4 steps (max_steps)" in text and "--- sample ---" in caplog.text  # via logging, not print
    assert list((out / "profile").rglob("*.xplane.pb"))
    assert (out / "model" / "tokenizer.json").exists()  # generate/eval find the BPE tokenizer
    assert load_checkpoint(out / "model")[0].vocab_size == 300
    assert main(["generate", "--checkpoint", str(out / "model"), "--prompt", "def f(", "--max-new-tokens", "5",
                 "--greedy"]) == 0
    from gptjax import load_tokenizer

    tokenizer = load_tokenizer(out / "model")
    config, params = load_checkpoint(out / "model")
    expected = get_backend("jax", config).generate(params, [tokenizer.encode("def f(")], 5, sampling=GREEDY).tokens[0]
    assert capsys.readouterr().out == "def f(" + tokenizer.decode(expected).rstrip("\ufffd")


def test_fine_tuning_starts_from_the_checkpoint(tmp_path, corpus):
    base = _run(tmp_path / "base", corpus)
    tuned = train(GPTConfig(), dataclasses.replace(TC, max_steps=2), tmp_path / "tuned",
                  TrainOptions(data_spec=corpus, progress=False, peak_flops=1e11,
                               init_from=tmp_path / "base" / "model"))
    scratch = _run(tmp_path / "scratch", corpus, tc=dataclasses.replace(TC, max_steps=2))
    assert tuned.losses[0] < scratch.losses[0] - 0.2  # it starts where the base model ended, not at random
    assert tuned.losses[0] == pytest.approx(base.losses[-1], abs=0.5)
    assert load_checkpoint(tmp_path / "tuned" / "model")[0] == CONFIG  # the checkpoint's shape, not GPTConfig()


# ---- regressions found in review ---------------------------------------------------------------------------
def test_resume_refuses_changed_settings_but_may_extend(tmp_path, corpus):
    _run(tmp_path / "r", corpus, tc=dataclasses.replace(TC, max_steps=2))
    with pytest.raises(GptjaxError, match=r"settings differ from .*run.json: \['lr'\]"):
        train(CONFIG, dataclasses.replace(TC, max_steps=2, lr=1e-2), tmp_path / "r",
              TrainOptions(resume=True, progress=False, peak_flops=1e11))
    extended = train(None, dataclasses.replace(TC, max_steps=4), tmp_path / "r",
                     TrainOptions(resume=True, progress=False, peak_flops=1e11))
    assert extended.steps == 4 and len(extended.losses) == 2


@pytest.mark.slow
def test_cli_resume_rejects_overrides_and_keeps_the_saved_data(tmp_path, corpus, capsys, monkeypatch):
    out = tmp_path / "c"
    args = ["train", "--out", str(out), "--no-progress", "--peak-flops", "1e11", "n_layer=1", "n_embd=32",
            "n_head=2", "n_positions=32", "batch_size=2"]
    monkeypatch.chdir(tmp_path)
    assert main(args + ["--data", os.path.relpath(corpus, tmp_path), "--max-steps", "2"]) == 0
    assert json.loads((out / "run.json").read_text())["data"] == corpus  # stored absolute
    assert main(["train", "--out", str(out), "--resume", "lr=0.1"]) == 2
    assert "only --max-steps and --max-time may be given" in capsys.readouterr().err
    monkeypatch.chdir("/")
    assert main(["train", "--out", str(out), "--resume", "--max-steps", "3", "--no-progress",
                 "--peak-flops", "1e11"]) == 0
    assert "done: 3 steps" in capsys.readouterr().out


def test_config_file_data_key_is_used(tmp_path, corpus, capsys):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"model": {"n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 32},
                               "train": {"batch_size": 2, "max_steps": 1}, "data": corpus}))
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "o"), "--no-progress",
                 "--peak-flops", "1e11"]) == 0
    assert json.loads((tmp_path / "o" / "run.json").read_text())["data"] == corpus


def test_a_byte_run_does_not_export_a_stale_bpe_tokenizer(tmp_path, corpus):
    out = tmp_path / "t"
    with pytest.raises(GptjaxError, match="seq_len=64 exceeds"):
        _run(out, corpus, tc=dataclasses.replace(TC, tokenizer="bpe:300", seq_len=64))
    assert (out / "tokenizer.json").exists()
    _run(out, corpus, tc=dataclasses.replace(TC, max_steps=1))
    assert not (out / "model" / "tokenizer.json").exists()


def test_eval_reproduces_the_runs_validation_loss(tmp_path, corpus, capsys):
    config = CONFIG.replace(n_positions=64)
    tc = dataclasses.replace(TC, max_steps=2, seq_len=32, val_fraction=0.4, eval_batches=1000)
    result = train(config, tc, tmp_path / "e", TrainOptions(data_spec=corpus, progress=False, peak_flops=1e11))
    assert main(["eval", "--checkpoint", str(tmp_path / "e" / "model"), "--data", corpus, "--val-fraction", "0.4",
                 "--seq-len", "32", "--batch-size", "4", "--max-batches", "1000"]) == 0
    reported = float(capsys.readouterr().out.split("loss ")[1].split()[0])
    assert reported == pytest.approx(result.val_loss, abs=1e-4)
    assert reported == pytest.approx(result.val_loss, abs=1e-4) and result.val_bpb > 0


def test_eval_defaults_reproduce_the_runs_validation_loss(tmp_path, corpus, capsys):
    config = CONFIG.replace(n_positions=64)  # a run whose settings all differ from eval's built-in defaults
    tc = dataclasses.replace(TC, max_steps=2, seq_len=16, val_fraction=0.3, batch_size=3, eval_batches=5)
    result = train(config, tc, tmp_path / "e", TrainOptions(data_spec=corpus, progress=False, peak_flops=1e11))
    assert main(["eval", "--checkpoint", str(tmp_path / "e" / "model")]) == 0  # no settings: the run's
    reported = float(capsys.readouterr().out.split("loss ")[1].split()[0])
    assert reported == pytest.approx(result.val_loss, abs=1e-4)


def test_short_validation_split_is_an_error(tmp_path):
    (tmp_path / "one.txt").write_text("def f(x):\n    return x\n" * 20)
    with pytest.raises(GptjaxError, match="validation split has .* fewer than one window"):
        train(CONFIG, TC, tmp_path / "o", TrainOptions(data_spec=str(tmp_path / "one.txt"), progress=False,
                                                       peak_flops=1e11))


def test_tiny_context_and_a_profile_longer_than_the_run(tmp_path, corpus):
    config = CONFIG.replace(n_positions=4)
    tc = dataclasses.replace(TC, seq_len=4, max_steps=2, checkpoint_every=1, eval_every=1)
    result = train(config, tc, tmp_path / "p", TrainOptions(data_spec=corpus, progress=False, peak_flops=1e11,
                                                            profile_steps=5))
    assert result.steps == 2 and sorted(int(p.name) for p in (tmp_path / "p" / "checkpoints").iterdir()) == [1, 2]
    _run(tmp_path / "p2", corpus, tc=dataclasses.replace(TC, max_steps=3), profile_steps=1)  # no trace left open


def test_init_with_model_overrides_is_refused(tmp_path, corpus, capsys):
    _run(tmp_path / "b", corpus, tc=dataclasses.replace(TC, max_steps=1))
    assert main(["train", "--init", str(tmp_path / "b" / "model"), "--data", corpus, "n_layer=3",
                 "--out", str(tmp_path / "x")]) == 2
    assert "model overrides cannot apply" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--data", "--init"])
def test_cli_bad_inputs_create_nothing(tmp_path, capsys, monkeypatch, flag):
    monkeypatch.chdir(tmp_path)  # the default run directory is runs/<timestamp> under the working directory
    assert main(["train", flag, str(tmp_path / "nonexistent"), "--no-progress"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1, captured
    assert "nonexistent" in captured.err and list(tmp_path.iterdir()) == []
