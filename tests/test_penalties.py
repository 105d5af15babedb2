"""presence_penalty, frequency_penalty and logit_bias (as OpenAI documents them, counting generated tokens as
vLLM does): exact tokens against a NumPy loop of full forward passes, both backends alike, seeds exact alone,
joined and inside a continuous-batching session, and every bad value named."""

from __future__ import annotations

import numpy as np
import pytest

from gptjax import init_params
from gptjax.backends import get_backend
from gptjax.config import get_preset
from gptjax.errors import GptjaxError
from gptjax.generate import collect, join_requests, make_request
from gptjax.sampling import MAX_LOGIT_BIAS, SamplingParams

CONFIG = get_preset("tiny")  # V 256, context 64
PARAMS = {k: v + np.random.default_rng(1).normal(0, 0.3, v.shape).astype(np.float32)
          for k, v in init_params(CONFIG, 1).items()}
PROMPTS = [[5, 17, 3], [1]]
GREEDY = [dict(frequency_penalty=1.5), dict(presence_penalty=2.0), dict(frequency_penalty=-0.5, presence_penalty=0.3),
          dict(logit_bias={"107": -100}), dict(frequency_penalty=0.8, logit_bias={7: 3.5, 9: -2})]


def _loop(prompt, n, presence=0.0, frequency=0.0, bias=None):
    """Greedy tokens by full forward passes (no KV cache) with the OpenAI rule applied in a plain loop."""
    backend, seq, out = get_backend("numpy", CONFIG), list(prompt), []
    for _ in range(n):
        logits = backend.forward(PARAMS, [seq], last_only=True)[0].astype(np.float32)  # [V]
        for j in set(out):
            logits[j] -= np.float32(out.count(j) * frequency) + np.float32(presence)
        for j, b in (bias or {}).items():
            logits[int(j)] += np.float32(b)
        out.append(int(np.argmax(logits)))
        seq.append(out[-1])
    return out


def test_frequency_penalty_follows_the_rule_exactly_and_breaks_repetition():
    plain = [_loop(p, 12) for p in PROMPTS]
    penalised = [_loop(p, 12, frequency=1.5) for p in PROMPTS]
    for name in ("numpy", "jax"):
        backend = get_backend(name, CONFIG)
        assert backend.generate(PARAMS, PROMPTS, 12, sampling=SamplingParams(greedy=True)).tokens == plain
        assert backend.generate(PARAMS, PROMPTS, 12,
                                sampling=SamplingParams(greedy=True, frequency_penalty=1.5)).tokens == penalised
    assert [max(r.count(t) for t in r) for r in plain] == [10, 9]  # token 107 over and over
    assert [max(r.count(t) for t in r) for r in penalised] == [3, 2]


@pytest.mark.parametrize("settings", GREEDY)
def test_both_backends_decode_the_loops_greedy_tokens(settings):
    expected = [_loop(p, 10, settings.get("presence_penalty", 0.0), settings.get("frequency_penalty", 0.0),
                      settings.get("logit_bias")) for p in PROMPTS]
    for name in ("numpy", "jax"):
        got = get_backend(name, CONFIG).generate(PARAMS, PROMPTS, 10,
                                                  sampling=SamplingParams(greedy=True, **settings)).tokens
        assert got == expected, name
    assert expected != [_loop(p, 10) for p in PROMPTS]  # each setting changes the tokens


def test_a_bias_of_100_forces_a_token_and_minus_100_bans_one():
    for name in ("numpy", "jax"):
        backend = get_backend(name, CONFIG)
        forced = backend.generate(PARAMS, PROMPTS, 8,
                                  sampling=SamplingParams(temperature=1.5, top_k=3, seed=7, logit_bias={"42": 100}))
        assert forced.tokens == [[42] * 8, [42] * 8]
        banned = backend.generate(PARAMS, PROMPTS, 8,
                                  sampling=SamplingParams(temperature=1.0, top_k=3, seed=2, logit_bias={107: -100}))
        assert all(107 not in row for row in banned.tokens) and sum(map(len, banned.tokens)) == 16
        free = backend.generate(PARAMS, PROMPTS, 8, sampling=SamplingParams(temperature=1.0, top_k=3, seed=2))
        assert any(107 in row for row in free.tokens)
        stopped = backend.generate(PARAMS, PROMPTS, 8,
                                   sampling=SamplingParams(top_k=3, logit_bias={42: 100}, stop_tokens=[42]))
        assert stopped.tokens == [[], []] and stopped.finish_reasons == ["stop", "stop"]


SEEDED = [  # (prompt, max_new_tokens, settings): sampled rows with penalties and bias beside a plain one (all
    # filtering, prompts and budgets within one length bucket: few compilations)
    ([5, 17, 3], 7, dict(temperature=0.8, top_k=50, seed=3, frequency_penalty=1.0)),
    ([1, 2, 3, 4, 5, 6], 5, dict(top_p=0.8, seed=1, presence_penalty=1.5, logit_bias={3: 2.0})),
    ([42], 8, dict(temperature=1.2, top_k=7, seed=99, logit_bias={"100": 4.0, "101": -3.0})),
    ([8, 8, 8], 6, dict(top_p=0.9, seed=5)),
    ([200, 1], 8, dict(temperature=1.0, top_p=0.95, seed=3, presence_penalty=-1.0, frequency_penalty=0.5)),
]


@pytest.mark.parametrize("name", ["numpy", "jax"])
def test_seeded_rows_with_penalties_get_their_solo_tokens_when_joined(name):
    backend = get_backend(name, CONFIG)
    requests = [make_request(CONFIG, [p], n, SamplingParams(**kw)) for p, n, kw in SEEDED]
    joined = collect(backend.stream_joined(PARAMS, requests, chunk_size=3), join_requests(requests))
    for row, (prompt, n, kw) in enumerate(SEEDED):
        assert joined.tokens[row] == backend.generate(PARAMS, [prompt], n, sampling=SamplingParams(**kw)).tokens[0], row
    assert joined.tokens[0] != backend.generate(PARAMS, [[5, 17, 3]], 7,
                                                sampling=SamplingParams(temperature=0.8, top_k=50, seed=3)).tokens[0]


def test_seeded_rows_with_penalties_get_their_solo_tokens_in_a_session():
    from gptjax.backends.jax.session import DecodeSession

    backend = get_backend("jax", CONFIG)
    weights = backend.prepare(PARAMS)
    requests = [make_request(CONFIG, [p], n, SamplingParams(**kw)) for p, n, kw in SEEDED]
    session = DecodeSession(backend, weights, [requests[3], requests[2]], ["d", "c"], slots=4, headroom=16)
    got = {name: [] for name in "abcde"}

    def take(chunk):
        for name, tokens, _ in chunk:
            got[name].extend(tokens)

    take(session.first_chunk())
    pending, joined_while_busy = [("a", requests[0]), ("b", requests[1]), ("e", requests[4])], 0
    while session.live or pending:
        take(session.run(2))
        while pending and session.fits(pending[0][1]):
            joined_while_busy += bool(session.live)
            name, request = pending.pop(0)
            take(session.admit(request, name))  # its settings installed, its counts reset
    assert joined_while_busy == 3
    for name, (prompt, n, kw) in zip("abcde", SEEDED):
        assert got[name] == backend.generate(PARAMS, [prompt], n, sampling=SamplingParams(**kw)).tokens[0], name
    plain = DecodeSession(backend, weights, [requests[3]], ["d"], slots=2, headroom=16)  # compiled as before
    assert plain.d.counts is None and not plain.fits(requests[0]) and plain.fits(requests[3])


@pytest.mark.parametrize("settings,message", [
    (dict(presence_penalty=2.5), r"presence_penalty=2.5 must be a finite number in \[-2, 2\]"),
    (dict(frequency_penalty=-2.01), r"frequency_penalty=-2.01 must be a finite number in \[-2, 2\]"),
    (dict(frequency_penalty=float("nan")), r"frequency_penalty=nan must be a finite number"),
    (dict(presence_penalty=True), r"presence_penalty=True must be a finite number"),
    (dict(presence_penalty="1"), r"presence_penalty='1' must be a finite number"),
    (dict(logit_bias=[(1, 2.0)]), "logit_bias must be a mapping of token id to bias, got list"),
    (dict(logit_bias={str(i): 1 for i in range(MAX_LOGIT_BIAS + 1)}), "logit_bias has 301 entries; at most 300"),
    (dict(logit_bias={"abc": 1}), "logit_bias: key 'abc' is not a token id"),
    (dict(logit_bias={"-1": 1}), "logit_bias: key '-1' is not a token id"),
    (dict(logit_bias={1.5: 1}), "logit_bias: key 1.5 is not a token id"),
    (dict(logit_bias={3: 100.5}), r"logit_bias: bias 100.5 of token 3 must be a finite number in \[-100, 100\]"),
    (dict(logit_bias={3: float("inf")}), "logit_bias: bias inf of token 3 must be a finite number"),
    (dict(logit_bias={3: None}), "logit_bias: bias None of token 3 must be a finite number"),
    (dict(logit_bias={5: 1, "5": 2}), "logit_bias: token id 5 is given twice"),
])
def test_bad_values_are_named(settings, message):
    with pytest.raises(GptjaxError, match=message):
        SamplingParams(**settings)


def test_a_bias_outside_the_vocabulary_is_named_by_the_request():
    sampling = SamplingParams(logit_bias={"256": 1})
    for check in (lambda: make_request(CONFIG, [[1]], 2, sampling),
                  lambda: get_backend("numpy", CONFIG).generate(PARAMS, [[1]], 2, sampling=sampling)):
        with pytest.raises(GptjaxError, match=r"logit_bias: token id 256 is outside \[0, 256\)"):
            check()


def test_settings_are_kept_normalised():
    sampling = make_request(CONFIG, [[1]], 2,
                            sampling=SamplingParams(presence_penalty=1, logit_bias={"9": 1, 3: -2.5})).sampling
    assert sampling.logit_bias == ((3, -2.5), (9, 1.0)) and sampling.presence_penalty == 1.0 and sampling.adjusts
    assert not make_request(CONFIG, [[1]], 2).sampling.adjusts
