"""Train-step time per mesh shape, with communication-volume estimates.

    python -m benchmarks.scaling                          # 8 fake CPU devices unless the host has accelerators
    python -m benchmarks.scaling --preset byte-small --batch 16 --meshes 8x1x1,1x8x1,2x1x4,2x2x2

On this 2-core machine the 8 "devices" are threads of one CPU sharing 2 cores: no speed-up is expected and the
numbers show only the overhead of partitioning. On a real multi-GPU/TPU host the same script measures scaling
(--cpu-devices only affects the CPU platform).

Communication per step (bytes moved per device, ring algorithms, fp32): data parallel all-reduces gradients
2(d-1)/d·P; FSDP all-gathers weights twice (forward, backward) and reduce-scatters gradients: 3(f-1)/f·P/…;
tensor parallel all-reduces the [B/(d·f), T, D] activations 4 times per layer (2 forward, 2 backward):
4·L·2(t-1)/t·(B/(d·f))·T·D·4.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def comm_bytes(config, batch: int, seq_len: int, d: int, f: int, t: int) -> dict[str, float]:
    """Estimated bytes each device sends per training step, by kind of parallelism."""
    P = 4 * config.num_params() / t  # this tensor-parallel slice of the weights
    rows = batch / (d * f)
    return {"data": 2 * (d - 1) / d * P / f if d > 1 else 0.0,
            "fsdp": 3 * (f - 1) / f * P if f > 1 else 0.0,
            "tensor": 4 * config.n_layer * 2 * (t - 1) / t * rows * seq_len * config.n_embd * 4 if t > 1 else 0.0}


def main(argv: list[str] | None = None) -> int:
    """Measure each mesh and print the table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="byte-mini")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--meshes", default="1x1x1,8x1x1,1x8x1,2x1x4,2x2x2", help="data x fsdp x tensor, comma list")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--cpu-devices", type=int, default=8)
    args = ap.parse_args(argv)
    os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={args.cpu_devices}")
    import jax
    import jax.numpy as jnp
    import numpy as np

    from benchmarks.common import environment, median
    from gptjax import get_preset
    from gptjax.sharding import make_mesh, shard_batch
    from gptjax.train import TrainConfig, create_state, train_step

    config = get_preset(args.preset)
    tc = TrainConfig(batch_size=args.batch, seq_len=args.seq_len, warmup_steps=0)
    batch = np.random.default_rng(0).integers(0, config.vocab_size, (1, args.batch, args.seq_len + 1)).astype(np.int32)
    print("environment:", json.dumps(environment()))
    if jax.default_backend() == "cpu":
        print(f"({jax.device_count()} CPU devices on {os.cpu_count()} cores: they share the cores, so no speed-up "
              "is expected here; this measures partitioning overhead)")
    print(f"\ntrain step, {args.preset}, B={args.batch}, T={args.seq_len}, median of {args.runs}\n")
    print("| mesh (data x fsdp x tensor) | step s | tokens/s | comm/device/step: data | fsdp | tensor |")
    print("|---|---|---|---|---|---|")
    for spec in args.meshes.split(","):
        d, f, t = (int(v) for v in spec.split("x"))
        devices = jax.devices()[: d * f * t]
        mesh = make_mesh(d, f, t, devices=devices)
        graphdef, state = create_state(config, tc, mesh=mesh)
        x, y = shard_batch(batch[..., :-1], mesh, 1), shard_batch(batch[..., 1:], mesh, 1)
        times = []
        for i in range(args.runs + 1):
            t0 = time.perf_counter()
            state, m = train_step(graphdef, tc, state, x, y, jnp.float32(0))
            m.loss.block_until_ready()
            if i:
                times.append(time.perf_counter() - t0)
        step = median(times)
        c = comm_bytes(config, args.batch, args.seq_len, d, f, t)
        print(f"| {spec} | {step:.3f} | {args.batch * args.seq_len / step:,.0f} | {c['data'] / 1e6:.1f} MB | "
              f"{c['fsdp'] / 1e6:.1f} MB | {c['tensor'] / 1e6:.1f} MB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
