"""Joined batches (`Backend.stream_joined`): rows with their own settings get exactly the tokens they get alone."""

import numpy as np
import pytest

from gptjax import init_params
from gptjax.backends import get_backend
from gptjax.config import get_preset
from gptjax.errors import GptjaxError
from gptjax.generate import collect, join_requests, make_request
from gptjax.sampling import SamplingParams

CONFIG = get_preset("tiny")
PARAMS = {k: v + np.random.default_rng(1).normal(0, 0.3, v.shape).astype(np.float32)
          for k, v in init_params(CONFIG, 1).items()}
CASES = [  # (prompt, max_new_tokens, sampling settings): every row differs in everything
    ([5, 17, 3], 9, dict(temperature=0.8, seed=3)),
    ([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], 4, dict(greedy=True)),
    ([42], 13, dict(temperature=1.2, top_k=7, seed=99, stop_tokens=[3, 4])),
    ([8, 8, 8], 6, dict(top_p=0.6, seed=5)),
    ([200, 1], 11, dict(temperature=1.0, seed=3, stop_tokens=[100])),
]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["numpy", "jax"])
@pytest.mark.parametrize("chunk_size", [1, 4])
def test_joined_rows_equal_their_requests_alone(name, chunk_size):
    backend = get_backend(name, CONFIG)
    requests = [make_request(CONFIG, [p], n, SamplingParams(**kw)) for p, n, kw in CASES]
    joined = collect(backend.stream_joined(PARAMS, requests, chunk_size=chunk_size), join_requests(requests))
    for row, (prompt, n, kw) in enumerate(CASES):
        alone = backend.generate(PARAMS, [prompt], n, sampling=SamplingParams(**kw))
        assert joined.tokens[row] == alone.tokens[0], row
        assert joined.finish_reasons[row] == alone.finish_reasons[0]
        assert len(joined.tokens[row]) <= n
    assert max(len(t) for t in joined.tokens) == 13 and len(joined.tokens[1]) == 4  # per-row budgets hold


def test_joining_a_multi_row_request_keeps_its_streams():
    backend = get_backend("jax", CONFIG)
    two = make_request(CONFIG, [[1, 2], [3]], 7, sampling=SamplingParams(seed=4))
    one = make_request(CONFIG, [[9, 9, 9]], 5, sampling=SamplingParams(temperature=0))
    joined = collect(backend.stream_joined(PARAMS, [one, two]), join_requests([one, two]))
    assert joined.tokens[1:] == backend.generate(PARAMS, [[1, 2], [3]], 7, sampling=SamplingParams(seed=4)).tokens


def test_join_requests_rejects_what_is_not_a_request():
    with pytest.raises(GptjaxError, match="non-empty list of GenerationRequests"):
        join_requests([])
    with pytest.raises(GptjaxError, match="non-empty list of GenerationRequests"):
        join_requests([[1, 2, 3]])


@pytest.mark.slow
@pytest.mark.parametrize("options", [{}, {"kv_cache": "int8"}, {"precision": "bf16"}])
def test_rows_joining_a_running_session_get_their_solo_tokens(options):
    from gptjax.backends.jax.session import DecodeSession

    backend = get_backend("jax", CONFIG, **options)
    weights = backend.prepare(PARAMS)
    requests = [make_request(CONFIG, [p], n, SamplingParams(**kw)) for p, n, kw in CASES]
    session = DecodeSession(backend, weights, [requests[0], requests[2]], ["a", "c"], slots=4, headroom=16)
    got, reasons, joined_while_busy = {name: [] for name in "abcde"}, {}, 0  # c filters (top-k): the session's
    # mode covers every row that joins

    def take(chunk):
        for name, tokens, reason in chunk:
            got[name].extend(tokens)
            if reason:
                reasons[name] = reason

    take(session.first_chunk())
    pending = [("b", requests[1]), ("d", requests[3]), ("e", requests[4])]
    while session.live or pending:
        take(session.run(2))
        while pending and session.fits(pending[0][1]):
            joined_while_busy += bool(session.live)
            name, request = pending.pop(0)
            take(session.admit(request, name))
        assert session.live or not pending, "a request could never join"
    assert joined_while_busy == 3
    for name, (prompt, n, kw) in zip("abcde", CASES):
        alone = backend.generate(PARAMS, [prompt], n, sampling=SamplingParams(**kw))
        assert got[name] == alone.tokens[0], name
        assert reasons[name] == alone.finish_reasons[0], name
