"""`gptjax serve --draft DIR|ngram --spec-k K` (issue 18 point 3): continuous batching with speculative rows,
run for real on 127.0.0.1. Greedy completions equal plain decoding; a seeded sampled completion equals its solo
`generate(draft=..., seed=...)` while other requests join and leave its batch; the speculative counters move by
exactly the solo runs' proposed/accepted draft tokens; requests and flags the speculative path cannot serve are
refused with a message naming them."""

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import httpx
import pytest
from test_serve_hardening import PipedServer

from gptjax import init_params, save_checkpoint
from gptjax.backends import get_backend
from gptjax.cli import main
from gptjax.config import get_preset
from gptjax.sampling import GREEDY, SamplingParams
from gptjax.speculative import ModelDraft, NgramDraft

CONFIG = replace(get_preset("tiny"), n_positions=256)  # a long context: one request can outlast the others' joins
DRAFT = replace(CONFIG, n_layer=1)  # a different random model: it accepts little, so rows accept different counts
K = 2  # small: a long request takes many rounds, so others can join it
# two rows per batch and budgets up to 15 tokens after a prompt of up to 8: every batch has one shape (one
# compilation; a request of 200 tokens adds one more); the timeout only bounds compiling on a busy machine
FLAGS = ("--spec-k", str(K), "--max-batch", "2", "--request-timeout", "600")
COUNTERS = ("gptjax_speculative_proposed_tokens_total", "gptjax_speculative_accepted_tokens_total")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("spec")
    target, draft = init_params(CONFIG, 2), init_params(DRAFT, 5)
    save_checkpoint(CONFIG, target, root / "target")
    save_checkpoint(DRAFT, draft, root / "draft")
    return root, target, ModelDraft(draft, DRAFT)


@pytest.fixture(scope="module")
def backend():
    return get_backend("jax", CONFIG)


def _post(server: PipedServer, **body) -> dict:
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=600)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def _stream(server: PipedServer, body: dict, on_first=lambda: None) -> tuple[list[int], str]:
    """A streamed completion's token ids and finish reason; on_first() runs once its first chunk has arrived."""
    tokens, reason, first = [], None, True
    with httpx.stream("POST", server.url + "/v1/completions", json=body | {"stream": True}, timeout=600) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = json.loads(line[6:])["choices"][0]
            tokens += choice["token_ids"]
            reason = choice["finish_reason"] or reason
            if first:
                first = False
                on_first()
    return tokens, reason


def _solo(backend, params, draft, prompt, n, **kw) -> tuple[list[int], int, int]:
    """A solo speculative run's tokens and its proposed and accepted draft tokens."""
    tokens, proposed, accepted = [], 0, 0
    for chunk in backend.stream(params, [prompt], n, sampling=SamplingParams(**kw), draft=draft,
                                num_speculative_tokens=K):
        tokens += chunk.tokens[0]
        proposed, accepted = proposed + chunk.proposed, accepted + chunk.accepted
    return tokens, proposed, accepted


def _counters(server: PipedServer, kind: str) -> tuple[float, float]:
    label = f'{{backend="jax",draft="{kind}"}}'
    return tuple(server.series(name).get(name + label, 0.0) for name in COUNTERS)


def _batches(server: PipedServer) -> float:
    """Batches the server has started (sessions: joining requests are not counted)."""
    lines = httpx.get(server.url + "/metrics").text.splitlines()
    return next(float(line.split()[1]) for line in lines if line.startswith("gptjax_serve_batch_size_count "))


@pytest.fixture(scope="module")
def model_server(models):
    root = models[0]
    server = PipedServer(root / "target", "--draft", str(root / "draft"), *FLAGS, "--chunk-size", "1")
    yield server
    assert server.stop() == 0, "\n".join(server.drain())


@pytest.fixture(scope="module")
def ngram_server(models):
    server = PipedServer(models[0] / "target", "--draft", "ngram", *FLAGS, "--chunk-size", "2")
    yield server
    assert server.stop() == 0, "\n".join(server.drain())


# prompts of 1..8 tokens and budgets of 9..12 tokens: different pads and lengths, few compiled shapes
GREEDY_CASES = [([1, 2, 3], 9), ([7, 7, 8, 9, 7, 7, 8, 9], 12), ([200] * 5, 11), ([5], 10)]
STREAMED = ([3, 1, 4, 1, 5], 12)


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["model", "ngram"])
def test_concurrent_greedy_equals_plain_and_counters_match_solo(models, backend, kind, request):
    """Rows of different prompt sizes and budgets, started together or joining, accept different numbers of
    draft tokens per round; each gets plain decoding's tokens, and the counters add up the solo runs' counts."""
    _, target, model_draft = models
    server = request.getfixturevalue(f"{kind}_server")
    draft = model_draft if kind == "model" else NgramDraft()
    before = _counters(server, kind)
    with ThreadPoolExecutor(len(GREEDY_CASES)) as pool:
        futures = [pool.submit(_post, server, prompt=p, max_tokens=n, temperature=0) for p, n in GREEDY_CASES]
        streamed = _stream(server, {"prompt": STREAMED[0], "max_tokens": STREAMED[1], "temperature": 0})
        answers = [f.result() for f in futures]
    for (prompt, n), choice in zip(GREEDY_CASES, answers):
        plain = backend.generate(target, [prompt], n, sampling=GREEDY)
        assert (choice["token_ids"], choice["finish_reason"]) == (plain.tokens[0], "length")
    assert streamed == (backend.generate(target, [STREAMED[0]], STREAMED[1], sampling=GREEDY).tokens[0], "length")
    solos = [_solo(backend, target, draft, p, n, greedy=True) for p, n in [*GREEDY_CASES, STREAMED]]
    after = _counters(server, kind)
    proposed, accepted = sum(s[1] for s in solos), sum(s[2] for s in solos)
    assert (after[0] - before[0], after[1] - before[1]) == (proposed, accepted)
    assert 0 < accepted < proposed


@pytest.mark.integration
def test_sampled_request_equals_its_solo_run_while_others_join_and_leave(models, backend, model_server):
    """A seeded sampled completion is joined mid-flight by a sampled and a greedy one that finish (leave) before
    it: all three get their solo tokens (speculative for the sampled ones, plain for the greedy one), in one
    batch. (It starts with two slots, so the second joiner takes the first one's slot once that has left.)"""
    _, target, draft = models
    long = {"prompt": [10, 20, 30], "max_tokens": 200, "temperature": 0.9, "seed": 7}
    joiners = [{"prompt": [4, 5, 6, 7, 8, 9], "max_tokens": 12, "temperature": 1.0, "seed": 3},
               {"prompt": [42, 43], "max_tokens": 10, "temperature": 0}]
    batches = _batches(model_server)
    futures, pool = [], ThreadPoolExecutor(len(joiners))
    with pool:
        tokens, reason = _stream(model_server, long, lambda: futures.extend(
            pool.submit(_post, model_server, **body) for body in joiners))
        joined = [f.result() for f in futures]
    assert _batches(model_server) - batches == 1  # the joiners ran in the long request's batch
    assert (tokens, reason) == (_solo(backend, target, draft, [10, 20, 30], 200, temperature=0.9, seed=7)[0],
                                "length")
    assert joined[0]["token_ids"] == _solo(backend, target, draft, joiners[0]["prompt"], 12, temperature=1.0,
                                           seed=3)[0]
    assert joined[1]["token_ids"] == backend.generate(target, [[42, 43]], 10, sampling=GREEDY).tokens[0]


@pytest.mark.integration
def test_stop_tokens_and_disconnects_behave_as_without_a_draft(models, backend, model_server):
    """A stop token ends a speculative row where plain decoding's does (mid-round), and a client that leaves
    mid-stream frees its row: the cancellation is counted and the next completion is still exact."""
    target = models[1]
    plain = backend.generate(target, [[8, 1]], 12, sampling=GREEDY).tokens[0]
    stop = next(t for t in plain if t != plain[0])  # a token that first comes mid-completion
    expected = backend.generate(target, [[8, 1]], 12, sampling=SamplingParams(greedy=True, stop_tokens=[stop]))
    choice = _post(model_server, prompt=[8, 1], max_tokens=12, temperature=0, stop=[stop])
    assert (choice["token_ids"], choice["finish_reason"]) == (expected.tokens[0], "stop")
    assert 0 < len(choice["token_ids"]) < 11
    name = "gptjax_serve_cancelled_total"
    cancelled = model_server.series(name).get(name + '{reason="disconnect"}', 0.0)
    with httpx.stream("POST", model_server.url + "/v1/completions", timeout=600,
                      json={"prompt": [1, 2], "max_tokens": 200, "temperature": 0.5, "stream": True}) as r:
        next(line for line in r.iter_lines() if line.startswith("data: "))  # then hang up
    _wait(lambda: model_server.series(name).get(name + '{reason="disconnect"}', 0.0) == cancelled + 1)
    choice = _post(model_server, prompt=[1, 2, 3], max_tokens=12, temperature=0)
    assert choice["token_ids"] == backend.generate(target, [[1, 2, 3]], 12, sampling=GREEDY).tokens[0]


def _wait(condition, timeout: float = 60.0) -> None:
    """Poll /metrics until condition() (the server counts a disconnect when its next write to the client fails)."""
    pause = threading.Event()  # never set: a wait between polls
    for _ in range(int(timeout / 0.05)):
        if condition():
            return
        pause.wait(0.05)
    raise AssertionError("the server never counted the disconnect")


@pytest.mark.integration
@pytest.mark.parametrize("field,value", [("presence_penalty", 0.5), ("frequency_penalty", -1.0),
                                         ("logit_bias", {"3": 5})])
def test_logit_adjustments_are_400_naming_the_field(ngram_server, field, value):
    r = httpx.post(ngram_server.url + "/v1/completions", json={"prompt": [1], "max_tokens": 3, field: value},
                   timeout=60)
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == field and error["code"] == "unsupported_with_draft"
    assert field in error["message"] and "--draft ngram" in error["message"], error


def test_bad_draft_flags_exit_2_with_one_line(models, tmp_path, capsys):
    root = models[0]
    other = replace(CONFIG, vocab_size=300)
    save_checkpoint(other, init_params(other, 1), tmp_path / "other")
    serve = ["serve", "--checkpoint", str(root / "target"), "--port", "1"]
    cases = [(["--draft", "ngram", "--spec-k", "0"], "--spec-k 0 must be in [1, 16]"),
             (["--draft", "ngram", "--spec-k", "17"], "--spec-k 17 must be in [1, 16]"),
             (["--draft", str(tmp_path / "missing")], "is neither `ngram` nor a checkpoint directory"),
             (["--draft", str(tmp_path / "other")], "vocabulary of 300 tokens, the checkpoint 256"),
             (["--draft", "ngram", "--mesh", "tensor=2"], "--draft runs on one device: drop --mesh"),
             (["--draft", "ngram", "--batching", "dynamic"], "--draft needs --batching continuous"),
             (["--draft", "ngram", "--ngram", "2"], "--ngram '2' must be two integers")]
    for flags, message in cases:
        assert main([*serve, *flags]) == 2, flags
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("gptjax serve: error: ") and message in err[0], (flags, err)
