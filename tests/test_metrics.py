"""Prometheus metrics: exact counts, a real Prometheus server scraping gptjax, the dashboard's metric names."""

import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from gptjax import GPTConfig, GptjaxError, get_backend, init_params
from gptjax.backends import Backend
from gptjax.generate import StreamChunk
from gptjax.sampling import GREEDY, SamplingParams
from gptjax.tracing import Metrics, serve_metrics

CONFIG = GPTConfig(vocab_size=97, n_positions=32, n_layer=1, n_head=2, n_embd=16)
PARAMS = init_params(CONFIG, 2)
PARAMS_24 = init_params(GPTConfig(vocab_size=97, n_positions=32, n_layer=1, n_head=2, n_embd=24), 2)  # its own programs
DEPLOY = Path(__file__).parent.parent / "deploy"


def _value(metrics: Metrics, name: str, **labels) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


@pytest.mark.parametrize("name", ["numpy", "jax"])
def test_generate_and_forward_counts(name):
    m = Metrics()
    backend = get_backend(name, CONFIG, metrics=m)
    backend.generate(PARAMS, [[1, 2, 3], [4]], 5, sampling=GREEDY)
    list(backend.stream(PARAMS, [[5, 6]], 7, chunk_size=2, sampling=SamplingParams(stop_tokens=[])))
    backend.forward(PARAMS, [[1, 2, 3, 4]])
    assert _value(m, "gptjax_prompt_tokens_total", backend=name) == 6
    assert _value(m, "gptjax_generated_tokens_total", backend=name) == 2 * 5 + 7
    assert _value(m, "gptjax_requests_total", outcome="ok") == 2
    assert _value(m, "gptjax_time_to_first_token_seconds_count", backend=name) == 2
    assert _value(m, "gptjax_forward_seconds_count", phase="prefill", backend=name) == 3  # 2 prefills + forward
    assert _value(m, "gptjax_forward_seconds_count", phase="decode", backend=name) == 1 + 3  # 1 loop + 3 chunks
    assert _value(m, "gptjax_time_per_output_token_seconds_count", backend=name) == 4
    assert _value(m, "gptjax_tokens_per_second", phase="prefill") > 0


def test_compilations_are_counted_by_purpose_and_warmup_is_not_a_request():
    m = Metrics()
    backend = get_backend("jax", GPTConfig(vocab_size=97, n_positions=32, n_layer=1, n_head=2, n_embd=24), metrics=m)
    with backend.observer.warmup():
        backend.generate(PARAMS_24, [[1, 2, 3]], 4, sampling=GREEDY)  # compiles the prefill and the decode loop
    assert _value(m, "gptjax_requests_total", outcome="ok") == 0  # warm-up is no request
    assert _value(m, "gptjax_generated_tokens_total", backend="jax") == 0
    assert _value(m, "gptjax_compiles_total", phase="prefill", purpose="warmup") == 1
    assert _value(m, "gptjax_compiles_total", phase="decode", purpose="warmup") == 1
    held = _value(m, "gptjax_compiled_programs", backend="jax")
    assert held == backend.compile_count() >= 2
    backend.generate(PARAMS_24, [[1, 2, 3]], 4, sampling=GREEDY)  # the warmed-up shape: nothing compiles
    assert _value(m, "gptjax_compiles_total", phase="prefill", purpose="request") == 0
    backend.generate(PARAMS_24, [[1] * 20], 4, sampling=GREEDY)  # a new prompt bucket compiles on the request
    assert _value(m, "gptjax_compiles_total", phase="prefill", purpose="request") == 1
    assert _value(m, "gptjax_requests_total", outcome="ok") == 2
    assert _value(m, "gptjax_compiled_programs", backend="jax") > held


def test_mfu_and_bandwidth_gauges_against_given_peaks():
    m = Metrics(peak_flops=1e12, peak_bandwidth=1e10)
    get_backend("jax", CONFIG, metrics=m).generate(PARAMS, [[1, 2, 3]], 8, sampling=GREEDY)
    for phase in ("prefill", "decode"):
        assert 0 < _value(m, "gptjax_mfu_ratio", phase=phase) < 1
        assert 0 < _value(m, "gptjax_bandwidth_utilization_ratio", phase=phase) < 1
    assert _value(Metrics(), "gptjax_mfu_ratio", phase="decode") == 0  # unset without a peak


def test_errors_and_cancellations_are_counted(failing_generate):
    m = Metrics()
    backend = get_backend("numpy", CONFIG, metrics=m)
    stream = backend.stream(PARAMS, [[1]], 10, chunk_size=1)
    next(stream)
    stream.close()  # the client went away
    failing_generate(backend, PARAMS, MemoryError("out of memory"))
    assert _value(m, "gptjax_requests_total", outcome="cancelled") == 1
    assert _value(m, "gptjax_requests_total", outcome="error") == 1
    assert _value(m, "gptjax_errors_total", error_type="MemoryError") == 1


def test_two_models_in_one_process_keep_separate_registries():
    a, b = Metrics(), Metrics()
    get_backend("numpy", CONFIG, metrics=a).generate(PARAMS, [[1]], 2)
    assert _value(a, "gptjax_generated_tokens_total", backend="numpy") == 2
    assert _value(b, "gptjax_generated_tokens_total", backend="numpy") == 0


class EchoBackend(Backend):
    """A plug-in that knows nothing of telemetry: it repeats each prompt's last token."""

    name = "echo"

    def _convert(self, params):
        return params

    def _forward(self, weights, tokens, last_only):
        return np.zeros((*tokens.shape, self.config.vocab_size), np.float32)

    def _generate(self, weights, request, chunk_size):
        yield StreamChunk([[p[-1]] for p in request.prompts], [None] * request.batch, "prefill")
        yield StreamChunk([[p[-1]] * (request.max_new_tokens - 1) for p in request.prompts], ["length"] * request.batch)


def test_a_plugin_backend_gets_the_metrics_without_code_of_its_own():
    assert not [n for n in vars(Backend) if n.startswith("observe") or n in ("span_attributes", "model_name")]
    m = Metrics()
    backend = EchoBackend(CONFIG, metrics=m)
    assert backend.generate(PARAMS, [[1, 2], [3]], 4).tokens == [[2] * 4, [3] * 4]
    backend.forward(PARAMS, [[1, 2, 3]])
    assert _value(m, "gptjax_prompt_tokens_total", backend="echo") == 3
    assert _value(m, "gptjax_generated_tokens_total", backend="echo") == 8
    assert _value(m, "gptjax_requests_total", outcome="ok") == 1
    assert _value(m, "gptjax_time_to_first_token_seconds_count", backend="echo") == 1
    assert _value(m, "gptjax_forward_seconds_count", phase="prefill", backend="echo") == 2  # generate's + forward
    assert _value(m, "gptjax_forward_seconds_count", phase="decode", backend="echo") == 1


def test_the_moved_observability_names_warn_and_work_for_one_release():
    m = Metrics()
    backend = get_backend("numpy", CONFIG, metrics=m)
    with pytest.warns(DeprecationWarning, match=r"backend.observe_request moved in 0.2: use "
                                                r"backend.observer.report_request"):
        backend.observe_request(0.5, 2, 3, "ok")
    assert _value(m, "gptjax_requests_total", outcome="ok") == 1
    with pytest.warns(DeprecationWarning, match="backend.observer.metrics"):
        assert backend.metrics is m
    with pytest.raises(AttributeError, match="'NumpyBackend' object has no attribute 'observe_nothing'"):
        backend.observe_nothing

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_prefill_tokens_per_second_counts_prompt_tokens():
    m = Metrics()
    get_backend("numpy", CONFIG, metrics=m).generate(PARAMS, [list(range(20))], 2)
    seconds = _value(m, "gptjax_forward_seconds_sum", phase="prefill", backend="numpy")
    assert _value(m, "gptjax_tokens_per_second", phase="prefill") * seconds == pytest.approx(20, rel=1e-6)


def test_serve_metrics_over_http():
    m = Metrics()
    get_backend("numpy", CONFIG, metrics=m).generate(PARAMS, [[1, 2]], 3)
    port = _free_port()
    server = serve_metrics(port, metrics=m)
    assert server.server_address[0] == "127.0.0.1"  # loopback unless asked otherwise
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    finally:
        server.shutdown()
    assert 'gptjax_generated_tokens_total{backend="numpy"} 3.0' in body
    with pytest.raises(GptjaxError, match="port=70000"):
        serve_metrics(70000, metrics=m)


def test_dashboard_queries_only_metrics_gptjax_exports_and_series_the_rules_record():
    import yaml

    metrics = Metrics()
    assert metrics.server is not None  # the server's instruments join the registry as `gptjax serve` makes them
    names = metrics.names()
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "gptjax.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {n for e in exprs for n in re.findall(r"\bgptjax_[a-z_]+", e)}
    assert used and used <= names, f"dashboard queries unknown metrics: {sorted(used - names)}"
    rules = yaml.safe_load((DEPLOY / "rules" / "recording.yml").read_text())
    recorded = {r["record"] for g in rules["groups"] for r in g["rules"]}
    used_rules = {n for e in exprs for n in re.findall(r"\bgptjax:[a-z0-9_:]+", e)}
    assert used_rules and used_rules <= recorded, f"dashboard reads series no rule records: {used_rules - recorded}"
    rule_metrics = {n for g in rules["groups"] for r in g["rules"] for n in re.findall(r"\bgptjax_[a-z_]+", r["expr"])}
    assert rule_metrics <= names, f"rules read unknown metrics: {sorted(rule_metrics - names)}"
    expected_panels = {"Throughput: tokens/s", "Time to first token", "Time per output token", "End-to-end latency",
                       "Forward-pass latency p95 by phase", "Errors: share of completions by class", "Training MFU"}
    assert expected_panels <= {p["title"] for p in dashboard["panels"]}


NEEDS_CI_TOOL = "not installed (apt-get install prometheus; .ci/run does, and CI fails without it)"


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("prometheus") is None and not os.environ.get("CI"),
                    reason="prometheus " + NEEDS_CI_TOOL)
def test_a_real_prometheus_scrapes_gptjax(tmp_path):
    m = Metrics()
    backend = get_backend("jax", CONFIG, metrics=m)
    backend.generate(PARAMS, [[1, 2, 3], [4, 5]], 6)
    backend.generate(PARAMS, [[7]], 4)
    metrics_port, prom_port = _free_port(), _free_port()
    server = serve_metrics(metrics_port, metrics=m)
    (tmp_path / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: gptjax\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{metrics_port}']\n")
    prom = subprocess.Popen(["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{prom_port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        found = {}
        deadline = time.time() + 60
        while time.time() < deadline and len(found) < 3:
            for query in ('gptjax_generated_tokens_total{backend="jax"}', 'gptjax_prompt_tokens_total{backend="jax"}',
                          'gptjax_requests_total{outcome="ok"}'):
                try:
                    url = f"http://127.0.0.1:{prom_port}/api/v1/query?query={urllib.request.quote(query)}"
                    result = json.loads(urllib.request.urlopen(url, timeout=5).read())["data"]["result"]
                except OSError:
                    break
                if result:
                    found[query] = float(result[0]["value"][1])
            time.sleep(0.5)
    finally:
        prom.terminate()
        prom.wait(timeout=30)
        server.shutdown()
    assert found == {'gptjax_generated_tokens_total{backend="jax"}': 2 * 6 + 4,
                     'gptjax_prompt_tokens_total{backend="jax"}': 6.0, 'gptjax_requests_total{outcome="ok"}': 2.0}
