"""Whole trace trees as a tracing backend receives them: `gptjax generate`, `gptjax serve` and `gptjax train` in
subprocesses export over real OTLP/HTTP (`--trace otlp`) to an in-process receiver (gptjax.tracing.receiver, the
stand-in for Jaeger, Tempo or a Collector), and each test checks span names, parent/child links, span links and
attributes. The served request continues the client's W3C traceparent and its spans match the CLI's."""

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from test_serve import Server

from gptjax.tracing.receiver import OtlpReceiver

pytestmark = pytest.mark.integration  # subprocesses, a server
ROOT = Path(__file__).parent.parent
CHECKPOINT = ROOT / "tests" / "fixtures" / "trained_byte_tiny"
MODEL = "text_completion gpt-2L-64d-256v"
PROMPT, MAX_TOKENS = [97, 98, 99], 9  # 9 tokens in chunks of 4: the prefill's 1, then decode chunks of 4 and 4
SAMPLING = {"temperature": 0.7, "top_p": 0.9, "seed": 1}
CLIENT_TRACE, CLIENT_SPAN = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"


def _env(receiver: OtlpReceiver, service: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "GPTJAX_", "FASTAPI_"))}
    return env | {"PYTHONPATH": str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""), "OTEL_SERVICE_NAME": service,
                  "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100"}


def _cli(receiver: OtlpReceiver, service: str, *args: str) -> None:
    subprocess.run([sys.executable, "-m", "gptjax.cli", *args, "--trace", "otlp"], env=_env(receiver, service),
                   check=True, capture_output=True, timeout=300)


def _trace(spans: list, trace_id: str) -> list:
    return [s for s in spans if s["trace_id"] == trace_id]


def _children(spans: list, parent: dict) -> list:
    return sorted((s for s in spans if s["parent_id"] == parent["span_id"]), key=lambda s: s["start_ns"])


def _ancestors(spans: list, span: dict) -> list[str]:
    """The names from span's parent up to the root of what was received, then the id the root's parent has."""
    by_id, chain = {s["span_id"]: s for s in spans}, []
    while span["parent_id"] in by_id:
        span = by_id[span["parent_id"]]
        chain.append(span["name"])
    return chain + [span["parent_id"]]


@pytest.fixture(scope="module")
def receiver():
    with OtlpReceiver() as r:
        yield r


@pytest.fixture(scope="module")
def generated(receiver):
    """The spans of `gptjax generate` for PROMPT with SAMPLING."""
    _cli(receiver, "gptjax-generate", "generate", "--checkpoint", str(CHECKPOINT), "--tokens",
         ",".join(map(str, PROMPT)), "--max-new-tokens", str(MAX_TOKENS), "--temperature", "0.7", "--top-p", "0.9",
         "--seed", "1", "--chunk-size", "4")
    return [s for s in receiver.spans if s["resource"]["service.name"] == "gptjax-generate"]


def _check_completion_tree(spans: list, root: dict) -> list:
    """The tree under a text_completion span: a prefill and two decode chunks with their token events, each
    saying whether it compiled, at sequence lengths 3, 4, 8; the GenAI attributes on the root. Its children."""
    children = _children(spans, root)
    assert [c["name"] for c in children] == ["gptjax.prefill", "gptjax.decode", "gptjax.decode"]
    assert [c["attributes"]["gptjax.seq_len"] for c in children] == [3, 4, 8]  # tokens in the sequence, no padding
    assert [len(c["events"]) for c in children] == [0, 4, 4]
    assert [e["attributes"]["gptjax.position"] for e in children[1]["events"]] == [4, 5, 6, 7]
    assert all(isinstance(c["attributes"]["gptjax.compiled"], bool) for c in children)
    a = root["attributes"]
    assert a["gen_ai.operation.name"] == "text_completion" and a["gen_ai.request.model"] == "gpt-2L-64d-256v"
    assert a["gen_ai.request.temperature"] == pytest.approx(0.7) and a["gen_ai.request.top_p"] == pytest.approx(0.9)
    assert a["gen_ai.request.seed"] == 1 and a["gen_ai.request.max_tokens"] == MAX_TOKENS
    assert a["gen_ai.usage.input_tokens"] == 3 and a["gen_ai.usage.output_tokens"] == MAX_TOKENS
    assert a["gen_ai.response.finish_reasons"] == ("length",) and a["gptjax.purpose"] == "request"
    return children


def test_generate_trace_tree(generated):
    root, = [s for s in generated if s["parent_id"] is None]
    assert root["name"] == MODEL and len(generated) == 4
    _check_completion_tree(generated, root)


@pytest.fixture(scope="module")
def served(receiver, tmp_path_factory):
    """A `gptjax serve` exporting to the receiver; the spans of one completion sent with a traceparent (and of
    /health and /metrics calls around it), and the server's /metrics text after it."""
    log = tmp_path_factory.mktemp("traces") / "serve.log"
    server = Server(lambda port: ["-m", "gptjax.cli", "serve", "--checkpoint", str(CHECKPOINT), "--port", str(port),
                                  "--trace", "otlp"], _env(receiver, "gptjax-serve"), log)
    try:
        for path in ("/health", "/metrics", "/health"):
            assert httpx.get(server.url + path).status_code == 200
        r = server.post({"prompt": PROMPT, "max_tokens": MAX_TOKENS} | SAMPLING,
                        {"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"})
        assert r.status_code == 200, r.text
        receiver.wait_for(lambda spans: any(s["name"] == "gptjax.serve.batch" for s in spans), 60)
        metrics = httpx.get(server.url + "/metrics").text
    finally:
        assert server.stop() == 0, log.read_text()
    return [s for s in receiver.spans if s["resource"]["service.name"] == "gptjax-serve"], metrics, r.json()


def test_serve_continues_the_clients_trace_with_the_clis_spans(served, generated):
    spans, _, body = served
    request = _trace(spans, CLIENT_TRACE)
    root, = [s for s in request if s["name"] == MODEL]
    children = _check_completion_tree(request, root)
    chain = _ancestors(request, root)
    assert chain[0] == "gptjax.serve.batch" and chain[-1] == CLIENT_SPAN  # the client's span is the root's parent
    server_span = next(s for s in request if s["name"] == chain[-2])
    assert chain[-2] == "POST /v1/completions" and server_span["attributes"]["http.response.status_code"] == 200
    cli_root = next(s for s in generated if s["parent_id"] is None)
    cli_children = _children(generated, cli_root)
    assert root["attributes"] == cli_root["attributes"] | {"gptjax.continuous": True}  # the same GenAI attributes
    for mine, cli in zip(children, cli_children):
        assert set(mine["attributes"]) == set(cli["attributes"]), mine["name"]
        assert mine["attributes"]["gptjax.seq_len"] == cli["attributes"]["gptjax.seq_len"]
    assert body["usage"]["completion_tokens"] == root["attributes"]["gen_ai.usage.output_tokens"]


def test_probes_are_not_traced_and_warmup_is_its_own_trace_counted_apart(served):
    spans, metrics, _ = served
    assert not [s for s in spans if s["attributes"].get("url.path") in ("/health", "/metrics")
                or s["name"].startswith(("GET /health", "GET /metrics"))]
    traces = {s["trace_id"] for s in spans}
    assert traces - {CLIENT_TRACE}, "the warm-up's trace"
    for trace_id in traces - {CLIENT_TRACE}:  # only the warm-up's: a root text_completion, every span purpose=warmup
        warmup = _trace(spans, trace_id)
        root, = [s for s in warmup if s["parent_id"] is None]
        assert root["name"] == MODEL
        assert {s["attributes"]["gptjax.purpose"] for s in warmup} == {"warmup"}
    lines = dict(line.rsplit(" ", 1) for line in metrics.splitlines() if line and not line.startswith("#"))
    assert float(lines['gptjax_requests_total{outcome="ok"}']) == 1  # the one completion; warm-up is no request
    assert float(lines['gptjax_generated_tokens_total{backend="jax"}']) == MAX_TOKENS
    assert any(k.startswith("gptjax_compiles_total{") and 'purpose="warmup"' in k for k in lines)


def test_train_trace_tree(receiver, tmp_path):
    (tmp_path / "data.txt").write_text("def f(x):\n    return x + 1\n" * 300)
    _cli(receiver, "gptjax-train", "train", "--preset", "tiny", "--data", str(tmp_path / "data.txt"), "--out",
         str(tmp_path / "run"), "--max-steps", "6", "--no-progress", "batch_size=2", "seq_len=32", "log_every=3",
         "eval_every=3", "checkpoint_every=6", "warmup_steps=1")
    spans = receiver.wait_for(lambda got: any(s["name"] == "gptjax.train" for s in got), 60)
    spans = [s for s in spans if s["resource"]["service.name"] == "gptjax-train"]
    run, = [s for s in spans if s["name"] == "gptjax.train"]
    assert _trace(spans, run["trace_id"]) == [run] and run["attributes"]["gptjax.train.steps"] == 6
    intervals = sorted((s for s in spans if s["name"] == "gptjax.train_interval"), key=lambda s: s["start_ns"])
    assert len(intervals) == 2 and len({s["trace_id"] for s in spans}) == 3
    for first, interval in zip((1, 4), intervals):
        assert interval["parent_id"] is None and interval["links"] == [{"trace_id": run["trace_id"],
                                                                        "span_id": run["span_id"]}]
        assert (interval["attributes"]["gptjax.train.first_step"], interval["attributes"]["gptjax.train.last_step"]
                ) == (first, first + 2)
        tree = _trace(spans, interval["trace_id"])
        children = _children(tree, interval)
        assert [(c["name"], c["attributes"]["gptjax.step"]) for c in children if "gptjax.step" in c["attributes"]
                ] == [("gptjax.train_step", first), ("gptjax.train_step", first + 1),
                      ("gptjax.train_step", first + 2), ("gptjax.eval", first + 2)]
        sample, = [c for c in children if c["name"].startswith("text_completion")]  # the evaluation's sample
        assert _children(tree, sample)[0]["name"] == "gptjax.prefill"
        assert len(tree) == 1 + 4 + len([s for s in tree if s["parent_id"] == sample["span_id"]]) + 1
    assert json.dumps(run["attributes"])  # plain values all the way
