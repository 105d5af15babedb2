"""Issue 31: the server under a real request mix, in-process (the app under starlette's TestClient, no subprocess):
stop strings cut as token by token in every configuration (point 1), streamed log-probabilities scored once per
position (point 2), no compilation after a full warm-up whatever the mix (point 3), every numeric flag of `gptjax
serve` checked at start-up (point 4). The subprocess ones (/tokenize beside /health, queue slots, per-client
share) are in test_serve.py; the soak in test_serve_soak.py."""

import argparse
import json
import math
import threading
import time
from pathlib import Path

import jax.monitoring
import numpy as np
import pytest
from fastapi.testclient import TestClient

from gptjax.backends import get_backend
from gptjax.cli import main
from gptjax.cli import serve as serve_cli
from gptjax.serve import ServedModel, ServeOptions, create_app
from gptjax.serve.warmup import WARMUPS
from gptjax.speculative import ModelDraft, NgramDraft
from gptjax.tokenizer import ByteTokenizer
from gptjax.tracing.metrics import Metrics
from gptjax.weights import load_checkpoint

TRAINED = Path(__file__).parent / "fixtures" / "trained_byte_tiny"
CONFIG, PARAMS = load_checkpoint(TRAINED)
COMPILED = "/jax/core/compile/backend_compile_duration"  # jax.monitoring's event for every XLA compilation


def _model(draft=None) -> ServedModel:
    metrics = Metrics()
    backend = get_backend("jax", CONFIG, metrics=metrics)
    spec = None if draft is None else backend.speculation(draft, 4)
    return ServedModel(backend, backend.prepare(PARAMS), ByteTokenizer(), metrics, spec)


class App:
    """create_app's app under TestClient, ready (its warm-up done)."""

    def __init__(self, model: ServedModel, **options) -> None:
        self.model = model
        # warm-up "none" compiles on the first request: on a loaded 2-core machine that took over the default 60 s
        options = {"request_timeout": 600.0} | options
        self.client = TestClient(create_app(model, ServeOptions(model_id="t", **options)))
        self.client.__enter__()
        deadline = time.monotonic() + 600
        while self.client.get("/health").status_code != 200:
            assert time.monotonic() < deadline, "not ready"
            time.sleep(0.02)

    def post(self, body: dict) -> dict:
        r = self.client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        return r.json()

    def stream(self, body: dict) -> list[dict]:
        with self.client.stream("POST", "/v1/completions", json=body | {"stream": True}) as r:
            assert r.status_code == 200
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        return [json.loads(e) for e in events[:-1]]

    def close(self) -> None:
        self.client.__exit__(None, None, None)


# ---- point 1: a stop string's cut does not depend on the configuration ----------------------------------------
CONFIGURATIONS = {"chunk 1": {"chunk_size": 1}, "chunk 4": {"chunk_size": 4}, "chunk 16": {"chunk_size": 16},
                  "dynamic": {"batching": "dynamic"}, "ngram": {"draft": NgramDraft(3, 1)},
                  "model draft": {"draft": ModelDraft(PARAMS, CONFIG)}}


@pytest.mark.parametrize("name", list(CONFIGURATIONS))
def test_stop_strings_cut_as_token_by_token_in_every_configuration(name):
    # "class A" continues greedily with "None in the the ": "ne" completes (4th byte) before "one " (5th) does.
    # Before the fix: "N" at --chunk-size 4 and with --draft ngram, "No" at --chunk-size 1; token_ids "None" always.
    settings = dict(CONFIGURATIONS[name])
    app = App(_model(settings.pop("draft", None)), warmup="none", **settings)
    try:
        body = {"prompt": "class A", "max_tokens": 16, "temperature": 0, "stop": ["one ", "ne"]}
        choice = app.post(body)["choices"][0]
        assert (choice["text"], choice["token_ids"], choice["finish_reason"]) == ("No", list(b"None"), "stop")
        events = app.stream(body)
        assert "".join(e["choices"][0]["text"] for e in events) == "No"
        assert [t for e in events for t in e["choices"][0]["token_ids"]] == list(b"None")
    finally:
        app.close()


# ---- point 2: streamed log-probabilities score each position once -----------------------------------------------
def test_streamed_logprobs_score_each_position_once():
    app = App(_model(), warmup="none", chunk_size=2)
    backend, scored = app.model.backend, []
    opened, scores = backend.open_scorer, backend.score

    def open_scorer(*args, **kwargs):
        scorer = opened(*args, **kwargs)
        scored.append(scorer)
        return scorer

    def score(params, sequences, **kwargs):  # a whole sequence per call: what each chunk cost before the fix
        scored.append(sum(len(s) - 1 for s in sequences))
        return scores(params, sequences, **kwargs)

    backend.open_scorer, backend.score = open_scorer, score
    try:
        prompt = list(b"def f(x):\n    return")
        body = {"prompt": prompt, "max_tokens": 30, "seed": 3, "logprobs": 5, "echo": True}
        events = app.stream(body)
        tokens = [t for e in events for t in e["choices"][0]["token_ids"]]
        assert len(events) > 10 and len(tokens) == 30
        fed = sum(s if isinstance(s, int) else s.fed for s in scored)
        assert fed == len(prompt) + len(tokens) - 1  # before the fix: each chunk re-scored the whole sequence
        whole = app.post(body)["choices"][0]["logprobs"]
        streamed = [v for e in events for v in e["choices"][0]["logprobs"]["token_logprobs"]]
        assert streamed[0] is None and np.allclose(streamed[1:], whole["token_logprobs"][1:], atol=1e-5)
    finally:
        app.close()


# ---- point 3: a full warm-up compiles every program a request mix can reach ------------------------------------
def _mix(app: App, worker: int, rng: np.random.Generator) -> None:
    """Requests cycling prompt length x max_tokens x n x sampling mode x logprobs x stream x stop."""
    for i in range(8):
        n = int(rng.integers(1, CONFIG.n_positions - 1))
        body = {"prompt": [int(t) for t in rng.integers(1, 256, n)], "seed": i, "n": int(rng.integers(1, 4)),
                "max_tokens": int(rng.integers(1, CONFIG.n_positions - n + 1))}
        body |= [{}, {"temperature": 0}, {"top_k": 5, "top_p": 0.9}, {"presence_penalty": 0.5, "logit_bias": {"3": 1}},
                 {"logprobs": 3, "echo": True}][(worker + i) % 5]
        body |= {"stop": ["a", 7]} if i % 3 == 0 else {}
        if i % 2:
            app.stream(body)
        else:
            app.post(body)


@pytest.mark.slow
def test_no_compilation_after_a_full_warm_up_whatever_the_mix():
    compiles: list[str] = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, seconds, **kw: compiles.append(event) if event == COMPILED else None)
    app = App(_model(), max_batch=16)  # the default: --warmup full
    try:
        held = app.model.backend.compile_count()
        compiles.clear()
        threads = [threading.Thread(target=_mix, args=(app, w, np.random.default_rng(w))) for w in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert compiles == []  # not one XLA compilation (jitted or eager) on a user's request
        assert app.model.backend.compile_count() == held
        metrics = app.client.get("/metrics").text
        assert 'purpose="request"' not in metrics and f'gptjax_compiled_programs{{backend="jax"}} {held:.1f}' in metrics
    finally:
        app.close()


# ---- point 4: every numeric flag is checked at start-up ---------------------------------------------------------
def _bad_values(integer: bool, low: float, high: float | None, closed: bool) -> list[str]:
    """Out of range: below (or at an open) low, above high, negative, and for floats nan and the infinities."""
    values = {str(low - 1 if closed else low), "-1"} | ({str(high + 1)} if high is not None else set())
    return sorted(values | (set() if integer else {"nan", "inf", "-inf"}))


CASES = [(flag, value, serve_cli._range(integer, low, high, closed))
         for flag, _, integer, low, high, closed in serve_cli.NUMERIC_FLAGS
         for value in _bad_values(integer, low, high, closed)]


@pytest.mark.parametrize("flag, value, allowed", CASES)
def test_every_numeric_flag_out_of_range_exits_2_naming_it(flag, value, allowed, capsys):
    # before the fix --request-timeout nan was accepted, then every completion failed with a 500
    assert main(["serve", "--checkpoint", str(TRAINED), f"{flag}={value}"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    shown = float(value) if "finite" in allowed else value  # as argparse parsed it
    assert line == f"gptjax serve: error: {flag} {shown} must be {allowed}", line


def test_flag_ranges_say_what_is_allowed():
    parser = argparse.ArgumentParser()
    serve_cli.add_arguments(parser)
    for flag, name, integer, low, high, closed in serve_cli.NUMERIC_FLAGS:
        default = getattr(parser.parse_args(["--checkpoint", "x"]), name)
        assert default is None or serve_cli._in_range(default, low, high, closed), flag  # the defaults pass
    assert serve_cli._range(False, 0, None, False) == "a finite number > 0"
    assert serve_cli._range(True, 0, 65535, True) == "in [0, 65535]"
    assert not serve_cli._in_range(math.nan, 0, None, False) and not serve_cli._in_range(math.inf, 0, None, True)
    assert tuple(serve_cli.WARMUPS) == WARMUPS
