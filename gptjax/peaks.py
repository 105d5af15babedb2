"""The machine's matmul ceiling, MFU's denominator: FLOP/s of an n x n x n matmul through jax.jit, measured
once per machine and kept in the user's cache, so that `gptjax train` reads it at start instead of timing a
matmul every time (the benchmark suite times the same function afresh in each run, beside its other ceilings).

A cache entry is keyed by what the number depends on: the JAX platform and device kind, the CPU model and the
cores this process may use, the jax version, the dtype and the size. --peak-flops or $GPTJAX_PEAK_FLOPS
replace it; deleting the cache file (gptjax.data.default_cache_dir()/ceilings.json) measures again.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from gptjax.data import default_cache_dir, write_atomic
from gptjax.errors import GptjaxError, os_cause
from gptjax.timing import best_time

PEAK_ENV = "GPTJAX_PEAK_FLOPS"  # FLOP/s: MFU's denominator, instead of the cached ceiling
CACHE_FILE = "ceilings.json"
CACHE_FORMAT = 1
MATMUL_N = 1024  # the suite's ceiling size: 2 GFLOP a call, 0.4 s to measure here (fp32, jax 0.10.2, 2 cores)


def matmul_flops(dtype: str, n: int, runs: int = 5, matmul: Callable[[Any, Any], Any] | None = None) -> float:
    """FLOP/s (2n³ per call) of an n x n x n matmul in dtype (fp32 | bf16 | int8 with int32 accumulation) through
    jax.jit on the default device, best of runs; fp32 at "float32" precision (no TF32/bf16 passes). `matmul`
    (x, w) replaces XLA's dot: a kernel's peak, e.g. gptjax's CPU bf16 GEMM that bf16 training runs on."""
    import jax
    import jax.numpy as jnp

    dt = {"fp32": jnp.float32, "bf16": jnp.bfloat16, "int8": jnp.int8}[dtype]
    a = jnp.ones((n, n), dt)
    out_dtype = jnp.int32 if dtype == "int8" else None
    dot = matmul or (lambda x, w: jnp.matmul(x, w, preferred_element_type=out_dtype, precision="highest"))
    f = jax.jit(lambda x: dot(x, x))
    return 2 * n**3 / best_time(lambda: f(a).block_until_ready(), runs)


class Peak(NamedTuple):
    """MFU's denominator and where it came from (said on the console at the start of a run)."""

    flops: float
    source: str


def mfu_peak(dtype: str, given: float | None = None, cache_dir: str | os.PathLike | None = None,
             kernel: Callable[[Any, Any], Any] | None = None) -> Peak:
    """The peak FLOP/s for compute `dtype`: `given` (--peak-flops), else $GPTJAX_PEAK_FLOPS, else this machine's
    cached matmul ceiling, measured now (and cached) when it has none yet: of `kernel` (x, w) where the step's
    matmuls run on it (bf16 training on gptjax's CPU kernel, which outruns XLA's bf16 dot: against XLA's, bf16
    training read 112% MFU, issue 30), else of XLA's dot."""
    if given is not None:
        return Peak(_positive("--peak-flops", given), "given (--peak-flops)")
    if os.environ.get(PEAK_ENV):
        return Peak(_positive(PEAK_ENV, os.environ[PEAK_ENV]), f"given (${PEAK_ENV})")
    return cached_ceiling(dtype, MATMUL_N, cache_dir, kernel)


def _positive(name: str, value: Any) -> float:
    try:
        flops = float(value)
    except ValueError:
        flops = math.nan
    if not (math.isfinite(flops) and flops > 0):
        raise GptjaxError(f"{name}={value!r} must be a number of FLOP/s > 0")
    return flops


def cached_ceiling(dtype: str, n: int = MATMUL_N, cache_dir: str | os.PathLike | None = None,
                   kernel: Callable[[Any, Any], Any] | None = None) -> Peak:
    """matmul_flops(dtype, n, matmul=kernel) of this machine from the cache file in cache_dir
    (default_cache_dir()); measured and added to the file (atomically) when the file has no entry for it."""
    path = Path(cache_dir or default_cache_dir()) / CACHE_FILE
    what = f"{dtype} kernel" if kernel is not None else dtype
    key, entries = machine_key(what, n), _read_cache(path)
    if isinstance(entries.get(key), dict) and _is_flops(entries[key].get("flops")):
        entry = entries[key]
        return Peak(float(entry["flops"]), f"{what} matmul {n}³ measured {entry.get('measured', '')}, "
                                           f"cached in {path}")
    flops = matmul_flops(dtype, n) if kernel is None else matmul_flops(dtype, n, matmul=kernel)
    entries[key] = {"flops": flops, "measured": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps({"format": CACHE_FORMAT, "ceilings": entries}, indent=1).encode())
    except OSError as e:
        return Peak(flops, f"{what} matmul {n}³ measured now (not cached: {path}: {os_cause(e)})")
    return Peak(flops, f"{what} matmul {n}³ measured now, cached in {path}")


def machine_key(dtype: str, n: int) -> str:
    """What a ceiling depends on: platform, device kind and count, CPU model, usable cores, jax, dtype, size."""
    import jax

    device = jax.devices()[0]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"{device.platform} {device.device_kind} x{jax.device_count()} | {_cpu_model()} x{cores} | "
            f"jax {jax.__version__} | {dtype} {n}")


def _cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what the platform module knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else platform.processor() or platform.machine()


def _is_flops(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _read_cache(path: Path) -> dict[str, Any]:
    """The cache file's entries; none when it is missing, unreadable or of another format (it is rewritten)."""
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(payload, dict) or payload.get("format") != CACHE_FORMAT:
        return {}
    ceilings = payload.get("ceilings")
    return dict(ceilings) if isinstance(ceilings, dict) else {}
