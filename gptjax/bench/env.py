"""What ran the benchmark: versions, git commit, devices, CPU, XLA flags and thread counts; memory in use."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import time
from importlib import metadata
from typing import Any

from gptjax.timing import load_average

_PACKAGES = ("gptjax", "jax", "jaxlib", "flax", "numpy", "torch", "transformers")


def environment(peer_thread_count: int | None = None) -> dict[str, Any]:
    """Versions (gptjax, jax, jaxlib, flax, numpy, torch, transformers), git commit (short, and the full stamp:
    commit, clean, time), device kind and count,
    CPU model and cores, XLA flags, whether gptjax's CPU kernels ran, and the thread counts both sides use."""
    # jax and the kernels (which import jax) not at the top: results.py imports this module for every study's
    # `--help` and `gptjax bench --help`, and jax takes half a second
    import jax

    from gptjax.backends import cpu_kernels

    env: dict[str, Any] = {name: _version(name) for name in _PACKAGES}
    env |= {"python": platform.python_version(), "git": git_commit(), **stamp(), "platform": jax.default_backend(),
            "device_kind": jax.devices()[0].device_kind, "device_count": jax.device_count(),
            "cpu": cpu_model(), "cores": os.cpu_count()}
    env |= {name: os.environ.get(name, "") for name in ("XLA_FLAGS", "JAX_PLATFORMS", "OMP_NUM_THREADS")}
    env["cpu_kernels"] = cpu_kernels.status()
    env |= {"peer_threads": peer_thread_count or peer_threads(),
            "load_avg_1m": load_average()}
    return env


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def git_commit() -> str:
    """The short commit of the gptjax source tree (with "+dirty" for uncommitted changes), or "unknown"."""
    try:
        commit = _git("rev-parse", "--short", "HEAD")
        dirty = _git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (commit + ("+dirty" if dirty else "")) if commit else "unknown"


def _git(*args: str) -> str:
    """git's stdout (stripped), run in this package's directory (the source tree when it is a checkout)."""
    here = os.path.dirname(os.path.abspath(__file__))
    return subprocess.run(["git", *args], check=False, capture_output=True, text=True, cwd=here, timeout=5).stdout.strip()


def stamp() -> dict[str, Any]:
    """What names the code and the moment a result was measured: the full commit ("unknown" outside a git
    checkout), whether the tree was clean (tracked files only) and the UTC time (ISO 8601, seconds)."""
    try:
        commit = _git("rev-parse", "HEAD") or "unknown"
        clean = commit != "unknown" and not _git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        commit, clean = "unknown", False
    return {"commit": commit, "clean": clean, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or platform.processor())."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def peer_threads() -> int:
    """CPU threads PyTorch gets for the peer's calls: as many as XLA:CPU's pool (one per core)."""
    return os.cpu_count() or 1


class torch_threads:
    """Give PyTorch `n` threads (default peer_threads()) for the peer's call, then shrink its pool to one thread.

    torch's worker threads keep spinning after an op; left at full size they slowed the JAX step measured
    next in the same process by 15% (2,067 vs 2,442 tokens/s on the train benchmark here)."""

    def __init__(self, n: int | None = None) -> None:
        self.n = n or peer_threads()

    def __enter__(self) -> None:
        import torch  # the peer extra, optional

        torch.set_num_threads(self.n)

    def __exit__(self, *exc: object) -> None:
        import torch  # the peer extra, optional

        torch.set_num_threads(1)


def device_memory() -> dict[str, int | None]:
    """Peak device memory the platform reports (GPU/TPU; None on CPU) and this process's peak RSS so far."""
    import jax  # half a second: see environment()

    stats = jax.devices()[0].memory_stats() or {}
    return {"peak_device_bytes": stats.get("peak_bytes_in_use"), "host_peak_rss_bytes": peak_rss()}


def peak_rss() -> int | None:
    """This process's peak resident memory so far (VmHWM, Linux), None where unknown."""
    try:
        with open("/proc/self/status") as f:
            found = re.search(r"VmHWM:\s+(\d+) kB", f.read())
    except OSError:
        return None
    return int(found.group(1)) * 1024 if found else None
