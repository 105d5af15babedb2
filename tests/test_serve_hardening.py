"""Issue 15's server points: bounded /metrics labels, a client hanging up mid-upload (499, not 500), duplicate
JSON keys (400), and the ready and access-log lines. The server tests run `gptjax serve` for real on
127.0.0.1 and read its output through a pipe."""

import http.client
import json
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import wait_until

from gptjax import init_params, save_checkpoint
from gptjax.config import get_preset
from gptjax.sampling import SamplingParams
from gptjax.serve.protocol import Limits, RequestError, parse_completion

CONFIG = get_preset("tiny")  # 256 tokens (bytes), context 64
HERE = Path(__file__).parent
WAIT_S = 300.0  # bound on every wait for the server's answers
READY_S = 900.0  # bound on start-up: the full warm-up took 208-300+ s at load 17-24 on the shared 2-core machine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PipedServer:
    """`gptjax serve --checkpoint CHECKPOINT FLAGS...` in a subprocess whose stdout+stderr lines a thread puts on a
    queue."""

    def __init__(self, checkpoint: Path, *flags: str) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "GPTJAX_"))}
        env["PYTHONPATH"] = str(HERE.parent) + os.pathsep + env.get("PYTHONPATH", "")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gptjax.cli", "serve", "--checkpoint", str(checkpoint), "--port", str(self.port),
             *flags], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()
        self._wait_healthy()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + READY_S
        while True:
            assert self.proc.poll() is None, "\n".join(self.drain())
            try:
                if httpx.get(self.url + "/health").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() >= deadline:
                self.proc.kill()  # a server that never became ready must not outlive the test
                self.proc.wait()
                raise AssertionError("server not ready in %.0f s:\n%s" % (READY_S, "\n".join(self.drain())))
            time.sleep(0.05)

    def drain(self) -> list[str]:
        """Every line printed so far (kept in self.seen)."""
        while True:
            try:
                self.seen.append(self.lines.get_nowait())
            except queue.Empty:
                return self.seen

    def wait_line(self, match, timeout: float = 30.0) -> str:
        """The first printed line (from the start) for which match(line) holds, waiting on the pipe."""
        deadline = time.monotonic() + timeout
        checked = 0
        while True:
            for line in self.seen[checked:]:
                if match(line):
                    return line
            checked = len(self.seen)
            remaining = deadline - time.monotonic()
            assert remaining > 0, "no such line; printed:\n" + "\n".join(self.seen)
            try:
                self.seen.append(self.lines.get(timeout=remaining))
            except queue.Empty:
                pass

    def series(self, name: str = "gptjax_http_requests_total") -> dict[str, float]:
        """The samples of one metric: label string → value."""
        out = {}
        for line in httpx.get(self.url + "/metrics").text.splitlines():
            if line.startswith(name + "{"):
                labels, value = line.rsplit(" ", 1)
                out[labels] = float(value)
        return out

    def stop(self) -> int:
        self.proc.terminate()
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hardening") / "tiny-ck"
    save_checkpoint(CONFIG, init_params(CONFIG, 2), path)
    return path


@pytest.fixture(scope="module")
def text_server(checkpoint):
    server = PipedServer(checkpoint, "--log-format", "text")
    yield server
    assert server.stop() == 0, "\n".join(server.drain())


# ---- 4: every /metrics label value comes from a fixed set ---------------------------------------------------
@pytest.mark.integration
def test_made_up_methods_do_not_grow_metrics(text_server):
    text_server.series()  # the first scrape adds the GET /metrics series
    before = text_server.series()
    for i in range(50):
        conn = http.client.HTTPConnection("127.0.0.1", text_server.port, timeout=30)
        conn.request(f"MADEUP{i}", "/health")
        assert conn.getresponse().status == 405
        conn.close()
    after = text_server.series()
    new = {k: v - before.get(k, 0.0) for k, v in after.items() if v != before.get(k, 0.0)}
    get_metrics = '{method="GET",route="/metrics",status="200"}'
    assert new == {'gptjax_http_requests_total{method="other",route="/health",status="405"}': 50.0,
                   "gptjax_http_requests_total" + get_metrics: 1.0}, new
    assert len(after) == len(before) + 1


# ---- 5: a client hanging up mid-upload is a 499, not a server error ------------------------------------------
@pytest.mark.integration
def test_a_client_hanging_up_mid_upload_counts_499_without_traceback(text_server):
    name = 'gptjax_http_requests_total{method="POST",route="/v1/completions",status="%s"}'
    before = text_server.series()
    text_server.drain()
    start = len(text_server.seen)
    with socket.create_connection(("127.0.0.1", text_server.port), timeout=30) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000\r\n\r\n" + b'{"prompt":')
    wait_until(lambda: text_server.series().get(name % "499", 0) + text_server.series().get(name % "500", 0)
                > before.get(name % "499", 0) + before.get(name % "500", 0), "the request to be counted")
    after = text_server.series()
    assert after.get(name % "499", 0) - before.get(name % "499", 0) == 1
    assert after.get(name % "500", 0) == before.get(name % "500", 0)
    text_server.wait_line(lambda line: " 499 " in line, timeout=10)  # its access-log line
    logged = text_server.drain()[start:]
    assert not [line for line in logged if "Traceback" in line or "ClientDisconnect" in line], logged
    assert len([line for line in logged if "/v1/completions" in line]) == 1, logged


# ---- 10: duplicate JSON keys are refused ----------------------------------------------------------------
def test_duplicate_json_keys_are_a_400_naming_the_key():
    limits = Limits(CONFIG, "tiny", CONFIG.n_positions)
    with pytest.raises(RequestError) as e:
        parse_completion(b'{"prompt": [1], "max_tokens": 60, "max_tokens": 2}', limits, None)
    assert e.value.status == 400 and e.value.param == "max_tokens" and "max_tokens" in e.value.message
    with pytest.raises(RequestError) as e:  # nested objects too
        parse_completion(b'{"prompt": [1], "stream": true, "stream_options": {"include_usage": true, '
                         b'"include_usage": false}}', limits, None)
    assert e.value.status == 400 and "include_usage" in e.value.message
    assert parse_completion(b'{"prompt": [1], "max_tokens": 2}', limits, None).requests[0].max_new_tokens == 2



# ---- the sampling fields: SamplingParams' own checks, plus only the HTTP limits --------------------------------
@pytest.mark.parametrize("fields, param, message", [
    ({"temperature": 2.5}, "temperature", "temperature must be a number in [0, 2] (0 means greedy), got 2.5"),
    ({"temperature": -1}, "temperature", "temperature must be a number in [0, 2] (0 means greedy), got -1"),
    ({"top_k": 257}, "top_k", "top_k must be an integer in [1, 256] or null, got 257"),  # the vocabulary check
    ({"seed": 2**32}, "seed", "seed must be an integer in [0, 2**32) or null, got 4294967296"),
    ({"presence_penalty": 10**400}, "presence_penalty", "presence_penalty must be a number in [-2, 2], got 1000"),
    ({"logit_bias": {"5": 10**400}}, "logit_bias", "the bias of token 5 must be a number in [-100, 100], got 1000"),
    ({"logit_bias": {"5": 1, "05": 2}}, "logit_bias", "logit_bias: token id 5 is given twice"),  # SamplingParams' words
    ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias", "logit_bias must be an object of at most 300"),
])
def test_bad_sampling_fields_are_400s_naming_the_field(fields, param, message):
    limits = Limits(CONFIG, "tiny", CONFIG.n_positions)
    with pytest.raises(RequestError) as e:
        parse_completion(json.dumps({"prompt": [1], "max_tokens": 2} | fields).encode(), limits, None)
    assert e.value.status == 400 and e.value.param == param and message in e.value.message, e.value.message


def test_one_sampling_params_per_sample_each_with_its_seed():
    limits = Limits(CONFIG, "tiny", CONFIG.n_positions)
    body = {"prompt": [[1], [2, 3]], "n": 3, "seed": 2**32 - 2, "max_tokens": 2, "temperature": 0.5, "top_p": 1}
    requests = parse_completion(json.dumps(body).encode(), limits, None).requests
    assert [r.sampling.seed for r in requests] == [2**32 - 2, 2**32 - 1, 0] * 2  # choice p * n + j: seed + j
    assert [r.sampling for r in requests[:3]] == [r.sampling for r in requests[3:]]
    assert requests[0].sampling == SamplingParams(temperature=0.5, seed=2**32 - 2)  # top_p 1: no nucleus filter

# ---- 14: a ready line and one access-log line per request, in the chosen format --------------------------
@pytest.mark.integration
def test_text_log_has_ready_and_access_lines(text_server):
    ready = text_server.wait_line(lambda line: "ready" in line and text_server.url in line)
    assert "tiny-ck" in ready
    r = httpx.post(text_server.url + "/v1/completions", json={"prompt": [1, 2], "max_tokens": 3}, timeout=60)
    assert r.status_code == 200
    line = text_server.wait_line(lambda line: "POST /v1/completions 200" in line)
    assert "tokens=3" in line and " ms" in line, line


@pytest.mark.integration
def test_json_log_has_ready_and_access_lines(checkpoint):
    server = PipedServer(checkpoint, "--log-format", "json")
    try:
        def records() -> list[dict]:
            return [json.loads(x) for x in server.seen if x.startswith("{")]

        server.wait_line(lambda line: line.startswith("{") and json.loads(line)["message"].startswith("ready"))
        ready = next(r for r in records() if r["message"].startswith("ready"))
        assert ready["address"] == server.url and ready["model"] == "tiny-ck"
        r = httpx.post(server.url + "/v1/completions", json={"prompt": [1, 2], "max_tokens": 3}, timeout=60)
        assert r.status_code == 200
        server.wait_line(lambda line: line.startswith("{") and json.loads(line).get("route") == "/v1/completions")
        access = next(r for r in records() if r.get("route") == "/v1/completions")
        assert {k: access[k] for k in ("method", "route", "status", "tokens")} == {
            "method": "POST", "route": "/v1/completions", "status": 200, "tokens": 3}
        assert access["duration_ms"] > 0 and access["level"] == "INFO"
    finally:
        assert server.stop() == 0, "\n".join(server.drain())
