"""Timing statistics: warm-up then interleaved timed runs, medians and percentiles."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import numpy as np


def interleaved_times(fns: dict[str, Callable[[int], object]], runs: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per call of each fn, run A B A B ... so machine drift hits all alike; fn(i) gets the run index
    (to rotate inputs; negative during warm-up) and must block until its result is ready."""
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


def timed(fn: Callable[[], object]) -> float:
    """Seconds one call of fn takes (fn must block until its result is ready)."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def best_time(fn: Callable[[], object], runs: int) -> float:
    """The fastest of `runs` calls after one warm-up call (for ceilings: the best the machine can do)."""
    fn()
    return min(timed(fn) for _ in range(runs))


def median(xs: list[float]) -> float:
    """The median (the mean of the middle two for an even count)."""
    return statistics.median(xs)


def percentile(xs: list[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation, as numpy computes it."""
    return float(np.percentile(np.asarray(xs, dtype=float), q))


def latency_summary(xs: list[float]) -> dict[str, float]:
    """p50, p90 and p99 of latencies in seconds (an empty dict for no samples)."""
    return {f"p{q}": percentile(xs, q) for q in (50, 90, 99)} if xs else {}
