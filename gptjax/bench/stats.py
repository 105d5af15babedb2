"""Moved to gptjax.timing (one release of this name): the clock and statistics sit below every layer now, so
that the library (the precision report) and training time through them without importing the benchmark harness."""

from gptjax.timing import (best_time, clock, interleaved_runs, interleaved_times, latency_summary,  # noqa: F401
                           load_average, median, percentile, stamps, timed, timed_value)
