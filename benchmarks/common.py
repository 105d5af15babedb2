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


def memory_bandwidth(n_bytes: int = 2**30, runs: int = 5) -> dict[str, float]:
    """Bytes/s this device sustains, measured through JAX now, best of `runs` after a warm-up (a ceiling):
    "read" reduces n_bytes; "copy" reads n_bytes and writes them into a donated buffer of the same size
    (2 x n_bytes of traffic; donation reuses the buffer, so no fresh pages are faulted in while timing)."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones(n_bytes // 4, jnp.float32)
    read = jax.jit(jnp.sum)
    copy = jax.jit(lambda src, dst: src + 1.0, donate_argnums=1)
    out = {"read_bytes_per_s": n_bytes / _best(lambda: read(x).block_until_ready(), runs)}
    holder = [jnp.zeros_like(x)]

    def copy_once() -> None:
        holder[0] = copy(x, holder[0])
        holder[0].block_until_ready()

    out["copy_bytes_per_s"] = 2 * n_bytes / _best(copy_once, runs)
    return out


def _best(fn: Callable[[], object], runs: int) -> float:
    fn()
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def percentile(xs: list[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation, as numpy computes it."""
    import numpy as np

    return float(np.percentile(np.asarray(xs, dtype=float), q))


class torch_threads:
    """Give PyTorch every core for the peer's call, then shrink its pool to one thread.

    torch's worker threads keep spinning after an op; left at full size they slowed the JAX step measured
    next in the same process by 15% (2,067 vs 2,442 tokens/s on the train benchmark here)."""

    def __enter__(self) -> None:
        import torch

        torch.set_num_threads(os.cpu_count() or 1)

    def __exit__(self, *exc: object) -> None:
        import torch

        torch.set_num_threads(1)


def hf_model(params: dict, config: object) -> object | None:
    """transformers' GPT2LMHeadModel loaded from gptjax's own checkpoint of these params (so both sides run the
    same weights), in eval mode; None without the `peer` extra."""
    import tempfile

    try:
        from transformers import GPT2LMHeadModel
    except ImportError:
        return None
    from gptjax import save_checkpoint

    with tempfile.TemporaryDirectory() as d:
        save_checkpoint(config, params, d + "/ck")
        return GPT2LMHeadModel.from_pretrained(d + "/ck").eval()


def append_jsonl(path: str | None, rows: list[dict], env: dict) -> None:
    """Append one JSON line per measurement (with the environment) when a path is given."""
    import json

    if path:
        with open(path, "a") as f:
            for row in rows:
                f.write(json.dumps(row | {"env": env}) + "\n")
