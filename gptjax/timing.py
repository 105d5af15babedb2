"""The clock and timing statistics every measurement in gptjax uses: warm-up then interleaved timed runs, arrival
stamps of a stream, medians and percentiles. It imports nothing of gptjax, so that the library (the precision
report), the benchmark harness (gptjax.bench) and training can all time through the same functions."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

import numpy as np

T = TypeVar("T")

clock = time.perf_counter  # the harness's clock: seconds, monotonic, the finest the platform has


def interleaved_runs(fns: dict[str, Callable[[int], T]], runs: int, warmup: int, rotate: bool = False
                     ) -> dict[str, list[T]]:
    """What each fn returns per timed run, run A B A B ... after `warmup` rounds whose results are dropped;
    fn(i) gets the run index (to rotate inputs; negative during warm-up) and measures itself (timed, stamps).
    rotate: round i starts at the i-th fn (A B C, B C A, C A B, ...), so no fn always runs right after the same
    neighbour (a peer's spinning threads, a cache another fn warmed)."""
    for i in range(warmup):
        for fn in fns.values():
            fn(-1 - i)
    results: dict[str, list[T]] = {name: [] for name in fns}
    names = list(fns)
    for i in range(runs):
        k = i % len(names) if rotate and names else 0
        for name in names[k:] + names[:k]:
            results[name].append(fns[name](i))
    return results


def interleaved_times(fns: dict[str, Callable[[int], object]], runs: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per call of each fn, run A B A B ... so machine drift hits all alike; fn(i) gets the run index
    (to rotate inputs; negative during warm-up) and must block until its result is ready."""
    return interleaved_runs({name: (lambda i, fn=fn: timed(lambda: fn(i))) for name, fn in fns.items()}, runs,
                            warmup)


def timed_value(fn: Callable[[], T]) -> tuple[T, float]:
    """fn's result and the seconds the call took (fn must block until its result is ready)."""
    t0 = clock()
    value = fn()
    return value, clock() - t0


def timed(fn: Callable[[], object]) -> float:
    """Seconds one call of fn takes (fn must block until its result is ready)."""
    return timed_value(fn)[1]


def stamps(items: Iterable[T]) -> list[tuple[float, T]]:
    """(seconds since the call, item) as each item of an iterable arrives, e.g. the chunks of a stream."""
    t0, out = clock(), []
    for item in items:
        out.append((clock() - t0, item))
    return out


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


def load_average() -> float | None:
    """The machine's 1-minute load average (others' work competes for the cores), None where unknown."""
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None



def bootstrap_ci(clusters: Sequence[T], stat: Callable[[list[T]], float], seed: int = 0, n: int = 2000,
                 level: float = 0.95) -> tuple[float, float]:
    """The `level` confidence interval of stat(clusters) by a seeded percentile bootstrap over whole clusters
    (e.g. a prompt's accepted/proposed draft tokens: tokens of one prompt are not independent, so the prompt is
    the unit resampled): stat of n resamples with replacement, their (1-level)/2 and (1+level)/2 percentiles."""
    if not clusters:
        raise ValueError("bootstrap_ci needs at least one cluster")
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(clusters), size=(n, len(clusters)))
    values = [stat([clusters[i] for i in pick]) for pick in picks]
    tail = 100 * (1 - level) / 2
    return percentile(values, tail), percentile(values, 100 - tail)
