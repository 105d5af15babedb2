"""The quickstart run (`gptjax train` defaults: byte-mini on the stdlib, seed 0) in fp32 and in bf16 compute, for a
fixed number of steps, each step's training loss written as JSONL (docs/precision.md renders both curves).

    python benchmarks/bf16_loss_curves.py --steps 300 --out benchmarks/results/bf16-train-curves.jsonl

(the committed file: --steps 300 on the quiet machine, the quickstart's whole run)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import tempfile
import time

import jax

from gptjax.backends import cpu_kernels
from gptjax.config import get_preset
from gptjax.train import TrainConfig, TrainOptions, train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per mode (the quickstart's: 300)")
    p.add_argument("--out", required=True, help="JSONL file to write")
    a = p.parse_args()
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False).stdout.strip()
    rows = [{"kind": "run", "git": git, "jax": jax.__version__, "cpu": platform.processor() or platform.machine(),
             "cores": os.cpu_count(), "cpu_kernels": cpu_kernels.status(), "steps": a.steps, "preset": "byte-mini",
             "load_avg_1m_start": os.getloadavg()[0]}]
    for mode in ("fp32", "bf16"):
        tc = TrainConfig(max_steps=a.steps, compute_dtype=mode, eval_every=a.steps, checkpoint_every=a.steps)
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as out:
            r = train(get_preset("byte-mini"), tc, out, TrainOptions(data_spec="stdlib", progress=False))
        rows += [{"kind": "step", "mode": mode, "step": i + 1, "loss": loss} for i, loss in enumerate(r.losses)]
        rows.append({"kind": "final", "mode": mode, "val_loss": r.val_loss, "val_bpb": r.val_bpb,
                     "seconds": time.perf_counter() - t0, "load_avg_1m_end": os.getloadavg()[0]})
    with open(a.out, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
