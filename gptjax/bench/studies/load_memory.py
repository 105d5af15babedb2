"""Peak memory of load_checkpoint on a synthetic checkpoint (default: gpt2-xl shape, 6.2 GB in fp32).

    gptjax bench --study load-memory [--preset gpt2-xl] [--dir DIR]

Writes random weights with save_checkpoint, then loads them in a fresh process and reports that process's
peak RSS (VmHWM) before and after loading, against the checkpoint's size on disk.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from typing import Any

from gptjax import get_preset, init_params, load_checkpoint, save_checkpoint
from gptjax.bench.env import peak_rss
from gptjax.bench.results import Outcome, child_result
from gptjax.timing import timed, timed_value

# flag -> (default, help); the runner adds them (the type is the default's, str for None)
FLAGS = {"--preset": ("gpt2-xl", "model shape, random weights"),
         "--dir": (None, "where to write the checkpoint (default: a temporary directory, removed after)")}


def run(args: argparse.Namespace, log: Any) -> Outcome:
    """Write the checkpoint, load it in a child process, and report the child's peak RSS."""
    config = get_preset(args.preset)
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        path = os.path.join(d, "ck")
        save_s = timed(lambda: save_checkpoint(config, init_params(config), path))
        size = os.path.getsize(os.path.join(path, "model.safetensors"))
        log(f"wrote {args.preset} checkpoint: {size / 1e9:.2f} GB in {save_s:.1f} s")
        child = child_result(__name__, path)
    growth = child["rss_after_bytes"] - child["rss_before_bytes"]
    row = {"preset": args.preset, "file_bytes": size, "save_s": save_s, "growth_bytes": growth,
           "growth_vs_file": growth / size} | child
    return Outcome([row], f"gptjax bench --study load-memory: {args.preset}", table(row))


def table(r: dict[str, Any]) -> str:
    """The result in one sentence."""
    return (f"load: {r['load_s']:.1f} s; peak RSS before {r['rss_before_bytes'] / 1e9:.2f} GB, after "
            f"{r['rss_after_bytes'] / 1e9:.2f} GB; growth {r['growth_bytes'] / 1e9:.2f} GB = "
            f"{r['growth_vs_file']:.3f}x the file ({r['params_bytes'] / 1e9:.2f} GB of float32 params)")


def _child(path: str) -> dict[str, Any]:
    """In a fresh process: peak RSS before and after load_checkpoint, the seconds it took, the bytes loaded."""
    before = peak_rss()
    (_, params), seconds = timed_value(lambda: load_checkpoint(path))
    return {"rss_before_bytes": before, "rss_after_bytes": peak_rss(), "load_s": seconds,
            "params_bytes": sum(v.nbytes for v in params.values())}


if __name__ == "__main__":  # the child process of the study
    print(json.dumps(_child(sys.argv[1])))
