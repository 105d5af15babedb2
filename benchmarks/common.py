"""Helpers the per-issue benchmark scripts share; the implementations live in gptjax.bench (installed with the
package, used by `gptjax bench`), re-exported here so `python -m benchmarks.<script>` keeps working."""

from __future__ import annotations

from gptjax.bench.env import environment, torch_threads
from gptjax.bench.stats import interleaved_times, median, percentile

__all__ = ["append_jsonl", "environment", "hf_model", "interleaved_times", "median", "memory_bandwidth",
           "percentile", "torch_threads"]


def memory_bandwidth(n_bytes: int = 2**30, runs: int = 5) -> dict[str, float]:
    """gptjax.bench.ceilings.memory_bandwidth under the scripts' key names (read_bytes_per_s, copy_bytes_per_s)."""
    from gptjax.bench.ceilings import memory_bandwidth as measure

    return {f"{k}_bytes_per_s": v for k, v in measure(n_bytes, runs).items()}


def hf_model(params: dict, config: object) -> object | None:
    """transformers' GPT2LMHeadModel with these params (gptjax.bench.peer.hf_model), or None without the extra."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        return None
    from gptjax.bench.peer import hf_model as load

    return load(params, config)


def append_jsonl(path: str | None, rows: list[dict], env: dict) -> None:
    """Append one JSON line per measurement (with the environment) when a path is given."""
    import json

    if path:
        with open(path, "a") as f:
            for row in rows:
                f.write(json.dumps(row | {"env": env}) + "\n")
