"""Issue 15 point 7: a header timeout and a cap on open connections. A real `gptjax serve` on 127.0.0.1 with a
short --header-timeout and a cap of a few connections; every wait is bounded."""

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from test_serve_hardening import HERE, PipedServer

from gptjax import init_params, save_checkpoint
from gptjax.cli import serve as serve_cli
from gptjax.config import get_preset

HEADER_TIMEOUT = 3.0  # short for the test, long enough to hold the cap's sockets open while it runs
MAX_CONNECTIONS = 4
MARGIN = 10.0  # a loaded CI machine may be slow to close; the server still must close well before "never"
CAP_LINE = "connection cap hit"


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "GPTJAX_"))}
    env["PYTHONPATH"] = str(HERE.parent) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("connections") / "tiny-ck"
    save_checkpoint(get_preset("tiny"), init_params(get_preset("tiny"), 2), path)
    return path


@pytest.fixture(scope="module")
def server(checkpoint):
    s = PipedServer(checkpoint, "--no-warmup", "--header-timeout", str(HEADER_TIMEOUT), "--max-connections",
                    str(MAX_CONNECTIONS))
    yield s
    assert s.stop() == 0, "\n".join(s.drain())


def _metric(server: PipedServer, name: str) -> float:
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def _connect(server: PipedServer) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=HEADER_TIMEOUT + MARGIN)


def _get(sock: socket.socket, path: str) -> bytes:
    """A raw GET on an open socket; everything the server sends until it closes."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.integration
@pytest.mark.parametrize("sent", [b"", b"GET /health HTTP/1.1\r\nHost: x\r\n"], ids=["nothing", "half-a-header"])
def test_a_connection_without_a_complete_request_is_closed_after_the_header_timeout(server, sent):
    before = _metric(server, "gptjax_http_header_timeouts_total")
    with _connect(server) as sock:
        sock.sendall(sent)
        start = time.monotonic()
        assert sock.recv(1) == b""  # closed by the server, no answer (a socket.timeout here: never closed)
        waited = time.monotonic() - start
    assert HEADER_TIMEOUT - 0.5 <= waited <= HEADER_TIMEOUT + MARGIN
    assert _metric(server, "gptjax_http_header_timeouts_total") == before + 1


@pytest.mark.integration
def test_a_keep_alive_connection_must_send_its_next_request_in_time_too(server):
    with _connect(server) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = sock.recv(65536)
        while b"\r\n\r\n" not in answer or not answer.endswith(b"}"):  # /health's JSON body
            answer += sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 200 ")
        sock.sendall(b"GET /health HTTP/1.1\r\n")  # half the next header: uvicorn's keep-alive timer stops here
        start = time.monotonic()
        assert sock.recv(1) == b""
        waited = time.monotonic() - start
    assert HEADER_TIMEOUT - 0.5 <= waited <= HEADER_TIMEOUT + MARGIN


@pytest.mark.integration
def test_past_the_cap_requests_get_503_counted_and_logged_then_resume(server):
    before = _metric(server, "gptjax_http_connections_refused_total")
    held = [_connect(server) for _ in range(MAX_CONNECTIONS)]  # the cap, idle (the server accepts in order)
    try:
        refused = [_get(_connect(server), "/health") for _ in range(2)]
    finally:
        for sock in held:
            sock.close()
    for answer in refused:
        assert answer.startswith(b"HTTP/1.1 503 ") and b"retry-after: 1" in answer.lower(), answer
        assert b"too many connections" in answer
    deadline = time.monotonic() + MARGIN  # normal requests resume once the held sockets are closed
    while (status := httpx.get(server.url + "/health").status_code) != 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert status == 200
    assert _metric(server, "gptjax_http_connections_refused_total") == before + 2
    line = server.wait_line(lambda text: CAP_LINE in text)
    assert f"--max-connections {MAX_CONNECTIONS}" in line
    assert sum(CAP_LINE in text for text in server.drain()) == 1  # rate-limited: one line for the two


@pytest.mark.integration
def test_open_connections_are_a_gauge(server):
    with _connect(server), _connect(server):
        deadline = time.monotonic() + MARGIN
        while (n := _metric(server, "gptjax_http_connections_open")) != 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert n == 3  # the two held and the one reading /metrics


def test_the_flags_are_documented_with_production_defaults():
    parser = argparse.ArgumentParser()
    serve_cli.add_arguments(parser)
    args = parser.parse_args(["--checkpoint", "x"])
    assert (args.header_timeout, args.max_connections) == (10.0, 1024)
    text = " ".join(parser.format_help().split())
    assert "--header-timeout SECONDS" in text and "--max-connections N" in text and "503" in text


@pytest.mark.parametrize("flags, message", [(["--header-timeout", "0"], "--header-timeout 0.0 must be a finite number > 0"),
                                            (["--max-connections", "0"], "--max-connections 0 must be >= 1")])
def test_bad_connection_flags_exit_2_with_one_line(checkpoint, flags, message):
    r = subprocess.run([sys.executable, "-m", "gptjax.cli", "serve", "--checkpoint", str(checkpoint), *flags],
                       check=False, capture_output=True, text=True, env=_env(), timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == f"gptjax serve: error: {message}", r.stderr
