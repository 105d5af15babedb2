"""Speculative decoding: greedy tokens equal plain decoding for any drafter, sampled tokens follow the target's
exact distribution (chi-square), the same seed gives the same tokens, bad drafters are refused."""

import itertools

import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from gptjax import GPTConfig, GptjaxError, get_backend, init_params
from gptjax.backends import numpy_ref
from gptjax.backends.jax import speculative as jax_spec
from gptjax.sampling import GREEDY, SamplingParams
from gptjax.speculative import ModelDraft, NgramDraft, ngram_proposal

CONFIG = GPTConfig(vocab_size=64, n_positions=64, n_layer=1, n_head=2, n_embd=16)
DRAFT_CONFIG = GPTConfig(vocab_size=64, n_positions=64, n_layer=1, n_head=1, n_embd=8)
PROMPTS = [[5, 17, 3, 5, 17], [1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 3], [42]]
SMALL = GPTConfig(vocab_size=4, n_positions=16, n_layer=1, n_head=2, n_embd=16)  # chi-square: 4^3 outcomes
ALPHA = 1e-3  # significance bound: the correct rule passes it, a wrong one (test below) does not


def _perturbed(config, seed, base=None, scale=0.4):
    """Params with every entry perturbed (init's are nearly uniform): varied continuations, peaked distributions."""
    rng = np.random.default_rng(seed)
    base = init_params(config, seed) if base is None else base
    return {k: v + rng.normal(0, scale, v.shape).astype(np.float32) for k, v in base.items()}


PARAMS = _perturbed(CONFIG, 1)
DRAFT = ModelDraft(_perturbed(DRAFT_CONFIG, 2), DRAFT_CONFIG)


def _reference(backend):
    """Plain greedy decoding with a stop token that ends one row early (chosen from its own continuation)."""
    free = backend.generate(PARAMS, PROMPTS, 12, sampling=GREEDY)
    stop = [free.tokens[0][4]]
    ref = backend.generate(PARAMS, PROMPTS, 12, sampling=SamplingParams(greedy=True, stop_tokens=stop))
    assert "stop" in ref.finish_reasons and ref.tokens != free.tokens  # the stop token matters
    return ref, stop


@pytest.mark.parametrize("name, cases", [
    ("numpy", [(NgramDraft(), 1), (NgramDraft(), 2), (NgramDraft(), 4), (DRAFT, 1), (DRAFT, 2), (DRAFT, 4)]),
    ("jax", [(NgramDraft(), 2), (DRAFT, 4)]),  # fewer on jax: each (drafter, k) is a compile
])
def test_greedy_tokens_equal_plain_decoding(name, cases):
    backend = get_backend(name, CONFIG)
    ref, stop = _reference(backend)
    for draft, k in cases:
        got = backend.generate(PARAMS, PROMPTS, 12, sampling=SamplingParams(greedy=True, stop_tokens=stop), draft=draft,
                               num_speculative_tokens=k)
        assert (got.tokens, got.finish_reasons) == (ref.tokens, ref.finish_reasons), (draft, k)
        assert 0 <= got.accepted <= got.proposed and got.proposed % k == 0


def test_greedy_draft_equal_to_the_target_accepts_everything_and_streams_the_same():
    """The target as its own draft agrees with itself: every proposal accepted until the budget ends."""
    backend = get_backend("jax", CONFIG)
    ref = backend.generate(PARAMS, PROMPTS, 12, sampling=GREEDY)
    chunks = list(backend.stream(PARAMS, PROMPTS, 12, chunk_size=1, sampling=GREEDY,
                                 draft=ModelDraft(PARAMS, CONFIG), num_speculative_tokens=4))
    assert [sum((c.tokens[b] for c in chunks), []) for b in range(3)] == ref.tokens
    assert chunks[0].phase == "prefill" and [len(t) for t in chunks[1].tokens] == [5, 5, 5]  # k + 1 per round
    assert sum(c.accepted for c in chunks) == 3 * (4 + 4 + 1)  # 11 tokens after the first: rounds of 5, 5, 1


# ---- sampling: the output distribution is the target's ------------------------------------------------------
SMALL_PARAMS = _perturbed(SMALL, 1)
SMALL_DRAFT = ModelDraft(_perturbed(SMALL, 5, SMALL_PARAMS, scale=0.45), SMALL)  # a distorted copy
SMALL_PROMPT = [1, 2, 3]


def _exact_joint() -> np.ndarray:
    """The target's exact distribution of its first three tokens [V, V, V], from forward passes."""
    V, T = SMALL.vocab_size, len(SMALL_PROMPT)
    seqs = np.array([SMALL_PROMPT + list(t) for t in itertools.product(range(V), repeat=2)])  # [V^2, T + 2]
    x = get_backend("numpy", SMALL, dtype="float64").forward(SMALL_PARAMS, seqs).astype(np.float64)
    p = np.exp(x - x.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)  # [V^2, T + 2, V]
    first, second, third = p[0, T - 1], p[:, T].reshape(V, V, V)[:, 0], p[:, T + 1].reshape(V, V, V)
    return first[:, None, None] * second[:, :, None] * third


def _p_value(tokens: list[list[int]], joint: np.ndarray) -> float:
    """Chi-square goodness of fit of the rows' first three tokens to joint (cells expecting < 5 pooled)."""
    V = joint.shape[0]
    counts = np.bincount([a * V * V + b * V + c for a, b, c in tokens], minlength=V ** 3)
    expected = joint.reshape(-1) * len(tokens)
    small = expected < 5
    observed = np.append(counts[~small], counts[small].sum())
    expected = np.append(expected[~small], expected[small].sum())
    return float(stats.chi2.sf(((observed - expected) ** 2 / expected).sum(), len(observed) - 1))


def _sampled(name, n=1500, seed=7, draft=SMALL_DRAFT):
    return get_backend(name, SMALL).generate(SMALL_PARAMS, [SMALL_PROMPT] * n, 3,
                                             sampling=SamplingParams(seed=seed), draft=draft,
                                             num_speculative_tokens=2)


@pytest.mark.parametrize("name, n", [("numpy", 30), ("jax", 1100)])  # jax: n rows in the same batch bucket
def test_sampled_tokens_follow_the_targets_distribution(name, n):
    result = _sampled(name)
    assert 0.1 < result.accepted / result.proposed < 0.9  # both acceptance and rejection are exercised
    assert _p_value(result.tokens, _exact_joint()) > ALPHA
    assert _sampled(name, n=n).tokens == result.tokens[:n]  # the same seed, the same tokens (rows: own streams)
    assert _sampled(name, n=n, seed=8).tokens != result.tokens[:n]


def test_the_chi_square_bound_rejects_a_wrong_rule(monkeypatch):
    """On rejection draw from p instead of max(0, p - q): the bound above catches it."""
    def wrong(p, q, drafts, rng):
        for t, d in enumerate(drafts):
            if rng.random() * q[t, d] >= p[t, d]:
                return list(drafts[:t]) + [int(rng.choice(len(p[t]), p=p[t]))]
        return list(drafts) + [int(rng.choice(p.shape[1], p=p[len(drafts)]))]

    monkeypatch.setattr(numpy_ref, "accept_sampled", wrong)
    assert _p_value(_sampled("numpy").tokens, _exact_joint()) < ALPHA


def test_ngram_sampling_follows_the_target_too():
    """A one-hot draft: accept d with p(d), else draw from p without d."""
    result = _sampled("numpy", n=800, draft=NgramDraft(2, 1))
    assert result.accepted > 0 and _p_value(result.tokens, _exact_joint()) > ALPHA


# ---- the n-gram drafter ----------------------------------------------------------------------------------
def test_ngram_proposals_match_on_both_backends():
    contexts = [[1, 2, 3, 9, 1, 2, 3], [4, 5, 6, 4, 5], [7, 7, 7], [1, 2, 3], [3, 1, 2, 1, 2, 1, 2]]
    expected = [[9, 1, 2, 3], [6, 4, 5, 6], [7, 7, 7, 7], [3, 3, 3, 3], [1, 2, 1, 2]]
    assert [ngram_proposal(c, 4, 3, 1) for c in contexts] == expected
    S, Tp = 12, 8
    hist = np.zeros((len(contexts), S), np.int32)
    pad = np.array([Tp - len(c) + 1 for c in contexts], np.int32)  # the last token at index Tp
    for b, c in enumerate(contexts):
        hist[b, pad[b]: Tp + 1] = c
    got = jax_spec.draft_ngram(jnp.asarray(hist), jnp.full(len(contexts), Tp), jnp.asarray(pad), 4, 3, 1)
    assert np.asarray(got).tolist() == expected


# ---- bad drafters are refused at the boundary ---------------------------------------------------------------
def test_bad_drafters_are_refused():
    backend = get_backend("numpy", CONFIG)
    other = GPTConfig(vocab_size=65, n_positions=64, n_layer=1, n_head=1, n_embd=8)
    with pytest.raises(GptjaxError, match="vocabulary \\(65 tokens\\) differs from the target's \\(64\\)"):
        backend.generate(PARAMS, PROMPTS, 4, draft=ModelDraft(init_params(other), other))
    with pytest.raises(GptjaxError, match="num_speculative_tokens=0 must be an integer in \\[1, 16\\]"):
        backend.generate(PARAMS, PROMPTS, 4, draft=NgramDraft(), num_speculative_tokens=0)
    with pytest.raises(GptjaxError, match="draft must be a gptjax.speculative.ModelDraft or NgramDraft, got str"):
        backend.stream(PARAMS, PROMPTS, 4, draft="ngram")
    with pytest.raises(GptjaxError, match="min_ngram=3 exceeds max_ngram=2"):
        NgramDraft(2, 3)
    with pytest.raises(GptjaxError, match="precision='fp6'"):
        ModelDraft({}, CONFIG, precision="fp6")
    short = GPTConfig(vocab_size=64, n_positions=8, n_layer=1, n_head=1, n_embd=8)
    with pytest.raises(GptjaxError, match="exceeds the draft's context n_positions=8"):
        backend.generate(PARAMS, PROMPTS, 4, draft=ModelDraft(init_params(short), short))
    with pytest.raises(GptjaxError, match="does not support presence_penalty, frequency_penalty or logit_bias"):
        backend.generate(PARAMS, PROMPTS, 4, draft=NgramDraft(), sampling=SamplingParams(logit_bias={3: 5.0}))


# ---- CLI, metrics, spans ---------------------------------------------------------------------------------
def test_cli_generate_with_a_draft_prints_the_plain_greedy_tokens(tmp_path, capsys):
    from gptjax import save_checkpoint
    from gptjax.cli import main

    save_checkpoint(CONFIG, PARAMS, tmp_path / "target")
    save_checkpoint(DRAFT_CONFIG, DRAFT.params, tmp_path / "draft")
    expected = get_backend("numpy", CONFIG).generate(PARAMS, PROMPTS[1:2], 10, sampling=GREEDY).tokens[0]
    base = ["generate", "--checkpoint", str(tmp_path / "target"), "--tokens", ",".join(map(str, PROMPTS[1])),
            "--max-new-tokens", "10", "--greedy", "--backend", "numpy"]
    for draft in ([str(tmp_path / "draft"), "--spec-k", "3"], ["ngram", "--ngram", "2,1"]):
        assert main(base + ["--draft", *draft]) == 0
        out = capsys.readouterr()
        assert out.out == ",".join(map(str, expected)) and "draft tokens accepted" in out.err
        assert "tok/s vs plain " in out.err and "x (compile excluded, median of 3); " in out.err
    assert main(base + ["--draft", "ngram", "--spec-k", "99"]) == 2
    assert "num_speculative_tokens=99 must be an integer in [1, 16]" in capsys.readouterr().err
    assert main(base + ["--draft", "ngram", "--ngram", "3"]) == 2
    assert "--ngram '3' must be two integers MAX,MIN" in capsys.readouterr().err


def test_metrics_count_proposed_and_accepted_draft_tokens():
    from gptjax.tracing import Metrics

    m = Metrics()
    result = get_backend("numpy", CONFIG, metrics=m).generate(PARAMS, PROMPTS, 12, sampling=GREEDY, draft=NgramDraft(),
                                                              num_speculative_tokens=3)
    labels = {"backend": "numpy", "draft": "ngram"}
    assert m.registry.get_sample_value("gptjax_speculative_proposed_tokens_total", labels) == result.proposed > 0
    assert m.registry.get_sample_value("gptjax_speculative_accepted_tokens_total", labels) == result.accepted > 0


def test_spans_record_speculative_rounds():
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter, provider = InMemorySpanExporter(), trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    chunks = list(get_backend("numpy", CONFIG).stream(PARAMS, PROMPTS, 12, chunk_size=2, sampling=GREEDY,
                                                      draft=NgramDraft(), num_speculative_tokens=3))
    rounds = [s for s in exporter.get_finished_spans() if s.name == "gptjax.speculate"]
    assert len(rounds) == len(chunks) - 1 and {s.attributes["gptjax.draft"] for s in rounds} == {"ngram"}
    assert [s.attributes["gptjax.spec.accepted"] for s in rounds] == [c.accepted for c in chunks[1:]]
    assert all(s.attributes["gptjax.spec.k"] == 3 for s in rounds)
    assert [s.name for s in exporter.get_finished_spans()].count("gptjax.prefill") == 1


def test_the_benchmark_study_refuses_bad_flags_before_running(tmp_path):
    from gptjax.bench.studies import main

    with pytest.raises(GptjaxError, match="--ks '2,0': every value must be >= 1"):
        main(["speculative", "--ks", "2,0", "--out", str(tmp_path / "r")])
    with pytest.raises(GptjaxError, match="--batches 'one' must be a comma list of integers"):
        main(["speculative", "--batches", "one", "--out", str(tmp_path / "r")])
    assert not (tmp_path / "r").exists()
