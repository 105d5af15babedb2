"""Issue 15's bounded soak: a real `gptjax serve` on 127.0.0.1 under normal requests with fixed seeds, abusive ones
(bad and duplicate-key JSON, huge max_tokens, made-up methods and paths, oversize bodies, idle sockets) and clients
hanging up mid-upload and mid-stream, all at once. Every normal request must get exactly its seeded tokens, /metrics
must not grow with the abuse, and its request counts must equal the client's own tally."""

import contextlib
import http.client
import itertools
import json
import socket
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from test_serve_hardening import PipedServer

from gptjax import init_params, save_checkpoint
from gptjax.backends import get_backend
from gptjax.config import get_preset
from gptjax.sampling import SamplingParams

CONFIG = get_preset("tiny")  # 256 tokens (bytes), context 64
PARAMS = {k: v + np.random.default_rng(5).normal(0, 0.3, v.shape).astype(np.float32)
          for k, v in init_params(CONFIG, 5).items()}  # perturbed: sampled tokens depend on the seed
ROUNDS = 4  # rounds per half: /metrics is measured after ROUNDS and after 2 * ROUNDS
NEW_TOKENS = 6  # per normal request
CAP = 48  # --max-tokens-cap: a hung-up stream asks for this many, so the client leaves while tokens still come
BODY_LIMIT = 4096  # --max-body-bytes
HEADER_TIMEOUT = 2.0  # --header-timeout: the idle sockets of each round are closed after this
WAIT_S = 60.0  # bound on every wait for the server
CLIENTS = 8
COMPLETIONS = "/v1/completions"


class SoakServer(PipedServer):
    """test_serve_hardening's piped `gptjax serve`, and its /metrics."""

    def scrape(self) -> str:
        return httpx.get(self.url + "/metrics", timeout=WAIT_S).text


def _requests_total(text: str) -> Counter:
    """gptjax_http_requests_total as (method, route, status) → count, without /metrics' own scrapes (a scrape is
    counted after its answer is sent, so the next one may or may not see it)."""
    counts: Counter = Counter()
    for line in text.splitlines():
        if line.startswith("gptjax_http_requests_total{"):
            labels, value = line.rsplit(" ", 1)
            fields = dict(item.split("=", 1) for item in labels[labels.index("{") + 1:-1].split(","))
            key = tuple(fields[k].strip('"') for k in ("method", "route", "status"))
            if key[1] != "/metrics":
                counts[key] = int(float(value))
    return counts


def _sample(text: str, name: str) -> float:
    return next(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " "))


def _series(text: str) -> list[str]:
    """Every sample's name and labels (the exposition without its values, which only grow in digits)."""
    return [line.rsplit(" ", 1)[0] for line in text.splitlines() if line and not line.startswith("#")]


class Soak:
    """The client: one round of every kind of request, run concurrently, each returning the (method, route,
    status) the server should count for it; the normal ones also check their tokens."""

    def __init__(self, server: SoakServer, expected: dict[tuple[tuple[int, ...], int], list[int]]) -> None:
        self.server, self.expected = server, expected
        self.idle: list[socket.socket] = []  # sockets that never send a request: the header timeout closes them
        self.lock = threading.Lock()

    def round(self, r: int, pool: ThreadPoolExecutor) -> Counter:
        calls = [(self.completion, r), (self.stream, r), (self.post, b'{"prompt": [1, 2', 400),
                 (self.post, b'{"prompt": [1], "max_tokens": 2, "max_tokens": 3}', 400),
                 (self.post, json.dumps({"prompt": [1], "max_tokens": 10**15}).encode(), 400),
                 (self.post, json.dumps({"prompt": [1], "pad": "x" * BODY_LIMIT}).encode(), 413),
                 (self.made_up_method, r), (self.made_up_path, r), (self.hang_up_mid_upload,),
                 (self.hang_up_mid_stream, r), (self.open_idle,)]
        labels = [f.result() for f in [pool.submit(*call) for call in calls]]
        return Counter(label for label in labels if label is not None)

    def completion(self, r: int) -> tuple[str, str, str]:
        prompt, seed = prompt_of(r), r
        body = {"prompt": list(prompt), "max_tokens": NEW_TOKENS, "seed": seed, "temperature": 1.0}
        answer = httpx.post(self.server.url + COMPLETIONS, json=body, timeout=WAIT_S)
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["token_ids"] == self.expected[prompt, seed], (prompt, seed)
        return "POST", COMPLETIONS, "200"

    def stream(self, r: int) -> tuple[str, str, str]:
        prompt, seed = prompt_of(r + 1000), r + 1000
        body = {"prompt": list(prompt), "max_tokens": NEW_TOKENS, "seed": seed, "temperature": 1.0, "stream": True}
        answer = httpx.post(self.server.url + COMPLETIONS, json=body, timeout=WAIT_S)
        assert answer.status_code == 200, answer.text
        events = [e[len("data: "):] for e in answer.text.split("\n\n") if e]
        assert events[-1] == "[DONE]", events
        tokens = [t for e in events[:-1] for t in json.loads(e)["choices"][0]["token_ids"]]
        assert tokens == self.expected[prompt, seed], (prompt, seed)
        return "POST", COMPLETIONS, "200"

    def post(self, content: bytes, status: int) -> tuple[str, str, str]:
        answer = httpx.post(self.server.url + COMPLETIONS, content=content, timeout=WAIT_S,
                            headers={"Content-Type": "application/json"})
        assert answer.status_code == status, (content[:80], answer.status_code, answer.text)
        return "POST", COMPLETIONS, str(status)

    def made_up_method(self, r: int) -> tuple[str, str, str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=WAIT_S)
        try:
            conn.request(f"BREW{r}", COMPLETIONS)
            assert conn.getresponse().status == 405
        finally:
            conn.close()
        return "other", COMPLETIONS, "405"

    def made_up_path(self, r: int) -> tuple[str, str, str]:
        assert httpx.get(f"{self.server.url}/made/up/{r}", timeout=WAIT_S).status_code == 404
        return "GET", "other", "404"

    def hang_up_mid_upload(self) -> tuple[str, str, str]:
        with socket.create_connection(("127.0.0.1", self.server.port), timeout=WAIT_S) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 1000\r\n\r\n" + b'{"prompt":')
        return "POST", COMPLETIONS, "499"  # nginx's "client closed request": not a server error

    def hang_up_mid_stream(self, r: int) -> tuple[str, str, str]:
        body = json.dumps({"prompt": [r % 250 + 1], "max_tokens": CAP, "seed": r, "stream": True}).encode()
        with socket.create_connection(("127.0.0.1", self.server.port), timeout=WAIT_S) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n" % len(body) + body)
            received = b""
            while b"data: " not in received:  # the first event: the 200 is sent, tokens are coming
                chunk = s.recv(4096)
                assert chunk, received
                received += chunk
        assert received.startswith(b"HTTP/1.1 200 "), received[:200]
        return "POST", COMPLETIONS, "200"  # its status went out before the client left

    def open_idle(self) -> None:
        s = socket.create_connection(("127.0.0.1", self.server.port), timeout=HEADER_TIMEOUT + WAIT_S)
        with self.lock:
            self.idle.append(s)


def prompt_of(r: int) -> tuple[int, ...]:
    return (r % 250 + 1, 7, (3 * r) % 256)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("soak") / "tiny-ck"
    save_checkpoint(CONFIG, PARAMS, path)
    return path


@pytest.mark.integration
def test_soak_answers_seeded_tokens_and_metrics_stay_bounded_and_exact(checkpoint):
    start = time.monotonic()
    backend = get_backend("jax", CONFIG)
    seeds = [(prompt_of(r), r) for r in range(2 * ROUNDS)]
    seeds += [(prompt_of(r + 1000), r + 1000) for r in range(2 * ROUNDS)]
    expected = {(p, s): backend.generate(PARAMS, [list(p)], NEW_TOKENS,
                                         sampling=SamplingParams(seed=s)).tokens[0] for p, s in seeds}
    computed = time.monotonic()
    server = SoakServer(checkpoint, "--max-tokens-cap", str(CAP), "--max-body-bytes", str(BODY_LIMIT),
                         "--header-timeout", str(HEADER_TIMEOUT))
    ready = time.monotonic()
    try:
        soak = Soak(server, expected)
        baseline = server.scrape()
        tally: Counter = Counter()
        sizes = []
        with ThreadPoolExecutor(CLIENTS) as pool:
            for half in range(2):
                for r in range(half * ROUNDS, (half + 1) * ROUNDS):
                    tally += soak.round(r, pool)
                text = server.scrape()
                sizes.append((len(text.encode()), _series(text), len(_requests_total(text))))
        for s in soak.idle:  # closed by the server for sending no request in time (recv b"": closed, no answer)
            assert s.recv(1) == b""
            s.close()

        deadline = time.monotonic() + WAIT_S  # the server counts a request after answering it: wait for the last
        while True:
            text = server.scrape()
            counted = _requests_total(text) - _requests_total(baseline)
            if sum(counted.values()) >= sum(tally.values()) or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        assert dict(counted) == dict(tally)
        timeouts = _sample(text, "gptjax_http_header_timeouts_total") - _sample(baseline,
                                                                             "gptjax_http_header_timeouts_total")
        assert timeouts == len(soak.idle) == 2 * ROUNDS
        (bytes_n, series_n, labels_n), (bytes_2n, series_2n, labels_2n) = sizes
        assert series_2n == series_n and labels_2n == labels_n  # twice the abuse, not one series more
        assert max(bytes_n, bytes_2n) < 32_000  # about 14 KB here: values may gain digits, nothing else grows
        cancelled = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                        if line.startswith('gptjax_serve_cancelled_total{reason="disconnect"}'))
        print(f"\nsoak: {sum(tally.values())} requests {dict(sorted(tally.items()))}; {len(soak.idle)} idle sockets "
              f"closed; /metrics {bytes_n} B / {len(series_n)} series after {ROUNDS} rounds, {bytes_2n} B / "
              f"{len(series_2n)} after {2 * ROUNDS}; {cancelled:.0f} generations cancelled on disconnect; expected tokens "
              f"{computed - start:.1f} s, server start {ready - computed:.1f} s, soak {time.monotonic() - ready:.1f} s")
    finally:
        assert server.stop() == 0, "\n".join(server.drain())
    logged = server.drain()
    assert not [line for line in logged if "Traceback" in line], logged


# ---- issue 31: normal, abusive, shape-cycling and disconnecting clients together, for about a minute ----------
SOAK_S = 60.0  # how long the clients run
RSS_GROWTH = 64 << 20  # bound on the server's RSS growth from after warm-up to after the soak (+11 MiB here)
P99_S = 2.0  # bound on the normal clients' p99 latency, 8 tokens (0.31 s here, p50 0.08 s, machine load 13)
NORMAL = [((r % 200 + 30, 9, r % 7), r) for r in range(6)]  # (prompt, seed): 3 tokens, 8 new, fixed answers


def _rss(pid: int) -> int:
    """Resident set size of a process in bytes (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class Mix:
    """The clients of the issue-31 soak, each kind from its own loopback address (so from its own share of the
    queue, --max-queued-per-client); each runs until `end`, counting what it got."""

    def __init__(self, server: SoakServer, expected: dict, end: float) -> None:
        self.server, self.expected, self.end = server, expected, end
        self.latencies: list[float] = []
        self.tally: Counter = Counter()
        self.lock = threading.Lock()

    def client(self, kind: str, timeout: float = WAIT_S) -> httpx.Client:
        address = {"normal": "127.0.0.2", "shapes": "127.0.0.3", "abusive": "127.0.0.4", "disconnecting": "127.0.0.5"}
        return httpx.Client(base_url=self.server.url, timeout=timeout,
                            transport=httpx.HTTPTransport(local_address=address[kind]))

    def count(self, kind: str, status: int) -> None:
        with self.lock:
            self.tally[kind, status] += 1

    def normal(self, worker: int) -> None:
        """Fixed-seed requests, JSON and streamed in turn: each must be exactly its solo answer."""
        i = worker
        with self.client("normal") as client:
            while time.monotonic() < self.end:
                (prompt, seed), stream = NORMAL[i % len(NORMAL)], bool(i % 2)
                start = time.monotonic()
                answer = client.post(COMPLETIONS, json={"prompt": list(prompt), "max_tokens": 8, "seed": seed,
                                                        "stream": stream})
                assert answer.status_code == 200, answer.text
                if stream:
                    events = [json.loads(e[6:]) for e in answer.text.split("\n\n") if e and e != "data: [DONE]"]
                    tokens = [t for e in events for t in e["choices"][0]["token_ids"]]
                else:
                    tokens = answer.json()["choices"][0]["token_ids"]
                with self.lock:
                    self.latencies.append(time.monotonic() - start)
                assert tokens == self.expected[prompt, seed], (prompt, seed, stream)
                self.count("normal", 200)
                i += 2

    def shapes(self, worker: int) -> None:
        """Prompt length x max_tokens x n x sampling mode x logprobs x stream x stop, cycling."""
        rng = np.random.default_rng(worker)
        modes = [{}, {"temperature": 0}, {"top_k": 5, "top_p": 0.8}, {"presence_penalty": 1.0, "logit_bias": {"9": 3}},
                 {"logprobs": 2, "echo": True}, {"stop": ["e", 10]}]
        with self.client("shapes") as client:
            for i in itertools.count():
                if time.monotonic() >= self.end:
                    return
                n = int(rng.integers(1, 60))
                body = {"prompt": [int(t) for t in rng.integers(1, 256, n)], "n": int(rng.integers(1, 4)), "seed": i,
                        "max_tokens": int(rng.integers(1, min(CAP, 64 - n) + 1)), "stream": bool(i % 2)}
                answer = client.post(COMPLETIONS, json=body | modes[i % 6])
                assert answer.status_code == 200, answer.text
                self.count("shapes", 200)

    def abusive(self, worker: int) -> None:
        """Malformed, oversized and out-of-range bodies, and bursts of 24 requests of 2 completions at once (its
        share of the queue holds 3 of them)."""
        bad = [(b'{"prompt": [1, 2', 400), (json.dumps({"prompt": [1], "pad": "x" * BODY_LIMIT}).encode(), 413),
               (json.dumps({"prompt": [1], "max_tokens": 10**9}).encode(), 400), (b'{"prompt": "\\ud800"}', 400),
               (json.dumps({"prompt": [1], "logit_bias": {"65": 1, "065": 2}}).encode(), 400)]
        flood = {"prompt": [7] * 40, "max_tokens": 20, "n": 2}
        with self.client("abusive") as client, ThreadPoolExecutor(24) as burst:
            while time.monotonic() < self.end:
                for content, status in bad:
                    r = client.post(COMPLETIONS, content=content, headers={"Content-Type": "application/json"})
                    assert r.status_code == status, (content[:60], r.text)
                    self.count("abusive", status)
                for status in burst.map(lambda k: client.post(COMPLETIONS, json=flood).status_code, range(24)):
                    assert status in (200, 429)
                    self.count("flood", status)

    def disconnecting(self, worker: int) -> None:
        """Streams hung up after their first event, and JSON requests given up after 0.2 s."""
        with self.client("disconnecting") as client, self.client("disconnecting", timeout=0.2) as impatient:
            for i in itertools.count():
                if time.monotonic() >= self.end:
                    return
                if i % 2:
                    with client.stream("POST", COMPLETIONS, json={"prompt": [i % 250 + 1], "max_tokens": CAP,
                                                                  "stream": True}) as r:
                        next(r.iter_lines())
                    self.count("hung up", 200)
                else:
                    with contextlib.suppress(httpx.TimeoutException):
                        impatient.post(COMPLETIONS, json={"prompt": [5], "max_tokens": CAP})
                    self.count("gave up", 0)


@pytest.mark.slow
@pytest.mark.integration
def test_a_minute_of_mixed_clients_keeps_answers_memory_latency_and_compiles_bounded(checkpoint):
    backend = get_backend("jax", CONFIG)
    expected = {(p, s): backend.generate(PARAMS, [list(p)], 8, sampling=SamplingParams(seed=s)).tokens[0]
                for p, s in NORMAL}
    server = SoakServer(checkpoint, "--max-tokens-cap", str(CAP), "--max-body-bytes", str(BODY_LIMIT),
                        "--max-queue", "16", "--max-queued-per-client", "6")  # and the default --warmup full
    try:
        warm = _rss(server.proc.pid)
        mix = Mix(server, expected, time.monotonic() + SOAK_S)
        clients = [mix.normal] * 2 + [mix.shapes] * 2 + [mix.abusive, mix.disconnecting]
        with ThreadPoolExecutor(len(clients)) as pool:
            for future in [pool.submit(client, w) for w, client in enumerate(clients)]:
                future.result()
        deadline = time.monotonic() + WAIT_S  # the last cancelled jobs leave within a disconnect check
        while _sample(server.scrape(), "gptjax_serve_queue_depth") != 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        text, after = server.scrape(), _rss(server.proc.pid)
        assert _sample(text, "gptjax_serve_queue_depth") == 0
        assert 'purpose="request"' not in text  # not one compilation on a request after the warm-up
        latencies = sorted(mix.latencies)
        p50, p99 = latencies[len(latencies) // 2], latencies[int(0.99 * (len(latencies) - 1))]
        programs = _sample(text, 'gptjax_compiled_programs{backend="jax"}')
        print(f"\nsoak (issue 31): {dict(sorted(mix.tally.items()))}; normal p50 {p50:.2f} s, p99 {p99:.2f} s over "
              f"{len(latencies)}; RSS after warm-up {warm / 2**20:.0f} MiB, after the soak {after / 2**20:.0f} MiB; "
              f"{programs:.0f} programs")
        assert mix.tally["normal", 200] >= 20 and mix.tally["shapes", 200] >= 20 and mix.tally["flood", 429] > 0
        assert p99 < P99_S and after - warm < RSS_GROWTH
    finally:
        assert server.stop() == 0, "\n".join(server.drain())
    logged = server.drain()
    assert not [line for line in logged if "Traceback" in line], logged
