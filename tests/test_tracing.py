"""OpenTelemetry spans in process: the exact tree for generate/forward/train, errors, exporters, JSON logs, OTLP
(whole trees received over OTLP from the CLI and the server: tests/test_traces.py)."""

import json
import os
import subprocess
import sys

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from gptjax import GPTConfig, get_backend, init_params, save_checkpoint
from gptjax.sampling import SamplingParams

CONFIG = GPTConfig(vocab_size=97, n_positions=32, n_layer=2, n_head=2, n_embd=16)
PARAMS = init_params(CONFIG, 1)


@pytest.fixture(scope="module")
def spans():
    """An in-memory exporter behind the global tracer provider (set once per process, as OTel allows)."""
    exporter = InMemorySpanExporter()
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter


def _by_name(finished):
    out = {}
    for s in finished:
        out.setdefault(s.name, []).append(s)
    return out


def test_warmup_calls_are_traced_as_warmup_and_requests_as_requests(spans):
    spans.clear()
    backend = get_backend("numpy", CONFIG)
    with backend.observer.warmup():
        backend.generate(PARAMS, [[1, 2]], 2, sampling=SamplingParams(greedy=True))
    backend.generate(PARAMS, [[1, 2]], 2, sampling=SamplingParams(greedy=True))
    finished = spans.get_finished_spans()
    roots = [s for s in finished if s.parent is None]
    assert [r.attributes["gptjax.purpose"] for r in roots] == ["warmup", "request"]
    for root in roots:  # every span of a call says the call's purpose
        assert {s.attributes["gptjax.purpose"] for s in finished if s.context.trace_id == root.context.trace_id} == {
            root.attributes["gptjax.purpose"]}


@pytest.mark.parametrize("name", ["numpy", "jax"])
def test_generate_span_tree(spans, name):
    spans.clear()
    backend = get_backend(name, CONFIG)
    chunks = list(backend.stream(PARAMS, [[1, 2, 3], [4]], 9, chunk_size=3,
                                 sampling=SamplingParams(temperature=0.7, top_p=0.9, seed=1)))
    got = _by_name(spans.get_finished_spans())
    parent, = got["text_completion gpt-2L-16d-97v"]
    prefill, = got["gptjax.prefill"]
    decode = got["gptjax.decode"]
    assert len(decode) == len(chunks) - 1 == 3  # 8 decode steps in chunks of 3
    for child in [prefill, *decode]:
        assert child.parent.span_id == parent.context.span_id and child.context.trace_id == parent.context.trace_id
        assert child.attributes["gptjax.synced"] is True and child.attributes["gptjax.backend"] == name
    assert prefill.attributes["gptjax.phase"] == "prefill" and prefill.attributes["gptjax.seq_len"] == 3
    assert {d.attributes["gptjax.phase"] for d in decode} == {"decode"}
    assert sum(len(d.events) for d in decode) == 8 and decode[0].events[0].name == "gptjax.token"
    a = parent.attributes
    assert a["gen_ai.operation.name"] == "text_completion" and a["gen_ai.request.max_tokens"] == 9
    assert a["gen_ai.request.temperature"] == pytest.approx(0.7) and a["gen_ai.request.top_p"] == pytest.approx(0.9)
    assert a["gen_ai.usage.input_tokens"] == 4 and a["gen_ai.usage.output_tokens"] == 18
    assert tuple(a["gen_ai.response.finish_reasons"]) == ("length", "length")
    assert a["gptjax.batch_size"] == 2 and "gptjax.devices" in a and "gptjax.mesh" in a
    assert parent.start_time <= prefill.start_time and decode[-1].end_time <= parent.end_time


def test_forward_spans_say_when_they_compiled(spans):
    spans.clear()
    backend = get_backend("jax", CONFIG.replace(n_positions=31))  # a shape no other test compiled
    backend.forward(PARAMS | {"wpe.weight": PARAMS["wpe.weight"][:31]}, [[1, 2, 3]])
    backend.forward(PARAMS | {"wpe.weight": PARAMS["wpe.weight"][:31]}, [[4, 5, 6]])
    first, second = spans.get_finished_spans()
    assert first.name == second.name == "gptjax.forward" and first.attributes["gptjax.phase"] == "prefill"
    assert first.attributes["gptjax.compiled"] is True and second.attributes["gptjax.compiled"] is False


def test_a_failing_generate_marks_its_span(spans, failing_generate):
    spans.clear()
    backend = get_backend("numpy", CONFIG)
    failing_generate(backend, PARAMS, MemoryError("device out of memory"))
    got = _by_name(spans.get_finished_spans())
    parent = got["text_completion gpt-2L-16d-97v"][0]
    assert parent.status.status_code == trace.StatusCode.ERROR
    assert parent.attributes["error.type"] == "MemoryError"
    prefill = got["gptjax.prefill"][0]
    assert prefill.status.status_code == trace.StatusCode.ERROR and prefill.events[0].name == "exception"


def _train(tmp_path, **settings):
    from gptjax.train import TrainConfig, TrainOptions, train

    (tmp_path / "c.txt").write_text("def f(x):\n    return x + 1\n" * 200)
    tc = TrainConfig(batch_size=2, seq_len=32, warmup_steps=1, **settings)
    train(CONFIG, tc, tmp_path / "run", TrainOptions(data_spec=str(tmp_path / "c.txt"), progress=False,
                                                     peak_flops=1e11))


def test_train_traces_one_per_logging_interval(spans, tmp_path):
    spans.clear()
    _train(tmp_path, max_steps=6, log_every=2, eval_every=2, checkpoint_every=6)
    finished = spans.get_finished_spans()
    got = _by_name(finished)
    run, = got["gptjax.train"]
    assert [s for s in finished if s.context.trace_id == run.context.trace_id] == [run]  # the run's own trace
    assert run.attributes["gptjax.train.steps"] == 6 and run.attributes["gptjax.train.log_every"] == 2
    intervals = got["gptjax.train_interval"]
    assert [(i.attributes["gptjax.train.first_step"], i.attributes["gptjax.train.last_step"]) for i in intervals] == [
        (1, 2), (3, 4), (5, 6)]
    for first, interval in zip((1, 3, 5), intervals):
        assert interval.parent is None and [link.context.span_id for link in interval.links] == [run.context.span_id]
        assert interval.attributes["gptjax.train.loss"] > 0  # the interval's logged scalars
        tree = [s for s in finished if s.context.trace_id == interval.context.trace_id]
        steps, evals = [s for s in tree if s.name == "gptjax.train_step"], [s for s in tree if s.name == "gptjax.eval"]
        assert [s.attributes["gptjax.step"] for s in steps] == [first, first + 1]
        assert [s.attributes["gptjax.step"] for s in evals] == [first + 1]
        assert all(s.parent.span_id == interval.context.span_id for s in steps + evals)
        assert {s.attributes["gptjax.phase"] for s in steps} == {"train"} and evals[0].attributes["gptjax.phase"] == "eval"
        sample = [s for s in tree if s.name.startswith("text_completion")]  # the evaluation's sample
        assert len(sample) == 1 and sample[0].parent.span_id == interval.context.span_id
    steps = got["gptjax.train_step"]
    assert steps[0].attributes["gptjax.compiled"] is True and steps[1].attributes["gptjax.compiled"] is False


def test_a_long_training_run_is_many_small_traces_not_one_growing_trace(spans, tmp_path):
    spans.clear()
    _train(tmp_path, max_steps=40, log_every=5, eval_every=1000, checkpoint_every=1000)
    per_trace = {}
    for s in spans.get_finished_spans():
        per_trace.setdefault(s.context.trace_id, []).append(s.name)
    assert len(per_trace) == 1 + 40 // 5  # the run's, and one per logging interval
    sizes = sorted(len(names) for names in per_trace.values())
    # an interval: its span and 5 steps; the last one also the final evaluation and its sample (3 spans)
    assert sizes == [1] + [6] * 7 + [6 + 1 + 3], sizes


@pytest.mark.integration
def test_no_sdk_is_imported_and_no_span_recorded_when_tracing_is_off():
    code = ("import sys, gptjax\n"
            "c = gptjax.GPTConfig(vocab_size=97, n_positions=32, n_layer=1, n_head=2, n_embd=16)\n"
            "b = gptjax.get_backend('jax', c)\n"
            "b.generate(gptjax.init_params(c), [[1, 2]], 3)\n"
            "from opentelemetry import trace\n"
            "assert not trace.get_current_span().is_recording()\n"
            "print(sorted(m for m in sys.modules if m.startswith('opentelemetry.sdk')))\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert out.strip() == "[]"


@pytest.mark.integration
def test_cli_jsonl_trace_and_json_logs(tmp_path):
    save_checkpoint(CONFIG, PARAMS, tmp_path / "ck")
    trace_file = tmp_path / "spans.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    subprocess.run([sys.executable, "-m", "gptjax.cli", "generate", "--checkpoint", str(tmp_path / "ck"),
                    "--tokens", "1,2,3", "--max-new-tokens", "5", "--chunk-size", "2", "--trace", str(trace_file)],
                   check=True, capture_output=True, env=env)
    spans = [json.loads(line) for line in trace_file.read_text().splitlines()]
    names = [s["name"] for s in spans]
    assert names.count("gptjax.prefill") == 1 and names.count("gptjax.decode") == 2
    parent = next(s for s in spans if s["name"].startswith("text_completion"))
    assert all(s["parent_id"] == parent["span_id"] for s in spans if s is not parent)
    assert parent["resource"]["service.name"] == "gptjax"


def test_json_log_records_carry_the_trace_ids(spans, capsys):
    import logging

    from gptjax.tracing import forward_span, install_json_logs

    handler = install_json_logs()
    try:
        with forward_span("gptjax.test", {}) as span:
            logging.getLogger("gptjax.test").info("inside")
        record = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
        ctx = span.span.get_span_context()
        assert ctx.is_valid  # the SDK provider of the `spans` fixture records
        assert record["trace_id"] == f"{ctx.trace_id:032x}" and record["span_id"] == f"{ctx.span_id:016x}"
        assert record["message"] == "inside" and record["level"] == "INFO"
    finally:
        logging.getLogger("gptjax").removeHandler(handler)
        logging.getLogger("gptjax").propagate = True


@pytest.mark.integration
def test_otlp_http_export_reaches_a_real_receiver(tmp_path):
    from gptjax.tracing.receiver import OtlpReceiver

    save_checkpoint(CONFIG, PARAMS, tmp_path / "ck")
    with OtlpReceiver() as receiver:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")} | {
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_SERVICE_NAME": "gptjax-test"}
        subprocess.run([sys.executable, "-m", "gptjax.cli", "generate", "--checkpoint", str(tmp_path / "ck"),
                        "--tokens", "1,2", "--max-new-tokens", "4", "--trace", "otlp"], check=True, env=env,
                       capture_output=True, timeout=120)
    assert receiver.posts and all(path == "/v1/traces" for path in receiver.posts)
    assert {s["resource"]["service.name"] for s in receiver.spans} == {"gptjax-test"}
    assert sorted(s["name"] for s in receiver.spans) == sorted(["gptjax.prefill", "gptjax.decode",
                                                                "text_completion gpt-2L-16d-97v"])


def test_unknown_exporter_is_a_clear_error(capsys):
    from gptjax import GptjaxError
    from gptjax.cli import main
    from gptjax.tracing import configure

    assert main(["info", "tiny", "--trace", "otpl"]) == 2  # a typo is not silently taken as a file name
    assert "--trace 'otpl'" in capsys.readouterr().err
    with pytest.raises(GptjaxError, match="trace exporter 'zipkin'; allowed: console, otlp, jsonl, none"):
        configure("zipkin")
    with pytest.raises(GptjaxError, match="jsonl trace exporter needs a file path"):
        configure("jsonl")


def test_span_names_appear_in_profiler_traces(tmp_path):
    import jax

    backend = get_backend("jax", CONFIG)
    backend.generate(PARAMS, [[1, 2]], 3)  # compile outside the trace
    with jax.profiler.trace(str(tmp_path)):
        backend.generate(PARAMS, [[1, 2]], 3)
    blob = b"".join(p.read_bytes() for p in tmp_path.rglob("*.xplane.pb"))
    assert b"gptjax.prefill" in blob and b"gptjax.decode" in blob


def test_standard_environment_variables(monkeypatch, tmp_path):
    from gptjax.tracing import configure

    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert configure("console") is None  # disabled wins
    monkeypatch.delenv("OTEL_SDK_DISABLED")
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    assert configure() is None
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "jsonl")
    from gptjax import GptjaxError

    with pytest.raises(GptjaxError, match="needs a file path"):
        configure()


# ---- regressions found in review ---------------------------------------------------------------------------
def test_a_stream_read_to_its_last_chunk_is_complete_not_cancelled(spans):
    from gptjax.tracing import Metrics

    spans.clear()
    m = Metrics()
    backend = get_backend("numpy", CONFIG, metrics=m)
    for chunk in backend.stream(PARAMS, [[1, 2]], 4, chunk_size=2):
        if all(chunk.finish_reasons):
            break  # stops reading without exhausting the generator
    parent = _by_name(spans.get_finished_spans())["text_completion gpt-2L-16d-97v"][0]
    assert "gptjax.cancelled" not in parent.attributes and parent.attributes["gen_ai.usage.output_tokens"] == 4
    assert m.registry.get_sample_value("gptjax_requests_total", {"outcome": "ok"}) == 1


def test_a_stream_belongs_to_the_trace_it_was_created_in(spans):
    from gptjax.tracing import forward_span

    spans.clear()
    backend = get_backend("numpy", CONFIG)
    with forward_span("app.request", {}) as outer:
        stream = backend.stream(PARAMS, [[1, 2]], 3)
    list(stream)  # read after the request span ended
    parent = _by_name(spans.get_finished_spans())["text_completion gpt-2L-16d-97v"][0]
    assert parent.parent.span_id == outer.span.get_span_context().span_id
    assert parent.start_time < outer.span.end_time


def test_configure_twice_adds_the_second_exporter(spans, tmp_path):
    from gptjax.tracing import configure

    configure("jsonl", path=str(tmp_path / "a.jsonl"))
    configure("jsonl", path=str(tmp_path / "b.jsonl"))
    get_backend("numpy", CONFIG).generate(PARAMS, [[1]], 2)
    trace.get_tracer_provider().force_flush()
    assert (tmp_path / "a.jsonl").read_text() and (tmp_path / "b.jsonl").read_text()


def test_training_logs_carry_the_interval_trace_and_the_sample_nests_under_it(spans, tmp_path, capsys):
    import logging

    from gptjax.tracing import install_json_logs
    from gptjax.train import TrainConfig, TrainOptions, train

    (tmp_path / "c.txt").write_text("def f(x):\n    return x + 1\n" * 200)
    spans.clear()
    handler = install_json_logs()
    try:
        train(CONFIG, TrainConfig(batch_size=2, seq_len=32, max_steps=1, warmup_steps=0), tmp_path / "run",
              TrainOptions(data_spec=str(tmp_path / "c.txt"), progress=False, peak_flops=1e11))
    finally:
        logging.getLogger("gptjax").removeHandler(handler)
        logging.getLogger("gptjax").propagate = True
    records = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    got = _by_name(spans.get_finished_spans())
    run, interval = got["gptjax.train"][0], got["gptjax.train_interval"][0]
    assert interval.links[0].context.span_id == run.context.span_id
    val = next(r for r in records if "val loss" in r["message"])
    assert val["trace_id"] == f"{interval.context.trace_id:032x}"
    sample = next(s for s in spans.get_finished_spans() if s.name.startswith("text_completion"))
    assert sample.context.trace_id == interval.context.trace_id


# ---- the server's spans, in process -------------------------------------------------------------------------
def test_a_session_pass_goes_under_the_oldest_request_and_links_the_others(spans):
    from gptjax.generate import GenerationRequest
    from gptjax.tracing.session import SessionSpans

    spans.clear()
    rows = SessionSpans(get_backend("numpy", CONFIG).observer)
    requests = {name: GenerationRequest([prompt], 8, SamplingParams(seed=3)) for name, prompt in
                (("a", [1, 2, 3]), ("b", [4]), ("c", [5, 6]))}
    for name in ("a", "b", "c"):
        rows.start(name, requests[name], None)
    with rows.forward_pass("decode", "decode", ["c", "b"], 5):  # a left the batch: b is the oldest live one
        pass
    rows.end("b", 4, "length")
    rows.end("c", 2)  # no reason: cancelled
    rows.close(RuntimeError("the session failed"))
    got = _by_name(spans.get_finished_spans())
    decode, = got["gptjax.decode"]
    a, b, c = sorted(got["text_completion gpt-2L-16d-97v"], key=lambda s: s.start_time)
    assert decode.parent.span_id == b.context.span_id and [k.context.span_id for k in decode.links] == [
        c.context.span_id]
    assert decode.attributes["gptjax.seq_len"] == 5 and decode.attributes["gptjax.batch_size"] == 2
    assert b.attributes["gen_ai.usage.output_tokens"] == 4 and tuple(b.attributes["gen_ai.response.finish_reasons"]
                                                                      ) == ("length",)
    assert c.attributes["gptjax.cancelled"] is True and "gen_ai.response.finish_reasons" not in c.attributes
    assert a.status.status_code == trace.StatusCode.ERROR and a.attributes["error.type"] == "RuntimeError"
    assert a.attributes["gen_ai.usage.input_tokens"] == 3 and a.attributes["gptjax.continuous"] is True


def test_a_compile_while_serving_is_on_the_span_and_counted_as_a_request_compile(spans):
    from fastapi.testclient import TestClient

    from gptjax.serve import ServedModel, ServeOptions, create_app
    from gptjax.tracing import Metrics

    config = CONFIG.replace(n_embd=20)  # programs no other test compiled
    m = Metrics()
    backend = get_backend("jax", config, metrics=m)
    model = ServedModel(backend, backend.prepare(init_params(config, 1)), None, m)

    def compiles(phase):
        return m.registry.get_sample_value("gptjax_compiles_total", {"phase": phase, "purpose": "request"}) or 0

    with TestClient(create_app(model, ServeOptions(warmup=False))) as client:
        # 6 tokens: the prefill's, a decode chunk of 4 and one of 1; the first request compiles the session's
        # prefill and decode programs, the second finds them compiled
        counts = []
        for compiled in ([True, True, False], [False, False, False]):
            spans.clear()
            r = client.post("/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 6, "seed": 0})
            assert r.status_code == 200, r.text
            passes = sorted((s for s in spans.get_finished_spans() if s.name in ("gptjax.prefill", "gptjax.decode")),
                            key=lambda s: s.start_time)
            assert [(s.name, s.attributes["gptjax.compiled"]) for s in passes] == list(zip(
                ["gptjax.prefill", "gptjax.decode", "gptjax.decode"], compiled))
            counts.append((compiles("prefill"), compiles("decode")))
        # the first request's passes compiled (a session shaped for any request opens with a few programs: its
        # prefill, cache and sampling pieces), the second compiled nothing
        assert counts[0][0] >= 1 and counts[0][1] >= 1 and counts[1] == counts[0], counts
        assert m.registry.get_sample_value("gptjax_requests_total", {"outcome": "ok"}) == 2
