"""Timing helpers shared by the benchmarks: warm-up, interleaved runs, medians, the environment."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable


def interleaved_times(fns: dict[str, Callable[[int], object]], runs: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per call of each fn, run A B A B ... so machine drift hits all alike; fn(i) gets the run index
    (to rotate inputs) and must block until its result is ready."""
    for i in range(warmup):
        for fn in fns.values():
            fn(-1 - i)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(runs):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn(i)
            times[name].append(time.perf_counter() - t0)
    return times


def median(xs: list[float]) -> float:
    """The median (the mean of the middle two for an even count)."""
    return statistics.median(xs)


def environment() -> dict[str, str]:
    """What ran the benchmark: versions, devices, CPU, thread settings, git commit."""
    import jax

    import gptjax

    env = {
        "gptjax": gptjax.__version__, "jax": jax.__version__, "python": platform.python_version(),
        "platform": jax.default_backend(), "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        "cpu": _cpu_model(), "cores": str(os.cpu_count()), "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
    }
    try:
        env["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                    cwd=os.path.dirname(__file__), timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        env["git"] = "unknown"
    return env


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
