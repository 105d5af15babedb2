"""`gptjax serve`: a real server in a subprocess on 127.0.0.1, talked to over HTTP with httpx.

Server "cli" is the `gptjax serve` command (API key, JSONL traces); server "faulty" (tests/_serve_faulty.py)
runs the same app over a backend with injected failures and slowness, for batching, backpressure, timeouts,
disconnects and SIGTERM draining."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import wait_until

from gptjax import init_params, save_checkpoint
from gptjax.backends import get_backend
from gptjax.config import get_preset
from gptjax.sampling import SamplingParams
from gptjax.tokenizer import ByteTokenizer

CONFIG = get_preset("tiny")  # 256 tokens (bytes), context 64
PARAMS = {k: v + np.random.default_rng(2).normal(0, 0.3, v.shape).astype(np.float32)
          for k, v in init_params(CONFIG, 2).items()}
KEY = "sekret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
HERE = Path(__file__).parent
pytestmark = pytest.mark.integration  # every test starts or talks to a server subprocess
READY_S = 900  # start-up bound: the full warm-up compiles every program first (242 s for the tiny fixture at load 17)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server subprocess and its base URL."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.proc = subprocess.Popen([sys.executable, *args(self.port)] if callable(args) else args, env=env,
                                     stdout=open(log, "w"), stderr=subprocess.STDOUT)
        deadline, self.health_seen = time.monotonic() + READY_S, []
        while True:
            assert self.proc.poll() is None, log.read_text()
            try:
                health = httpx.get(self.url + "/health")
                self.health_seen.append((health.status_code, health.json()["status"]))
                if health.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"server not ready in {READY_S} s"
            time.sleep(0.05)

    def post(self, body, headers=None, **kw):
        """POST /v1/completions (a dict as JSON, bytes as they are)."""
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return httpx.post(self.url + "/v1/completions", content=content, headers=headers, timeout=30, **kw)

    def metric(self, name: str) -> float:
        """One sample's value from /metrics (0 when absent)."""
        for line in httpx.get(self.url + "/metrics").text.splitlines():
            if line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "GPTJAX_"))}
    return env | {"PYTHONPATH": str(HERE.parent) + os.pathsep + env.get("PYTHONPATH", ""),
                  "OTEL_BSP_SCHEDULE_DELAY": "100"} | extra


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("serve") / "tiny-ck"
    save_checkpoint(CONFIG, PARAMS, path)
    return path


@pytest.fixture(scope="module")
def cli(checkpoint):
    trace = checkpoint.parent / "spans.jsonl"
    server = Server(lambda port: ["-m", "gptjax.cli", "serve", "--checkpoint", str(checkpoint), "--port", str(port),
                                  "--max-tokens-cap", "40", "--max-body-bytes", "4096", "--trace", str(trace)],
                    _env(GPTJAX_API_KEY=KEY), checkpoint.parent / "cli.log")
    server.trace = trace
    yield server
    assert server.stop() == 0, server.log.read_text()


@pytest.fixture(scope="module", params=["dynamic", "continuous"])
def faulty(checkpoint, request):
    server = Server(lambda port: [str(HERE / "_serve_faulty.py"), str(checkpoint), str(port), request.param], _env(),
                    checkpoint.parent / f"faulty-{request.param}.log")
    server.batching = request.param
    yield server
    server.stop()


@pytest.fixture(scope="module")
def backend():
    return get_backend("jax", CONFIG)


def _expected(backend, prompt, max_tokens, seed, **kw):
    return backend.generate(PARAMS, [prompt], max_tokens, sampling=SamplingParams(seed=seed, **kw))


# ---- completions and streaming equal backend.generate -----------------------------------------------------
SETTINGS = [  # (request fields, generate() keyword arguments)
    (dict(temperature=1.0), {}),
    (dict(temperature=0), dict(greedy=True)),
    (dict(temperature=0.7, top_k=5), dict(temperature=0.7, top_k=5)),
    (dict(top_p=0.5, temperature=1.3), dict(temperature=1.3, top_p=0.5)),
    (dict(stop=[7, "a"]), dict(stop_tokens=[7, 97])),
]


@pytest.mark.parametrize("fields, kwargs", SETTINGS)
def test_completion_equals_generate(cli, backend, fields, kwargs):
    r = cli.post({"model": "tiny-ck", "prompt": "Hello", "max_tokens": 20, "seed": 42} | fields, AUTH)
    assert r.status_code == 200, r.text
    body = r.json()
    expected = _expected(backend, list(b"Hello"), 20, 42, **kwargs)
    choice = body["choices"][0]
    assert choice["token_ids"] == expected.tokens[0] and choice["finish_reason"] == expected.finish_reasons[0]
    assert choice["text"] == ByteTokenizer().decode(expected.tokens[0])
    assert body["object"] == "text_completion" and body["model"] == "tiny-ck" and body["id"].startswith("cmpl-")
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": len(expected.tokens[0]),
                             "total_tokens": 5 + len(expected.tokens[0])}


def _sse(response) -> list:
    lines = [line for line in response.text.split("\n\n") if line]
    assert all(line.startswith("data: ") for line in lines), lines
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines[:-1]]


def test_stream_equals_generate_and_ends_with_done(cli, backend):
    r = cli.post({"prompt": [3, 1, 4, 1, 5], "max_tokens": 30, "seed": 7, "stream": True, "top_k": 20,
                  "stream_options": {"include_usage": True}}, AUTH)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = _sse(r)
    chunks, usage = events[:-1], events[-1]
    expected = _expected(backend, [3, 1, 4, 1, 5], 30, 7, top_k=20)
    assert [t for c in chunks for t in c["choices"][0]["token_ids"]] == expected.tokens[0]
    assert len(chunks) > 2 and all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"][0]["finish_reason"] == expected.finish_reasons[0]
    assert "".join(c["choices"][0]["text"] for c in chunks) == ByteTokenizer().decode(expected.tokens[0])
    assert len({c["id"] for c in events}) == 1 and usage["choices"] == []
    assert usage["usage"]["completion_tokens"] == len(expected.tokens[0])


def test_models_and_health(cli):
    assert httpx.get(cli.url + "/v1/models", headers=AUTH).json()["data"][0]["id"] == "tiny-ck"
    assert httpx.get(cli.url + "/health").json() == {"status": "ready"}
    assert (503, "loading") in cli.health_seen  # while the warm-up compiled


@pytest.mark.parametrize("flags, message", [
    (["--max-batch", "0"], "--max-batch 0 must be >= 1"),
    (["--port", "70000"], "--port 70000 must be in [0, 65535]"),
    (["--request-timeout", "nan"], "--request-timeout nan must be a finite number > 0"),  # issue 31: was accepted
    (["--max-tokens-cap", "65"], "--max-tokens-cap 65 must be in [1, 64]"),
])
def test_bad_serve_flags_exit_2_with_one_line(checkpoint, flags, message):
    r = subprocess.run([sys.executable, "-m", "gptjax.cli", "serve", "--checkpoint", str(checkpoint), *flags],
                       capture_output=True, text=True, env=_env(), timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == f"gptjax serve: error: {message}", r.stderr


# ---- bad input: 400 (or its own status) with an OpenAI error naming the field ------------------------------
BAD = [
    (b'{"prompt": [1, 2', 400, None, "not valid JSON"),
    (b'[1, 2]', 400, None, "must be a JSON object"),
    ({"prompt": [1], "max_tokens": 2, "frobnicate": 1}, 400, "frobnicate", "unknown field 'frobnicate'"),
    ({"prompt": [1], "max_tokens": "2"}, 400, "max_tokens", "max_tokens must be an integer in [1, 40]"),
    ({"prompt": ""}, 400, "prompt", "prompt must not be empty"),
    ({"prompt": []}, 400, "prompt", "prompt must not be empty"),
    ({}, 400, "prompt", "prompt is required"),
    ({"prompt": 5}, 400, "prompt", "prompt must be a string or a list of token ids"),
    ({"prompt": [1, 256]}, 400, "prompt", "token id 256 is outside [0, 256)"),
    ({"prompt": [1, -1]}, 400, "prompt", "token id -1 is outside [0, 256)"),
    ({"prompt": [1, True]}, 400, "prompt", "list of integer token ids"),
    ({"prompt": ["a"] * 65}, 400, "prompt", "a list of 65 prompts; at most 64"),
    ({"prompt": "x" * 60, "max_tokens": 10}, 400, "max_tokens", "prompt (60 tokens) + max_tokens (10) = 70 exceeds"),
    ({"prompt": "x" * 64}, 400, "prompt", "the context is 64 tokens"),
    ({"prompt": [1], "max_tokens": 0}, 400, "max_tokens", "max_tokens must be an integer in [1, 40]"),
    ({"prompt": [1], "max_tokens": 41}, 400, "max_tokens", "max_tokens must be an integer in [1, 40]"),
    ({"prompt": [1], "temperature": -0.1}, 400, "temperature", "temperature must be a number in [0, 2]"),
    ({"prompt": [1], "temperature": "hot"}, 400, "temperature", "temperature must be a number in [0, 2]"),
    ({"prompt": [1], "top_p": 0}, 400, "top_p", "top_p must be a number in (0, 1]"),
    ({"prompt": [1], "top_p": 1.5}, 400, "top_p", "top_p must be a number in (0, 1]"),
    ({"prompt": [1], "top_k": 0}, 400, "top_k", "top_k must be an integer in [1, 256] or null"),
    ({"prompt": [1], "seed": -3}, 400, "seed", "seed must be an integer in [0, 2**32)"),
    ({"prompt": [1], "n": 17}, 400, "n", "n must be an integer in [1, 16]"),
    ({"prompt": [1], "stream": "yes"}, 400, "stream", "stream must be true or false"),
    ({"prompt": [1], "stop": "x" * 257}, 400, "stop", "a stop string of 257 UTF-8 bytes; at most 256"),
    ({"prompt": [1], "stream_options": {"include_usage": True}}, 400, "stream_options", "only allowed with stream"),
    ({"prompt": [1], "model": "gpt-4"}, 404, "model", "the model 'gpt-4' does not exist"),
    (b'{"prompt": "' + b"x" * 5000 + b'"}', 413, None, "larger than 4096 bytes"),
    # found in review (each was a 500 before its fix)
    ({"prompt": [1], "temperature": 10 ** 400}, 400, "temperature", "temperature must be a number in [0, 2]"),
    ({"prompt": [1], "top_p": -10 ** 400}, 400, "top_p", "top_p must be a number in (0, 1]"),
    (b'{"prompt": "\\ud800", "max_tokens": 2}', 400, "prompt", "prompt is not encodable text: surrogates"),
    (b'{"prompt": [1], "max_tokens": 2, "stop": "\\ud800"}', 400, "stop", "stop is not encodable text"),
    (b"[" * 2000 + b"]" * 2000, 400, None, "nests JSON too deeply"),
    # issue 31 point 8: two spellings of one token id are refused as the library refuses them (not merged)
    (b'{"prompt": [1], "logit_bias": {"65": 100, "065": -100}}', 400, "logit_bias", "token id 65 is given twice"),
]


@pytest.mark.parametrize("body, status, param, message", BAD)
def test_bad_input_is_rejected_naming_the_field(cli, body, status, param, message):
    r = cli.post(body, AUTH)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert message in error["message"] and error["param"] == param
    assert error["type"] == "invalid_request_error" and "Traceback" not in r.text


def test_api_key_is_required_on_v1(cli):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = cli.post({"prompt": [1], "max_tokens": 2}, headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(cli.url + "/v1/models").status_code == 401
    assert httpx.get(cli.url + "/health").status_code == 200  # probes and scrapes need no key


def test_metrics_count_http_requests_by_route_and_status(cli):
    name = 'gptjax_http_requests_total{method="POST",route="/v1/completions",status="%d"}'
    before = {s: cli.metric(name % s) for s in (200, 400, 401)}
    for _ in range(3):
        assert cli.post({"prompt": [1], "max_tokens": 2}, AUTH).status_code == 200
    for _ in range(2):
        assert cli.post({"prompt": [1], "n": 17}, AUTH).status_code == 400
    assert cli.post({"prompt": [1]}).status_code == 401
    assert {s: cli.metric(name % s) - before[s] for s in before} == {200: 3, 400: 2, 401: 1}
    assert cli.metric('gptjax_requests_total{outcome="ok"}') >= 3  # the backend's own metrics are there too


def test_traceparent_continues_the_clients_trace(cli):
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    r = cli.post({"prompt": [9, 9], "max_tokens": 6}, AUTH | {"traceparent": f"00-{trace_id}-{parent_id}-01"})
    assert r.status_code == 200

    def read() -> list:
        lines = cli.trace.read_text().splitlines() if cli.trace.exists() else []
        return [s for s in map(json.loads, lines) if s["trace_id"] == trace_id]

    wait_until(lambda: {"gptjax.prefill", "gptjax.serve.batch"} <= {s["name"] for s in read()}, "the request's spans")
    spans = read()
    by_id = {s["span_id"]: s for s in spans}
    chain, span = [], next(s for s in spans if s["name"] == "gptjax.prefill")
    while span["parent_id"] in by_id:  # walk up from the prefill to the span the client's parent id starts
        span = by_id[span["parent_id"]]
        chain.append(span["name"])
    assert span["parent_id"] == parent_id and span["name"] == "POST /v1/completions"
    assert span["attributes"]["http.response.status_code"] == 200
    assert chain[:2] == ["text_completion gpt-2L-32d-256v", "gptjax.serve.batch"], chain


# ---- batching, failures, backpressure, timeouts, disconnects (the faulty server) -----------------------------
SLOW, VERY_SLOW = 254, 253  # a prompt starting with one makes its batch slow (tests/_serve_faulty.py); 255 fails


def _slow_leader(server, pool, max_tokens=8):
    """Start a slow request and wait until it runs, so what follows queues behind it."""
    future = pool.submit(server.post, {"prompt": [SLOW, 1], "max_tokens": max_tokens, "seed": 1})
    wait_until(lambda: server.metric("gptjax_serve_batch_size_count") >= server.batches + 1, "the slow batch")
    server.batches += 1
    return future


@pytest.fixture
def pool(faulty):
    faulty.batches = faulty.metric("gptjax_serve_batch_size_count")
    with ThreadPoolExecutor(32) as pool:
        yield pool


@pytest.mark.slow
def test_concurrent_requests_are_batched_and_get_their_solo_tokens(faulty, pool, backend):
    leader = _slow_leader(faulty, pool)
    cases = [([10, 20], 12, dict(temperature=0.8), 3), ([5], 7, dict(top_k=3), 4),
             ([1, 2, 3, 4, 5, 6], 15, dict(temperature=0), 5), ([77], 9, dict(top_p=0.9), 3)]
    futures = [pool.submit(faulty.post, {"prompt": p, "max_tokens": n, "seed": s} | kw) for p, n, kw, s in cases]
    for future, (prompt, n, kw, seed) in zip(futures, cases):
        kwargs = {"greedy": True} if kw == {"temperature": 0} else kw
        assert future.result().json()["choices"][0]["token_ids"] == _expected(backend, prompt, n, seed,
                                                                               **kwargs).tokens[0]
    assert leader.result().status_code == 200
    if faulty.batching == "dynamic":
        assert faulty.metric("gptjax_serve_batch_size_count") == faulty.batches + 1  # the four ran as one batch
        assert faulty.metric("gptjax_serve_batch_size_sum") >= 5


@pytest.mark.parametrize("faulty", ["continuous"], indirect=True)  # dynamic: requests wait for the running batch
def test_continuous_batching_lets_requests_join_a_running_batch(faulty, backend):
    batches = faulty.metric("gptjax_serve_batch_size_count")
    pool = ThreadPoolExecutor(4)
    leader = pool.submit(faulty.post, {"prompt": [VERY_SLOW, 1], "max_tokens": 24, "seed": 1, "stream": True})
    # the leader's session runs (its batch started): 6 chunks of 1 s; it has one spare row (rows = 2 x jobs)
    wait_until(lambda: faulty.metric("gptjax_serve_batch_size_count") > batches, "the leader's session")
    joiners = [pool.submit(faulty.post, {"prompt": [i, 7], "max_tokens": 4, "seed": i}) for i in (1, 2)]
    for i, future in zip((1, 2), joiners):
        assert future.result().json()["choices"][0]["token_ids"] == _expected(backend, [i, 7], 4, i).tokens[0]
    assert not leader.done()  # they finished inside the leader's batch, one after the other, not after it
    events = _sse(leader.result())
    expected = _expected(backend, [VERY_SLOW, 1], 24, 1).tokens[0]
    assert [t for e in events for t in e["choices"][0]["token_ids"]] == expected
    assert faulty.metric("gptjax_serve_batch_size_count") == batches + 1  # one session served all three
    pool.shutdown()


def test_a_failing_request_fails_alone(faulty, pool, backend):
    leader = _slow_leader(faulty, pool)
    good = [pool.submit(faulty.post, {"prompt": [i, 2], "max_tokens": 6, "seed": i}) for i in (1, 2)]
    bad = pool.submit(faulty.post, {"prompt": [255, 2], "max_tokens": 6})
    r = bad.result()
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    assert "RuntimeError" in r.json()["error"]["message"] and "secret" not in r.text and "Traceback" not in r.text
    for i, future in zip((1, 2), good):
        assert future.result().json()["choices"][0]["token_ids"] == _expected(backend, [i, 2], 6, i).tokens[0]
    assert leader.result().status_code == 200
    assert httpx.get(faulty.url + "/health").status_code == 200


def test_a_burst_over_the_queue_gets_429_and_nothing_is_lost(faulty, pool):
    name = 'gptjax_http_requests_total{method="POST",route="/v1/completions",status="%d"}'
    before = {s: faulty.metric(name % s) for s in (200, 429)}
    leader = _slow_leader(faulty, pool)
    n = 16  # 4 x the queue size
    responses = list(pool.map(lambda i: faulty.post({"prompt": [i + 1], "max_tokens": 4, "seed": i}), range(n)))
    assert leader.result().status_code == 200
    statuses = [r.status_code for r in responses]
    assert set(statuses) == {200, 429} and statuses.count(200) >= 4, statuses
    assert all(r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "queue_full"
               for r in responses if r.status_code == 429)
    ids = [r.json()["id"] for r in responses if r.status_code == 200]
    assert len(set(ids)) == len(ids)
    after = {s: faulty.metric(name % s) - before[s] for s in before}
    assert after == {200: statuses.count(200) + 1, 429: statuses.count(429)}  # + the leader
    assert sum(after.values()) == n + 1


@pytest.mark.parametrize("faulty", ["dynamic"], indirect=True)  # the app's timeout, alike for both modes; continuous
def test_a_timeout_is_504_and_cancels_the_work(faulty):  # mode's cancelling is tested by the disconnect test
    cancelled = faulty.metric('gptjax_requests_total{outcome="cancelled"}')
    timeouts = faulty.metric('gptjax_serve_cancelled_total{reason="timeout"}')
    t0 = time.monotonic()
    r = faulty.post({"prompt": [VERY_SLOW], "max_tokens": 60})  # 15 chunks x 1 s > the 8 s timeout
    assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
    assert 7.9 < time.monotonic() - t0 < 9.5
    wait_until(lambda: faulty.metric('gptjax_requests_total{outcome="cancelled"}') != cancelled,
                "the generation to be cancelled")
    assert faulty.metric('gptjax_serve_cancelled_total{reason="timeout"}') == timeouts + 1


def test_a_client_leaving_mid_stream_cancels_the_work(faulty):
    cancelled = faulty.metric('gptjax_requests_total{outcome="cancelled"}')
    generated = faulty.metric('gptjax_generated_tokens_total{backend="jax"}')
    with httpx.stream("POST", faulty.url + "/v1/completions", timeout=10,
                      json={"prompt": [SLOW], "max_tokens": 60, "stream": True}) as r:
        first = next(r.iter_lines())
        assert json.loads(first[6:])["choices"][0]["token_ids"]
    wait_until(lambda: faulty.metric('gptjax_requests_total{outcome="cancelled"}') != cancelled,
                "the generation to be cancelled")
    assert faulty.metric('gptjax_serve_cancelled_total{reason="disconnect"}') >= 1
    assert faulty.metric('gptjax_generated_tokens_total{backend="jax"}') - generated < 60  # stopped early


def test_a_client_leaving_a_json_request_cancels_the_work(faulty):
    # found in review: a non-streaming request went on to max_tokens after its client left, since the
    # disconnect was only checked when no event had come for 0.5 s
    cancelled = faulty.metric('gptjax_serve_cancelled_total{reason="disconnect"}')
    generated = faulty.metric('gptjax_generated_tokens_total{backend="jax"}')
    with pytest.raises(httpx.TimeoutException):
        httpx.post(faulty.url + "/v1/completions", json={"prompt": [SLOW], "max_tokens": 60}, timeout=1.5)
    wait_until(lambda: faulty.metric('gptjax_serve_cancelled_total{reason="disconnect"}') != cancelled,
                "the generation to be cancelled")
    assert faulty.metric('gptjax_generated_tokens_total{backend="jax"}') - generated < 60  # stopped early


def _queue_depth(server) -> float:
    return server.metric("gptjax_serve_queue_depth")


def _waiting_client(server, body: dict) -> socket.socket:
    """A client that has sent a completion request and not read its answer yet (close() makes it leave)."""
    data = json.dumps(body).encode()
    client = socket.create_connection(("127.0.0.1", server.port))
    client.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                   + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return client


@pytest.mark.parametrize("faulty", ["dynamic"], indirect=True)  # continuous: queued jobs would join the session
def test_clients_that_leave_free_their_queue_slots_at_once(faulty, pool):
    # issue 31: a cancelled job kept its queue slot until the worker next pulled (queue_depth stayed 64 for ~9 s
    # after every client left, and a normal request got 429)
    leader = pool.submit(faulty.post, {"prompt": [VERY_SLOW, 1], "max_tokens": 24, "seed": 1})  # ~6 s
    wait_until(lambda: faulty.metric("gptjax_serve_batch_size_count") >= faulty.batches + 1, "the slow batch")
    leaving = [_waiting_client(faulty, {"prompt": [i + 1], "max_tokens": 4}) for i in range(4)]  # the queue's 4 slots
    wait_until(lambda: _queue_depth(faulty) == 4, "the queue to fill")
    for client in leaving:
        client.close()  # each client leaves while its request waits (an event, not a client-side timeout)
    wait_until(lambda: _queue_depth(faulty) == 0, "the slots to be freed", timeout=3.0)  # the server checks every 0.5 s
    assert not leader.done()  # freed while the batch before them still runs, not when the worker pulls them
    assert faulty.post({"prompt": [9], "max_tokens": 2, "seed": 9}).status_code == 200
    assert leader.result().status_code == 200


@pytest.fixture(scope="module")
def shared(checkpoint):
    """The faulty server (dynamic batching, a queue of 4) giving each client 2 of its slots."""
    server = Server(lambda port: [str(HERE / "_serve_faulty.py"), str(checkpoint), str(port), "dynamic",
                                  "max_queued_per_client=2", "request_timeout=30"], _env(),
                    checkpoint.parent / "faulty-shared.log")
    yield server
    server.stop()


def test_one_client_flooding_the_queue_leaves_room_for_others(shared):
    # issue 31: abusive clients could fill the queue so that normal ones got 429; --max-queued-per-client N
    # gives each client (its address here: no API key) N slots
    with ThreadPoolExecutor(8) as pool, httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.2"),
                                                     timeout=60) as flooder:
        batches = shared.metric("gptjax_serve_batch_size_count")
        leader = pool.submit(shared.post, {"prompt": [VERY_SLOW, 1], "max_tokens": 24, "seed": 1})
        wait_until(lambda: shared.metric("gptjax_serve_batch_size_count") > batches, "the slow batch")
        url = shared.url + "/v1/completions"
        queued = [pool.submit(flooder.post, url, json={"prompt": [i + 1], "max_tokens": 2}) for i in range(2)]
        wait_until(lambda: _queue_depth(shared) == 2, "the flooder's two requests to queue")
        refused = [flooder.post(url, json={"prompt": [i + 3], "max_tokens": 2}) for i in range(3)]
        assert [r.status_code for r in refused] == [429] * 3
        assert all("this client's share of the queue is full" in r.json()["error"]["message"] for r in refused)
        normal = [pool.submit(shared.post, {"prompt": [30 + i], "max_tokens": 2, "seed": i}) for i in range(2)]
        assert [f.result().status_code for f in normal] == [200, 200]  # from 127.0.0.1: its own 2 slots
        assert [f.result().status_code for f in queued] == [200, 200] and leader.result().status_code == 200


def test_sigterm_drains_in_flight_requests_then_exits_0(faulty, pool):  # last in the file: it ends the faulty server
    stream = pool.submit(faulty.post, {"prompt": [SLOW, 3], "max_tokens": 12, "seed": 5, "stream": True})
    wait_until(lambda: faulty.metric("gptjax_serve_batch_size_count") >= faulty.batches + 1, "the stream's batch")
    faulty.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: httpx.get(faulty.url + "/health").status_code != 200, "/health to leave 'ready'")
    health = httpx.get(faulty.url + "/health")
    assert health.status_code == 503 and health.json() == {"status": "draining"}
    late = faulty.post({"prompt": [1], "max_tokens": 2})
    assert late.status_code == 503 and late.json()["error"]["message"] == "the server is shutting down"
    events = _sse(stream.result())
    assert sum(len(e["choices"][0]["token_ids"]) for e in events) == 12
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert faulty.proc.wait(20) == 0
