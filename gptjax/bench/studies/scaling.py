"""Per mesh shape: what each device holds, which collectives the compiled train step runs, and its time.

    gptjax bench --study scaling                          # 8 fake CPU devices unless the host has accelerators
    gptjax bench --study scaling --preset byte-small --batch 16 --meshes 8x1x1,1x8x1,2x1x4,2x2x2

Per mesh, measured: the largest per-device bytes of the weights and of the AdamW state (summed from the arrays'
shards: exact; beside the estimate `gptjax info --mesh` prints), the collectives in the compiled train step
counted by kind (all-reduce, all-gather, reduce-scatter, all-to-all, collective-permute: parsed from its HLO
text, each instruction once) with the bytes of their results, and the median step time.

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
import math
import os
import re
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
         "--meshes": ("1x1x1,8x1x1,1x8x1,1x1x8,2x2x2,2x1x4,4x2x1", "comma list of data x fsdp x tensor"),
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
    """Per mesh: per-device weight and optimizer bytes, the compiled step's collectives, the median step time."""
    import jax  # here, after prepare() set XLA_FLAGS: JAX reads the host device count when it starts

    from gptjax.sharding import MESH_AXES, per_device_bytes

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
        try:
            measured = measure_mesh(config, args, batch, (d, f, t))
        except GptjaxError as e:  # a shape this mesh cannot split (e.g. 4 heads over tensor=8): said, not fatal
            rows.append(identity | {"status": "skipped", "message": str(e)})
            continue
        step = median(measured["times_s"])
        estimate = per_device_bytes(config, dict(zip(MESH_AXES, (d, f, t))), args.batch, args.seq_len)
        rows.append(identity | measured | {
            "status": "ok", "step_s": step, "tokens_per_s": args.batch * args.seq_len / step,
            "weight_bytes_estimate": estimate["parameters"], "optimizer_bytes_estimate": estimate["optimizer"],
            "comm_bytes": comm_bytes(config, args.batch, args.seq_len, d, f, t)})
    return Outcome(rows, f"gptjax bench --study scaling: train step, {args.preset}, B={args.batch}, "
                   f"T={args.seq_len}, median of {args.runs}", table(rows, jax.default_backend(), jax.device_count()))


def measure_mesh(config: GPTConfig, args: argparse.Namespace, batch: Any, sizes: tuple[int, int, int]
                 ) -> dict[str, Any]:
    """On one mesh: seconds per train step (after two warm-up steps), the largest per-device bytes of the
    weights and of the optimizer state (from the arrays' shards: exact), and the collectives of the compiled step."""
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
    times = interleaved_times({"step": step}, args.runs, warmup=2)["step"]
    state = holder["state"]
    hlo = train_step.lower(graphdef, tc, state, x, y).compile().as_text()  # the program the timed steps ran
    return {"times_s": times, "weight_bytes": device_bytes(state.params),
            "optimizer_bytes": device_bytes(state.opt_state), "collectives": collectives(hlo)}


def device_bytes(tree: Any) -> int:
    """The most bytes any one device holds of a pytree of arrays: each leaf's shards summed per device."""
    import jax

    held: dict[Any, int] = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
    return max(held.values(), default=0)


COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
# an HLO instruction: `%name = TYPE op(` with op a collective or its asynchronous -start (its -done not counted)
_INSTRUCTION = re.compile(r"=\s*(?P<type>\S.*?)\s+(?P<op>" + "|".join(COLLECTIVES) + r")(?:-start)?\(")
_ARRAY = re.compile(r"\b(pred|[suf](?:8|16|32|64)|bf16|f8e4m3fn|f8e5m2)\[([\d,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
          "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
    """{op: {"count", "bytes"}} of the collectives in a compiled program's HLO text (each instruction once, as
    written: one inside a loop body counts once), bytes of their result shapes (an asynchronous -start's result
    holds its operands too)."""
    out = {op: {"count": 0, "bytes": 0} for op in COLLECTIVES}
    for m in _INSTRUCTION.finditer(hlo_text):
        out[m["op"]]["count"] += 1
        out[m["op"]]["bytes"] += sum(_BYTES[dt] * math.prod(int(n) for n in dims.split(",") if n)
                                     for dt, dims in _ARRAY.findall(m["type"]))
    return out


def table(rows: list[dict[str, Any]], platform: str, devices: int) -> str:
    """The markdown table per mesh: step time, tokens/s, per-device bytes of weights and optimizer state
    (measured, with the estimate of `gptjax info --mesh`), the compiled step's collectives, and the estimated
    communication per device per step."""
    note = (f"({devices} CPU devices on {os.cpu_count()} cores: they share the cores, so no speed-up is expected "
            "here; this measures partitioning overhead)\n\n" if platform == "cpu" else "")
    lines = [("| mesh (data x fsdp x tensor) | step s | tokens/s | weights/device MiB (est.) | optimizer/device MiB "
              "(est.) | collectives in the step | comm/device/step est.: data | fsdp | tensor |"),
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['mesh']} | skipped: {r['message']} | | | | | | | |")
            continue
        c = r["comm_bytes"]
        ops = ", ".join(f"{op} {v['count']}" for op, v in r["collectives"].items() if v["count"]) or "none"
        lines.append(f"| {r['mesh']} | {r['step_s']:.3f} | {r['tokens_per_s']:,.0f} "
                     f"| {r['weight_bytes'] / 2**20:.2f} ({r['weight_bytes_estimate'] / 2**20:.2f}) "
                     f"| {r['optimizer_bytes'] / 2**20:.2f} ({r['optimizer_bytes_estimate'] / 2**20:.2f}) | {ops} "
                     f"| {c['data'] / 1e6:.1f} MB | {c['fsdp'] / 1e6:.1f} MB | {c['tensor'] / 1e6:.1f} MB |")
    return note + "\n".join(lines)
