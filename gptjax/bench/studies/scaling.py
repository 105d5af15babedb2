"""Train-step time per mesh shape, with communication-volume estimates.

    gptjax bench --study scaling                          # 8 fake CPU devices unless the host has accelerators
    gptjax bench --study scaling --preset byte-small --batch 16 --meshes 8x1x1,1x8x1,2x1x4,2x2x2

On a 2-core machine the 8 "devices" are threads of one CPU sharing 2 cores: no speed-up is expected and the
numbers show only the overhead of partitioning. On a real multi-GPU/TPU host the same study measures scaling
(--cpu-devices only affects the CPU platform, and only when XLA_FLAGS is not already set). Each mesh: two
warm-up steps (they compile), then the median of --runs steps.

Communication per step (bytes moved per device, ring algorithms, fp32): data parallel all-reduces gradients
2(d-1)/d·P; FSDP all-gathers weights twice (forward, backward) and reduce-scatters gradients: 3(f-1)/f·P/…;
tensor parallel all-reduces the [B/(d·f), T, D] activations 4 times per layer (2 forward, 2 backward):
4·L·2(t-1)/t·(B/(d·f))·T·D·4.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import numpy as np

from gptjax import get_preset
from gptjax.bench.results import Outcome
from gptjax.config import GPTConfig
from gptjax.errors import GptjaxError
from gptjax.timing import interleaved_times, median

# flag -> (default, help); the runner adds them (the type is the default's)
FLAGS = {"--preset": ("byte-mini", "model shape, random weights"), "--batch": (16, "global batch"),
         "--seq-len": (128, "tokens per row"),
         "--meshes": ("1x1x1,8x1x1,1x8x1,2x1x4,2x2x2", "comma list of data x fsdp x tensor"),
         "--runs": (5, "timed steps per mesh, median reported"),
         "--cpu-devices": (8, "host devices JAX makes on CPU")}


def parse_meshes(text: str) -> list[tuple[int, int, int]]:
    """'8x1x1,2x2x2' -> [(8, 1, 1), (2, 2, 2)]; a GptjaxError for anything else."""
    try:
        meshes = [tuple(int(v) for v in spec.split("x")) for spec in text.split(",")]
    except ValueError:
        meshes = []
    if not meshes or any(len(m) != 3 or min(m) < 1 for m in meshes):
        raise GptjaxError(f"--meshes {text!r}: give data x fsdp x tensor sizes, e.g. 8x1x1,2x2x2")
    return meshes


def prepare(args: argparse.Namespace) -> None:
    """Check the flags; ask XLA for --cpu-devices host devices (read when JAX starts its CPU backend)."""
    parse_meshes(args.meshes)
    if args.runs < 1 or args.batch < 1 or args.seq_len < 1:
        raise GptjaxError(f"--runs {args.runs}, --batch {args.batch} and --seq-len {args.seq_len} must be >= 1")
    os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={args.cpu_devices}")


def comm_bytes(config: GPTConfig, batch: int, seq_len: int, d: int, f: int, t: int) -> dict[str, float]:
    """Estimated bytes each device sends per training step, by kind of parallelism."""
    P = 4 * config.num_params() / t  # this tensor-parallel slice of the weights
    rows = batch / (d * f)
    return {"data": 2 * (d - 1) / d * P / f if d > 1 else 0.0,
            "fsdp": 3 * (f - 1) / f * P if f > 1 else 0.0,
            "tensor": 4 * config.n_layer * 2 * (t - 1) / t * rows * seq_len * config.n_embd * 4 if t > 1 else 0.0}


def run(args: argparse.Namespace, log: Any) -> Outcome:
    """The median train-step time of every mesh, one mesh after another."""
    import jax  # here, after prepare() set XLA_FLAGS: JAX reads the host device count when it starts

    config = get_preset(args.preset)
    batch = np.random.default_rng(0).integers(0, config.vocab_size, (1, args.batch, args.seq_len + 1)).astype(np.int32)
    rows = []
    for d, f, t in parse_meshes(args.meshes):
        identity = {"mesh": f"{d}x{f}x{t}", "data": d, "fsdp": f, "tensor": t, "preset": args.preset,
                    "batch": args.batch, "seq": args.seq_len}
        if d * f * t > jax.device_count():
            rows.append(identity | {"status": "skipped", "message": f"needs {d * f * t} devices, JAX sees "
                                    f"{jax.device_count()}"})
            continue
        log(f"mesh {identity['mesh']} ...")
        times = _step_times(config, args, batch, (d, f, t))
        step = median(times)
        rows.append(identity | {"status": "ok", "step_s": step, "tokens_per_s": args.batch * args.seq_len / step,
                                "times_s": times, "comm_bytes": comm_bytes(config, args.batch, args.seq_len, d, f, t)})
    return Outcome(rows, f"gptjax bench --study scaling: train step, {args.preset}, B={args.batch}, "
                   f"T={args.seq_len}, median of {args.runs}", table(rows, jax.default_backend(), jax.device_count()))


def _step_times(config: GPTConfig, args: argparse.Namespace, batch: Any, sizes: tuple[int, int, int]) -> list[float]:
    """Seconds per train step on this mesh, after two warm-up steps."""
    # jax and what imports it (flax, optax) here, after prepare() set XLA_FLAGS (read when JAX starts)
    import jax

    from gptjax.sharding import make_mesh, shard_batch
    from gptjax.train import TrainConfig, create_state, train_step

    tc = TrainConfig(batch_size=args.batch, seq_len=args.seq_len, warmup_steps=0)
    mesh = make_mesh(*sizes, devices=jax.devices()[: sizes[0] * sizes[1] * sizes[2]])
    graphdef, state = create_state(config, tc, mesh=mesh)
    x, y = shard_batch(batch[..., :-1], mesh, 1), shard_batch(batch[..., 1:], mesh, 1)
    holder = {"state": state}

    def step(i: int) -> None:
        holder["state"], m = train_step(graphdef, tc, holder["state"], x, y)
        m.loss.block_until_ready()

    # two warm-up steps, as the suite's train workload has: the second step compiles again (the state that the
    # first returns differs from create_state's; tiny preset, jax 0.10.2: 10.7 s, then 0.008 s per step)
    return interleaved_times({"step": step}, args.runs, warmup=2)["step"]


def table(rows: list[dict[str, Any]], platform: str, devices: int) -> str:
    """The markdown table: step time, tokens/s and communication per device per step, per mesh."""
    note = (f"({devices} CPU devices on {os.cpu_count()} cores: they share the cores, so no speed-up is expected "
            "here; this measures partitioning overhead)\n\n" if platform == "cpu" else "")
    lines = ["| mesh (data x fsdp x tensor) | step s | tokens/s | comm/device/step: data | fsdp | tensor |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['mesh']} | skipped: {r['message']} | | | | |")
            continue
        c = r["comm_bytes"]
        lines.append(f"| {r['mesh']} | {r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | {c['data'] / 1e6:.1f} MB | "
                     f"{c['fsdp'] / 1e6:.1f} MB | {c['tensor'] / 1e6:.1f} MB |")
    return note + "\n".join(lines)
