"""Backend.score: per-token log-probabilities and top-k alternatives on both backends in every precision mode,
the Scores helpers, input checks, and `gptjax eval` / the precision report computing their figures with it
(on the trained byte-level fixture, tests/fixtures/trained_byte_tiny)."""

from __future__ import annotations

import inspect
import math
from pathlib import Path

import numpy as np
import pytest

from gptjax import get_backend
from gptjax.errors import GptjaxError
from gptjax.precision import MODES
from gptjax.sampling import GREEDY
from gptjax.scoring import MAX_SEQUENCES, Scores, log_probs
from gptjax.weights import load_checkpoint

CONFIG, PARAMS = load_checkpoint(Path(__file__).parent / "fixtures" / "trained_byte_tiny")  # V 256, context 64
SOURCE = list(inspect.getsource(inspect).encode()[:4000])
SEQUENCES = [SOURCE[100:165], SOURCE[7:8], SOURCE[500:523], SOURCE[900:940]]  # 65 = n_positions + 1, 1, 23, 40


def _reference(params, sequence, **options):
    """log p(token t | prefix) of one sequence alone, from the float64 NumPy oracle's full logits."""
    logits = get_backend("numpy", CONFIG, dtype="float64", **options).forward(params, [sequence[:-1]])[0]
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(
        -1, keepdims=True)
    return logp[np.arange(len(sequence) - 1), sequence[1:]], logp  # [T-1], [T-1, V]


def test_scores_are_the_oracles_log_softmax_at_each_next_token():
    for name in ("numpy", "jax"):
        scores = get_backend(name, CONFIG).score(PARAMS, SEQUENCES, top_k=5)
        assert [len(s.tokens) for s in scores] == [65, 1, 23, 40]
        for s, seq in zip(scores, SEQUENCES):
            assert s.tokens.dtype == np.int32 and s.tokens.tolist() == seq
            assert s.logprobs.dtype == s.top_logprobs.dtype == np.float32 and s.top_ids.dtype == np.int32
            assert s.top_ids.shape == s.top_logprobs.shape == (len(seq), 5)
            assert math.isnan(s.logprobs[0]) and (s.top_ids[0] == -1).all() and np.isnan(s.top_logprobs[0]).all()
            if len(seq) == 1:
                assert s.total() == 0.0 and s.greedy()
                continue
            chosen, logp = _reference(PARAMS, seq)
            np.testing.assert_allclose(s.logprobs[1:], chosen, atol=2e-5)
            expected_ids = np.argsort(-logp, axis=-1, kind="stable")[:, :5]
            assert (s.top_ids[1:] == expected_ids).all(), name
            np.testing.assert_allclose(s.top_logprobs[1:], np.take_along_axis(logp, expected_ids, -1), atol=2e-5)
            assert s.total() == pytest.approx(chosen.sum(), abs=1e-3)
            assert s.total(10) == pytest.approx(chosen[9:].sum(), abs=1e-3)


@pytest.mark.parametrize("precision", list(MODES))
def test_backends_agree_in_every_precision_mode(precision):
    numpy_scores = get_backend("numpy", CONFIG, precision=precision).score(PARAMS, SEQUENCES, top_k=3)
    jax_scores = get_backend("jax", CONFIG, precision=precision).score(PARAMS, SEQUENCES, top_k=3)
    logits = get_backend("numpy", CONFIG, dtype="float64").forward(PARAMS, [SEQUENCES[0][:-1]])
    bound = 2 * MODES[precision].tolerance * max(1.0, float(np.abs(logits).max()))  # logit error, and log Z's
    compared = 0
    for a, b in zip(numpy_scores, jax_scores):
        assert (a.tokens == b.tokens).all()
        error = max(np.abs(a.logprobs[1:] - b.logprobs[1:]).max(initial=0),
                    np.abs(a.top_logprobs[1:] - b.top_logprobs[1:]).max(initial=0))
        assert error <= bound
        # where a position's top alternatives are further apart than the two backends' error, both rank the
        # same tokens there
        gaps = -np.diff(a.top_logprobs[1:], axis=-1).max(-1, initial=-np.inf)  # [T-1] smallest gap
        clear = gaps > 2 * error
        assert (a.top_ids[1:][clear] == b.top_ids[1:][clear]).all()
        compared += clear.sum()
    assert compared >= 20  # of 124 positions


def test_a_ragged_batch_scores_as_each_sequence_alone():
    backend = get_backend("jax", CONFIG)
    together = backend.score(PARAMS, SEQUENCES, top_k=2)
    for s, seq in zip(together, SEQUENCES):
        alone = backend.score(PARAMS, [seq], top_k=2)[0]
        np.testing.assert_allclose(alone.logprobs, s.logprobs, atol=1e-5)
        assert (alone.top_ids == s.top_ids).all()


def test_ties_rank_the_lower_id_first_on_both_backends():
    flat = dict(PARAMS, **{"ln_f.weight": np.zeros_like(PARAMS["ln_f.weight"]),
                           "ln_f.bias": np.zeros_like(PARAMS["ln_f.bias"])})  # every logit 0: uniform
    for name in ("numpy", "jax"):
        zeros, other = get_backend(name, CONFIG).score(flat, [[0, 0, 0], [9, 0, 5]], top_k=4)
        assert (zeros.top_ids[1:] == [0, 1, 2, 3]).all() and (other.top_ids[1:] == [0, 1, 2, 3]).all()
        np.testing.assert_allclose(zeros.logprobs[1:], -math.log(256), rtol=1e-6)
        assert zeros.greedy() and zeros.total() == pytest.approx(-2 * math.log(256), rel=1e-6)
        assert other.greedy(1) is False and other.greedy(2) is False and other.greedy(3) is True  # 5 is no argmax
    chosen, values, ids = log_probs(np.array([[[1.0, 3.0, 3.0, 2.0]]]), np.array([[3]]), 3)
    assert ids.tolist() == [[[1, 2, 3]]] and values[0, 0, 0] == values[0, 0, 1] and chosen[0, 0] == values[0, 0, 2]


def test_greedy_continuations_score_as_greedy():
    backend = get_backend("jax", CONFIG)
    prompt = SOURCE[300:320]
    continuation = backend.generate(PARAMS, [prompt], 12, sampling=GREEDY).tokens[0]
    scores = backend.score(PARAMS, [prompt + continuation], top_k=1)[0]
    assert scores.greedy(len(prompt)) is True
    assert scores.greedy(1) is False  # the prompt (real source) is not all argmax
    assert scores.total(len(prompt)) == pytest.approx(float(scores.logprobs[len(prompt):].sum()), rel=1e-6)
    with pytest.raises(GptjaxError, match="needs the top alternatives: score with top_k >= 1"):
        backend.score(PARAMS, [prompt])[0].greedy()
    for start in (0, 33, True):
        with pytest.raises(GptjaxError, match=rf"start={start!r} must be an integer in \[1, 32\]"):
            scores.total(start)


def test_jax_scoring_compiles_once_per_bucket():
    backend = get_backend("jax", CONFIG)
    weights = backend.prepare(PARAMS)
    backend.score(weights, [SOURCE[:10]], top_k=1)
    before = backend.compile_count()
    backend.score(weights, [SOURCE[:12], SOURCE[40:44]], top_k=1)  # lengths 11 and 3: bucket 16, batch 2
    backend.score(weights, [SOURCE[:15]], top_k=1)
    assert backend.compile_count() - before == 1  # the second call's batch of 2 rows; the third reuses 1 row


@pytest.mark.parametrize("sequences,top_k,message", [
    ([], 0, "sequences must be a non-empty list of token-id lists"),
    ("abc", 0, "sequences must be a non-empty list of token-id lists"),
    ([[1, 2], []], 0, "sequence 1 is empty; every sequence needs at least one token"),
    ([[1, 256]], 0, r"sequence 0: token id 256 is outside \[0, 256\)"),
    ([[1, -1]], 0, r"sequence 0: token id -1 is outside \[0, 256\)"),
    ([[1, 2.0]], 0, "sequence 0: token 2.0 is not an integer"),
    ([[1] * 66], 0, r"sequence 0 has 66 tokens; at most n_positions \+ 1 = 65"),
    ([[1]] * (MAX_SEQUENCES + 1), 0, f"{MAX_SEQUENCES + 1} sequences; at most {MAX_SEQUENCES}"),
    ([[1]], -1, r"top_k=-1 must be an integer in \[0, 20\]"),
    ([[1]], 21, r"top_k=21 must be an integer in \[0, 20\]"),
    ([[1]], True, r"top_k=True must be an integer in \[0, 20\]"),
])
def test_bad_input_is_named(sequences, top_k, message):
    for name in ("numpy", "jax"):
        with pytest.raises(GptjaxError, match=message):
            get_backend(name, CONFIG).score(PARAMS, sequences, top_k=top_k)


def test_scores_is_frozen():
    s = get_backend("numpy", CONFIG).score(PARAMS, [[1, 2]])[0]
    assert isinstance(s, Scores) and s.top_ids.shape == (2, 0)
    with pytest.raises(AttributeError):
        s.tokens = np.zeros(2, np.int32)


# ---- the figures of `gptjax eval` and of the precision report, now from score, are those printed before ------
def test_eval_loss_is_the_training_models_to_the_printed_digits():
    from flax import nnx

    from gptjax import data
    from gptjax.backends.jax import GPT
    from gptjax.train import evaluate, evaluate_params

    tokens = np.asarray(SOURCE * 2)
    batches = lambda: data.eval_batches(tokens, 4, 64, 3)  # windows of n_positions + 1 tokens
    loss, n = evaluate_params(CONFIG, PARAMS, batches())
    old_loss, old_n = evaluate(*nnx.split(GPT(CONFIG, PARAMS)), batches())  # the computation eval used before
    assert n == old_n == 3 * 4 * 64
    assert f"{loss:.4f} {math.exp(loss):.3f}" == f"{old_loss:.4f} {math.exp(old_loss):.3f}"
    assert abs(loss - old_loss) < 1e-5
    with pytest.raises(GptjaxError, match="targets that are the inputs shifted by one"):
        evaluate_params(CONFIG, PARAMS, iter([(np.zeros((1, 4), np.int32), np.ones((1, 4), np.int32))]))


def test_precision_report_quality_figures_are_unchanged(monkeypatch):
    from gptjax import precision_report
    from gptjax.precision_report import Mode, build, quality

    monkeypatch.setattr(precision_report, "_greedy_agreement", lambda built, windows: [1.0] * len(built))  # slow

    windows = np.stack([SOURCE[i * 300: i * 300 + 65] for i in range(5)])
    built = build(CONFIG, PARAMS, [Mode("fp32"), Mode("int8")])
    rows = quality(built, windows)  # one batch of 5: few compilations
    for row, (_, backend, weights, _) in zip(rows, built):  # the report's former computation, from logits
        logits = backend.forward(weights, windows[:, :-1]).astype(np.float64)
        logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        loss = float((logz - np.take_along_axis(logits, windows[:, 1:, None], -1)[..., 0]).mean())
        reference = built[0][1].forward(built[0][2], windows[:, :-1])
        agree = float((logits.argmax(-1) == reference.argmax(-1)).mean())
        assert f"{row['loss']:.4f} {row['perplexity']:.3f}" == f"{loss:.4f} {math.exp(loss):.3f}"
        assert f"{100 * row['top1_agreement']:.2f}" == f"{100 * agree:.2f}"
    assert rows[1]["top1_agreement"] < 1  # int8 changes some argmaxes: the agreement is measured, not 1 by default
