"""Distillation: the loss against NumPy, alpha = 0 is exactly training, a student learns from a teacher faster
than alone, exact resume with TensorBoard terms, cutting a student from a teacher, and bad input refused before
anything is loaded, compiled or created. The teacher is tests/fixtures/trained_byte_tiny (2 layers, width 64,
context 64, 400 steps on the stdlib)."""

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from gptjax import GPTConfig, GptjaxError, init_params, load_checkpoint, save_checkpoint
from gptjax.cli import main
from gptjax.data import Batcher, eval_batches
from gptjax.distill import (
    DistillConfig,
    distill,
    distill_loss,
    load_teacher,
    loss_terms,
    objective,
    student_from_teacher,
    teacher_identity,
    teacher_logits,
)
from gptjax.train import TrainConfig, TrainOptions, create_state, evaluate, loss_fn, train_step
from gptjax.weights import load_config

TEACHER = Path(__file__).parent / "fixtures" / "trained_byte_tiny"
STUDENT = GPTConfig(vocab_size=256, n_positions=32, n_layer=1, n_head=2, n_embd=32)
TC = TrainConfig(batch_size=4, seq_len=32, max_steps=4, warmup_steps=1, eval_every=2, eval_batches=2,
                 checkpoint_every=2, log_every=1)
FILES = ("bisect.py", "colorsys.py", "keyword.py", "textwrap.py", "this.py")


def _reference(s: np.ndarray, t: np.ndarray, labels: np.ndarray, alpha: float, tau: float) -> tuple:
    """float64 NumPy: (loss, ce, kl) as the docstring of gptjax.distill defines them."""
    def log_softmax(z):
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    ce = -np.take_along_axis(log_softmax(s), labels[..., None], -1).mean()
    log_t, log_s = log_softmax(t / tau), log_softmax(s / tau)
    kl = (np.exp(log_t) * (log_t - log_s)).sum(-1).mean()
    return alpha * tau**2 * kl + (1 - alpha) * ce, ce, kl


@pytest.mark.parametrize("alpha,tau", [(0.5, 2.0), (0.3, 0.5), (1.0, 1.0), (0.0, 3.0), (1.0, 4.0)])
def test_loss_matches_a_numpy_reference(alpha, tau):
    rng = np.random.default_rng(0)
    s, t = rng.normal(0, 3, (2, 3, 7)), rng.normal(0, 3, (2, 3, 7))  # [B, T, V]
    t[0, 0, 4] = 20.0  # a confident teacher position
    labels = rng.integers(0, 7, (2, 3))
    loss, terms = loss_terms(s.astype(np.float32), t.astype(np.float32), labels, alpha, tau)
    want, ce, kl = _reference(s, t, labels, alpha, tau)
    np.testing.assert_allclose([float(loss), float(terms["ce"]), float(terms["kl"])], [want, ce, kl], rtol=2e-5)
    agree = (s.argmax(-1) == t.argmax(-1)).mean()
    assert float(terms["top1_agreement"]) == agree and 0 < agree < 1


def test_alpha_zero_is_exactly_train():
    """The loss bit for bit in eager mode, and three jitted steps to bit-equal weights."""
    _, _, teacher = load_teacher(DistillConfig(str(TEACHER), 0.0, 2.0))
    g, state = create_state(STUDENT, TC)
    rng = np.random.default_rng(1)
    xy = rng.integers(0, 256, (3, 1, 4, 33)).astype(np.int32)
    x, y = xy[0, 0, :, :-1], xy[0, 0, :, 1:]
    t = np.asarray(teacher_out := objective(DistillConfig(str(TEACHER), 0.0, 2.0), teacher).targets(x, y)[1])
    assert teacher_out.shape == (4, 32, 256)
    assert np.asarray(distill_loss(0.0, 2.0, state.params, g, x, (y, t))[0]) == np.asarray(
        loss_fn(state.params, g, x, y))
    obj = objective(DistillConfig(str(TEACHER), 0.0, 2.0), teacher)
    _, a = create_state(STUDENT, TC)
    _, b = create_state(STUDENT, TC)
    for i in range(3):
        x, y = xy[i, ..., :-1], xy[i, ..., 1:]  # [A=1, B, T]
        a, ma = train_step(g, TC, a, x, y)
        b, mb = obj.step(g, TC, b, x, obj.targets(x, y))
        assert float(ma.loss) == float(mb.loss) == float(mb.aux["ce"])
    assert all(np.array_equal(p, q) for p, q in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)))


def test_an_int8_teacher_gives_the_backends_logits():
    """--teacher-precision int8: the teacher's forward pass is the JAX backend's int8 model (the registry's
    conversion, gptjax's CPU kernels where they run)."""
    from gptjax import get_backend

    config, params = load_checkpoint(TEACHER)
    _, _, teacher = load_teacher(DistillConfig(str(TEACHER), teacher_precision="int8"))
    x = np.arange(2 * 32, dtype=np.int32).reshape(2, 32) % 200  # [B, T]
    got = np.asarray(teacher_logits(teacher.graphdef, teacher.state, x[None]))[0]
    want = get_backend("jax", config, precision="int8").forward(params, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _steps(config: GPTConfig, tokens: np.ndarray, obj, steps: int, tc: TrainConfig) -> tuple:
    g, state = create_state(config, tc)
    batcher = Batcher(tokens, tc.batch_size, tc.seq_len, seed=0)
    for _ in range(steps):
        x, y = next(batcher)
        x, y = x[None], y[None]  # [A=1, B, T]
        state, _ = obj.step(g, tc, state, x, obj.targets(x, y))
    return g, state


def test_a_distilled_student_learns_faster_than_alone(corpus):
    """40 steps of a teacher-shaped student from the same init on the same batches: alone (alpha 0) vs soft
    targets only (alpha 1, tau 1). Measured here (jax 0.10.2, 2-core EPYC): held-out loss 3.2931 nats/token alone,
    3.2331 distilled, a gap of 0.060 (alpha 0.5, tau 2: 3.2724); the teacher scores 2.78 on such windows."""
    text = "".join((Path(corpus) / f).read_text(encoding="utf-8") for f in FILES)
    tokens = np.frombuffer(text.encode(), np.uint8).astype(np.int64)
    cut = int(len(tokens) * 0.9)
    student = GPTConfig(vocab_size=256, n_positions=32, n_layer=2, n_head=4, n_embd=64)
    tc = TrainConfig(batch_size=8, seq_len=32, max_steps=40, warmup_steps=2, lr=3e-3, min_lr=3e-4)
    losses = {}
    for alpha in (0.0, 1.0):
        dc = DistillConfig(str(TEACHER), alpha, 1.0)
        g, state = _steps(student, tokens[:cut], objective(dc, load_teacher(dc)[2]), 40, tc)
        losses[alpha] = evaluate(g, state.params, eval_batches(tokens[cut:], 8, 32, 20))[0]
    assert losses[0.0] - losses[1.0] > 0.04, losses


def _tags(tb: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb))
    acc.Reload()
    return set(acc.Tags()["scalars"])


def test_resume_is_bit_exact_and_logs_both_terms(tmp_path, corpus, capsys):
    dc = DistillConfig(str(TEACHER), 0.7, 2.0)
    options = TrainOptions(data_spec=corpus, progress=False, peak_flops=1e11)
    straight = distill(STUDENT, TC, dc, tmp_path / "a", options)
    first = distill(STUDENT, TC, dc, tmp_path / "b", TrainOptions(data_spec=corpus, progress=False,
                                                                  peak_flops=1e11, stop_at_step=2))
    assert first.steps == 2 and first.stop_reason == "stop_at_step"
    rest = distill(None, None, None, tmp_path / "b", TrainOptions(resume=True, progress=False, peak_flops=1e11))
    assert first.losses + rest.losses == straight.losses and len(straight.losses) == 4
    a, b = load_checkpoint(tmp_path / "a" / "model")[1], load_checkpoint(tmp_path / "b" / "model")[1]
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert {"train/loss", "train/ce", "train/kl", "train/top1_agreement", "val/kl", "val/top1_agreement"} <= _tags(
        tmp_path / "a" / "tb")
    record = json.loads((tmp_path / "a" / "run.json").read_text())["objective"]
    identity = record.pop("teacher_identity")  # what --resume checks the teacher against
    assert record == {"name": "distill", "teacher": str(TEACHER.resolve()), "alpha": 0.7, "temperature": 2.0,
                      "teacher_precision": None, "init_from_teacher": False}
    assert identity == teacher_identity(*load_checkpoint(TEACHER))
    assert identity["config"] == dataclasses.asdict(load_config(TEACHER)) and len(identity["sha256"]) == 64
    # the objective is part of the run: `gptjax train --resume` refuses a distillation run
    assert main(["train", "--out", str(tmp_path / "b"), "--resume", "--no-progress"]) == 2
    assert "gptjax distill --resume" in capsys.readouterr().err


def test_resume_refuses_another_teacher_naming_what_differs(tmp_path, corpus, capsys):
    """Before: a teacher of another width put where the run's teacher was resumed and finished with exit 0."""
    teacher, out = tmp_path / "teacher", tmp_path / "run"
    shutil.copytree(TEACHER, teacher)
    dc = DistillConfig(str(teacher), 0.7, 2.0)
    options = TrainOptions(data_spec=corpus, progress=False, peak_flops=1e11, stop_at_step=2)
    assert distill(STUDENT, TC, dc, out, options).steps == 2
    resume = ["distill", "--out", str(out), "--resume", "--no-progress", "--peak-flops", "1e11"]
    config, params = load_checkpoint(TEACHER)
    wider = config.replace(n_embd=128)
    save_checkpoint(wider, init_params(wider), teacher)
    assert main(resume) == 2
    assert (f"error: --resume: the teacher {teacher} is not the one this run was distilled from: n_embd=128 (the "
            "run's teacher: 64)\n") in capsys.readouterr().err
    save_checkpoint(config, init_params(config, seed=1), teacher)  # the same shape, other weights
    assert main(resume) == 2
    assert "has the config of the one this run was distilled from but other weights (sha256" in (
        capsys.readouterr().err)
    shutil.rmtree(teacher)
    assert main(resume) == 2
    assert f"the run's teacher {teacher} does not exist" in capsys.readouterr().err
    save_checkpoint(config, params, teacher)  # the run's teacher, copied back (re-saved: the same weights)
    assert main(resume) == 0
    assert "done: 4 steps" in capsys.readouterr().out


def test_student_from_teacher_takes_every_other_layer():
    teacher = GPTConfig(vocab_size=256, n_positions=64, n_layer=4, n_head=4, n_embd=32)
    params = init_params(teacher, seed=3)
    student = teacher.replace(n_layer=2, n_head=2, n_positions=32)
    cut = student_from_teacher(teacher, params, student)
    assert set(cut) == set(init_params(student))
    for i, j in ((0, 0), (1, 2)):
        assert np.array_equal(cut[f"h.{i}.mlp.c_fc.weight"], params[f"h.{j}.mlp.c_fc.weight"])
    assert np.array_equal(cut["wpe.weight"], params["wpe.weight"][:32])
    assert np.array_equal(cut["wte.weight"], params["wte.weight"])


@pytest.fixture(scope="module")
def int8_teacher(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("q") / "int8"
    assert main(["quantize", "--checkpoint", str(TEACHER), "--to", "int8", "--out", str(out)]) == 0
    return str(out)


BAD = [
    (["--teacher", "nowhere"], "does not exist"),
    (["--teacher", "{T}", "vocab_size=300"], "vocabulary must match"),
    (["--teacher", "{T}", "tokenizer=bpe:300"], "the student reads the teacher's tokenizer"),
    (["--teacher", "{Q}", "--teacher-precision", "bf16"], "'int8' or 'w8a8', not 'bf16'"),
    (["--teacher", "{Q}", "--init-from-teacher", "n_layer=1"], "copies float weights"),
    (["--teacher", "{T}", "--alpha", "1.5"], "alpha=1.5 must be a number in [0, 1]"),
    (["--teacher", "{T}", "--alpha", "nan"], "alpha=nan must be"),
    (["--teacher", "{T}", "--temperature", "0"], "temperature=0.0 must be a number in (0, 100]"),
    (["--teacher", "{T}", "--temperature", "inf"], "temperature=inf must be"),
    (["--teacher", "{T}", "--init-from-teacher", "n_embd=32", "n_head=2"], "needs its width: n_embd=32"),
    (["--teacher", "{T}", "n_positions=128"], "exceed the teacher's context n_positions=64"),
    (["--teacher", "{T}", "--data", "no/such/corpus"], "does not exist"),
    (["--teacher", "{T}", "--mesh", "tensor=8"], "n_head"),
    (["--out", "{O}", "--resume", "--teacher", "{T}"], "drop ['--teacher']"),
    ([], "--teacher CHECKPOINT is required"),
]


@pytest.mark.parametrize("argv,needle", BAD)
def test_bad_input_is_refused_before_anything_is_loaded_or_created(tmp_path, argv, needle, int8_teacher, capsys,
                                                                   monkeypatch):
    import gptjax.distill

    def never(*args, **kwargs):
        raise AssertionError("the teacher was loaded")

    monkeypatch.setattr(gptjax.distill, "load_teacher", never)
    out = tmp_path / "run"
    argv = [a.format(T=TEACHER, Q=int8_teacher, O=out) for a in argv]
    assert main(["distill", *argv] + ([] if "--out" in argv else ["--out", str(out)]) + ["--no-progress"]) == 2
    assert needle in capsys.readouterr().err
    assert not out.exists()


def test_library_errors_name_the_value():
    with pytest.raises(GptjaxError, match="alpha=-0.1"):
        DistillConfig(str(TEACHER), alpha=-0.1)
    with pytest.raises(GptjaxError, match="precision 'fp6'"):
        DistillConfig(str(TEACHER), teacher_precision="fp6")


def test_the_pareto_set_and_the_frontier_studys_bad_flags(tmp_path, capsys):
    from gptjax.bench.studies.frontier import pareto

    # (speed, bits/byte): the second is dominated by the first; the last two trade speed for accuracy
    assert pareto([(10, 3.0), (9, 3.1), (20, 3.5), (5, 2.5), (10, 3.0)]) == [True, False, True, True, True]
    for flags, needle in ((["--ladder", "2x3"], "shape '2x3'"), (["--precisions", "fp6"], "precision 'fp6'"),
                          (["--prompt", "100"], "must fit --context 128"),
                          (["--teacher-checkpoint", str(TEACHER)], "context of at least --context 128")):
        assert main(["bench", "--study", "frontier", "--out", str(tmp_path / "x"), *flags]) == 2
        assert needle in capsys.readouterr().err
        assert not (tmp_path / "x").exists()
