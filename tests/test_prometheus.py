"""deploy/ as shipped, against a real Prometheus (the stand-in for the compose stack: Docker cannot run here).

promtool checks deploy/prometheus.yml and runs the rules' unit tests (deploy/rules/tests.yml). Then Prometheus
runs deploy/prometheus.yml and deploy/rules/ with only the scrape targets substituted
(gptjax.tracing.prometheus.local_config), scraping `gptjax serve` and a `gptjax train --metrics-port` run while a
bounded mixed load (completions, bad requests, clients leaving mid-stream) reaches the server, and EVERY PromQL
expression of the Grafana dashboards and the rule files must return data from it: a panel whose query can never
return data fails here. Without prometheus/promtool these skip, except with CI=1, where they fail."""

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from test_serve import Server, _free_port

from gptjax.bench.studies.monitoring import mixed_load
from gptjax.tracing.prometheus import LocalPrometheus, local_config

pytestmark = pytest.mark.integration
ROOT = Path(__file__).parent.parent
DEPLOY = ROOT / "deploy"
CHECKPOINT = ROOT / "tests" / "fixtures" / "trained_byte_tiny"
WINDOW = "1m"  # what Grafana's $__rate_interval, $__interval and $__range stand for here
COMPARISON = re.compile(r"^(?P<series>.*\S)\s*(?P<op>==|!=|>=|<=|>|<)\s*(?P<threshold>-?[0-9.eE+]+)\s*$", re.DOTALL)


def _needs(tool: str) -> None:
    if shutil.which(tool) is None:
        if os.environ.get("CI"):
            pytest.fail(f"{tool} is not installed; CI installs it (apt-get install prometheus)")
        pytest.skip(f"{tool} not installed (apt-get install prometheus; .ci/run does, and CI fails without it)")


def dashboard_queries(dashboard: object) -> list[str]:
    """Every `expr` anywhere in a Grafana dashboard's JSON, its Grafana variables ($__rate_interval, ...) given
    a fixed window."""
    if isinstance(dashboard, dict):
        found = [dashboard["expr"]] if isinstance(dashboard.get("expr"), str) else []
        return found + [q for v in dashboard.values() for q in dashboard_queries(v)]
    if isinstance(dashboard, list):
        return [q for v in dashboard for q in dashboard_queries(v)]
    return []


def grafana(expr: str) -> str:
    return re.sub(r"\$\{?__(rate_interval|interval|range)\}?", WINDOW, expr)


def rule_queries(rules: dict) -> list[str]:
    """Each recording rule's expression and the series it records; each alert's expression asked with `bool`
    (`X > bool 1` is 0 or 1 for every series of X, so it has data whether or not the alert fires)."""
    out = []
    for group in rules["groups"]:
        for rule in group["rules"]:
            expr = rule["expr"].strip()
            if "record" in rule:
                out += [expr, rule["record"]]
                continue
            m = COMPARISON.match(expr)
            assert m, f"alert {rule['alert']}: keep its expression `SERIES OP THRESHOLD` (got {expr!r})"
            out.append(f"{m['series']} {m['op']} bool {m['threshold']}")
    return out


def every_query() -> list[str]:
    queries = [grafana(q) for p in sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))
               for q in dashboard_queries(json.loads(p.read_text()))]
    queries += [q for p in sorted((DEPLOY / "rules").glob("*.yml")) if p.name != "tests.yml"
                for q in rule_queries(yaml.safe_load(p.read_text()))]
    return list(dict.fromkeys(queries))


def test_promtool_checks_the_config_and_runs_the_rules_unit_tests():
    _needs("promtool")
    for args in (["check", "config", str(DEPLOY / "prometheus.yml")], ["test", "rules", str(DEPLOY / "rules" /
                                                                                         "tests.yml")]):
        out = subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60, check=False)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "SUCCESS" in out.stdout + out.stderr


def test_local_config_changes_only_the_targets():
    text = (DEPLOY / "prometheus.yml").read_text()
    new = yaml.safe_load(local_config(text, {"gptjax-serve": "127.0.0.1:1", "gptjax-train": "127.0.0.1:2"}))
    old = yaml.safe_load(text)
    for job in old["scrape_configs"]:
        job["static_configs"][0]["targets"] = {"gptjax-serve": ["127.0.0.1:1"], "gptjax-train": ["127.0.0.1:2"]}[
            job["job_name"]]
    assert new == old
    assert [t for j in yaml.safe_load(text)["scrape_configs"] for t in j["static_configs"][0]["targets"]] == [
        "host.docker.internal:8000", "host.docker.internal:9464"]  # the ports docs/monitoring.md gives
    with pytest.raises(Exception, match="no scrape job 'serve'"):
        local_config(text, {"serve": "127.0.0.1:1"})


def test_every_query_is_gathered():
    queries = every_query()
    assert len(queries) >= 30 and all("$__" not in q for q in queries)
    assert "up{job=\"gptjax-serve\"} == bool 0" in queries and "gptjax:generated_tokens:rate1m" in queries


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """gptjax serve, a gptjax train run exporting metrics, and Prometheus with deploy's config scraping both."""
    _needs("prometheus")
    tmp = tmp_path_factory.mktemp("prometheus")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "GPTJAX_"))} | {
        "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    (tmp / "data.txt").write_text("def f(x):\n    return x + 1\n" * 300)
    train_port = _free_port()
    command = [sys.executable, "-m", "gptjax.cli", "train", "--preset", "tiny", "--data", str(tmp / "data.txt"),
               "--out", str(tmp / "run"), "--max-steps", "100000", "--no-progress", "--peak-flops", "1e11",
               "--metrics-port", str(train_port), "batch_size=1", "seq_len=16", "log_every=5", "eval_every=100000",
               "checkpoint_every=100000"]
    with open(tmp / "train.log", "w") as log:  # it runs until the fixture kills it: its exporter must stay up
        train = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=log)
    server = Server(lambda port: ["-m", "gptjax.cli", "serve", "--checkpoint", str(CHECKPOINT), "--port", str(port)],
                    env, tmp / "serve.log")
    prometheus = LocalPrometheus(DEPLOY, {"gptjax-serve": f"127.0.0.1:{server.port}",
                                          "gptjax-train": f"127.0.0.1:{train_port}"}, tmp / "prom", _free_port())
    try:
        yield server, prometheus
    finally:
        prometheus.stop()
        train.send_signal(signal.SIGKILL)
        train.wait()
        assert server.stop() == 0, server.log.read_text()


def test_every_dashboard_and_rule_query_returns_data_from_a_real_prometheus(stack):
    server, prometheus = stack
    statuses = asyncio.run(mixed_load(server.url, 2, 120, [[97, 98, 99], [100, 101]], 24, requests=10))
    assert statuses == {"200": 2 * 9, "400": 2 * 1}  # per client: 9 completions (1 leaving early), 1 bad request
    cancelled = httpx.get(server.url + "/metrics").text
    # the series exists from the server's start (at 0): whether the leaving client's work was still running when
    # the server saw it leave depends on timing after a full warm-up (test_serve checks the cancellation itself)
    assert re.search(r'gptjax_serve_cancelled_total\{reason="disconnect"\} [0-9]', cancelled), cancelled
    loaded = time.time()
    prometheus.wait(lambda: scraped_since(prometheus, loaded), 60, "a scrape of both after the load")
    queries = every_query()

    def empty() -> list[str]:
        return [q for q in queries if not prometheus.query(q)]

    try:  # recording rules are evaluated every evaluation_interval after the scrapes that feed them
        prometheus.wait(lambda: not empty(), 60, "data for every query")
    except TimeoutError:
        pass
    assert empty() == [], f"queries with no data from Prometheus (see {prometheus.log})"
    assert {r["metric"]["job"] for r in prometheus.query("up == 1")} == {"gptjax-serve", "gptjax-train"}


def scraped_since(prometheus, t: float) -> bool:
    """Both jobs' targets scraped after Unix time t (False while Prometheus lists no targets yet)."""
    scrapes = prometheus.scrapes()
    return len(scrapes) == 2 and min(scrapes.values()) > t
