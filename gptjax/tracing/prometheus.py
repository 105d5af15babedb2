"""A Prometheus on this machine running deploy/'s own configuration: the stand-in for the compose stack where
Docker cannot run (tests/test_prometheus.py, `gptjax bench --study monitoring`). Only the scrape targets change:
`local_config` swaps each job's `host.docker.internal:PORT` for the address a local gptjax listens on; the scrape
and evaluation intervals and the rule files (copied beside the config) stay as deploy/ ships them. Needs the
`prometheus` binary (Debian/Ubuntu: apt-get install prometheus).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Self

from gptjax.errors import GptjaxError

READY_S = 30.0  # a fresh Prometheus answers /-/ready within a second or two


def local_config(text: str, targets: dict[str, str]) -> str:
    """deploy/prometheus.yml's text with the targets of the jobs named in `targets` (job name -> host:port)
    replaced, nothing else; a name the file has no job for is a GptjaxError."""
    import yaml  # PyYAML: installed with flax and orbax

    config = yaml.safe_load(text)
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    for name, address in targets.items():
        if name not in jobs:
            raise GptjaxError(f"no scrape job {name!r} in the config; it has: {', '.join(jobs)}")
        for static in jobs[name]["static_configs"]:
            static["targets"] = [address]
    return yaml.safe_dump(config, sort_keys=False)


class LocalPrometheus:
    """`prometheus` over deploy/'s prometheus.yml (targets substituted) and rules/, in a working directory, on
    127.0.0.1:port. Use as a context manager, or call stop()."""

    def __init__(self, deploy: Path, targets: dict[str, str], workdir: Path, port: int) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        shutil.copytree(deploy / "rules", workdir / "rules", dirs_exist_ok=True)
        config = workdir / "prometheus.yml"
        config.write_text(local_config((deploy / "prometheus.yml").read_text(), targets))
        self.url, self.log = f"http://127.0.0.1:{port}", workdir / "prometheus.log"
        with open(self.log, "w") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(["prometheus", f"--config.file={config}",
                                          f"--storage.tsdb.path={workdir / 'tsdb'}",
                                          f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL,
                                         stderr=log)
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise GptjaxError(f"prometheus exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                urllib.request.urlopen(self.url + "/-/ready", timeout=2)
                return
            except OSError:
                time.sleep(0.2)  # a starting process: nothing to wait on but its port
        self.stop()
        raise GptjaxError(f"prometheus not ready in {READY_S} s: {self.log.read_text()[-2000:]}")

    def api(self, path: str, **params: Any) -> Any:
        """GET /api/v1/<path>?params: its `data`, or a GptjaxError with Prometheus's error."""
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            body = json.loads(urllib.request.urlopen(url, timeout=30).read())
        except urllib.error.HTTPError as e:
            body = json.loads(e.read() or b"{}")
        if body.get("status") != "success":
            raise GptjaxError(f"prometheus {path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """An instant query's result (a list of {metric, value}); at: a Unix time, default now."""
        return self.api("query", query=expr, **({} if at is None else {"time": at}))["result"]

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
        """A range query's result (a list of {metric, values: [[t, "v"], ...]})."""
        return self.api("query_range", query=expr, start=start, end=end, step=step)["result"]

    def scrapes(self) -> dict[str, float]:
        """Per job, the Unix time of its target's last successful scrape (0 while it has none, or is down)."""
        targets = self.api("targets", state="active")["activeTargets"]
        return {t["labels"]["job"]: _unix(t["lastScrape"]) if t["health"] == "up" else 0.0 for t in targets}

    def wait(self, ready: Any, timeout: float, what: str, poll: float = 1.0) -> Any:
        """Poll ready() (asking this Prometheus's API) until it returns something true; raise naming `what`."""
        deadline = time.monotonic() + timeout
        while True:
            got = ready()
            if got:
                return got
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what}: not within {timeout} s")
            time.sleep(poll)  # Prometheus has no push notification: its API is asked again after a scrape's time

    def stop(self) -> None:
        """Terminate the server."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _unix(rfc3339: str) -> float:
    """Prometheus's lastScrape time (RFC 3339 with nanoseconds) as a Unix time."""
    from datetime import datetime

    head, _, rest = rfc3339.partition(".")
    fraction = "".join(c for c in rest if c.isdigit())
    zone = rest[len(fraction):] or "Z"
    stamp = datetime.fromisoformat(head + (zone.replace("Z", "+00:00")))
    return stamp.timestamp() + float("0." + (fraction or "0"))
