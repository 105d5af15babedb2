"""GFLOP/s of gptjax_bf16_matmul on gpt2's matmul shapes (K=768: N=2304/768/3072; K=3072: N=768) at given rows M.

Compare trees by PYTHONPATH (the kernels .so of each built in place), e.g. before vs after gemm_bf16.cc:
    PYTHONPATH=/path/to/old python benchmarks/probes/bf16_gemm_shapes.py 1,8,128,512
    PYTHONPATH=. python benchmarks/probes/bf16_gemm_shapes.py 1,8,128,512
Prints one JSON line per shape: wall-clock GFLOP/s (median of 5) and the error against float64.
"""

from __future__ import annotations

import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from gptjax.backends import cpu_kernels

SHAPES = ((768, 2304), (768, 768), (768, 3072), (3072, 768))  # (K, N)


def main() -> None:
    if not cpu_kernels.available():
        sys.exit(f"CPU kernels: {cpu_kernels.status()}")
    f = jax.jit(cpu_kernels.bf16_matmul)
    rng = np.random.default_rng(0)
    for M in (int(m) for m in (sys.argv[1] if len(sys.argv) > 1 else "128,512").split(",")):
        for K, N in SHAPES:
            x = jnp.asarray(rng.standard_normal((M, K)), jnp.bfloat16)
            w = jnp.asarray(rng.standard_normal((N, K)), jnp.bfloat16)
            y = f(x, w).block_until_ready()
            ref = np.asarray(x, np.float64) @ np.asarray(w, np.float64).T
            reps = max(3, int(2e9 / (2 * M * K * N)))
            times = []
            for _ in range(5):
                t = time.perf_counter()
                for _ in range(reps):
                    y = f(x, w)
                y.block_until_ready()
                times.append((time.perf_counter() - t) / reps)
            t = float(np.median(times))
            print(json.dumps({"M": M, "K": K, "N": N, "gflops": round(2 * M * K * N / t / 1e9, 1),
                              "max_rel_err": float(np.abs(np.asarray(y) - ref).max() / np.abs(ref).max()),
                              "load_avg_1m": os.getloadavg()[0]}))


if __name__ == "__main__":
    main()
