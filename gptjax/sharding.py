"""Parallelism over a JAX device mesh: data, FSDP and tensor (Megatron-style) parallelism with `jax.jit` and
`NamedSharding` (no pmap: it is in maintenance mode since JAX 0.8; jit with shardings replaces it).

The model names logical axes only (every parameter carries them as NNX `out_sharding` metadata); RULES below
is the one place that maps them to the mesh axes ("data", "fsdp", "tensor"). XLA's sharding propagation does
the rest: FSDP parameters are all-gathered per use, tensor-parallel matmuls reduce-scatter/all-reduce.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gptjax.errors import GptjaxError
from gptjax.sizes import human

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or axes, or None: replicated). Parameters and activations share the table;
# activation names start with "act_" where they must differ from the parameter of the same name.
RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),  # rows of a batch: data parallelism, and FSDP is data parallel too
    "embed": "fsdp",  # parameters' model width: FSDP shards weights (and optimizer state) along it
    "heads": "tensor",  # attention heads: Megatron column/row split of QKV and output projections
    "kv": None,
    "mlp": "tensor",  # MLP hidden width: column-split c_fc, row-split c_proj
    "vocab": "tensor",  # vocab-parallel embedding and LM head
    "length": None,
    "layers": None,
    "act_embed": None,  # activations keep their width whole
    "act_heads": "tensor",  # attention activations and the KV cache follow the heads
}


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: list | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over the devices (all by default); one size may be -1: the rest."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    for name, size in sizes.items():
        if isinstance(size, bool) or not isinstance(size, int) or (size < 1 and size != -1):
            raise GptjaxError(f"mesh size {name}={size!r} must be a positive integer or -1 (the rest)")
    free = [n for n, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise GptjaxError(f"only one mesh size may be -1, got {free}")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if len(devices) % fixed:
            raise GptjaxError(f"mesh {sizes}: {len(devices)} devices do not divide by {fixed}")
        sizes[free[0]] = len(devices) // fixed
    if math.prod(sizes.values()) != len(devices):
        raise GptjaxError(f"mesh data={sizes['data']} x fsdp={sizes['fsdp']} x tensor={sizes['tensor']} = "
                          f"{math.prod(sizes.values())} devices, but {len(devices)} are available")
    grid = np.asarray(devices, dtype=object).reshape(sizes["data"], sizes["fsdp"], sizes["tensor"])
    return Mesh(grid, MESH_AXES)


def parse_mesh(spec: str) -> dict[str, int]:
    """'data=2,fsdp=2,tensor=2' -> sizes for make_mesh (missing axes: data=-1, others 1)."""
    sizes: dict[str, int] = {}
    for part in filter(None, spec.split(",")):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in MESH_AXES:
            raise GptjaxError(f"--mesh {spec!r}: expected name=size with names {MESH_AXES}, got {part!r}")
        try:
            sizes[name] = int(value)
        except ValueError:
            raise GptjaxError(f"--mesh {spec!r}: size {value!r} of {name} is not an integer") from None
    return {"data": sizes.get("data", -1), "fsdp": sizes.get("fsdp", 1), "tensor": sizes.get("tensor", 1)}


def mesh_description(mesh: Mesh | None) -> str:
    """'data=2,fsdp=2,tensor=2' (or '' without a mesh), for logs and span attributes."""
    return "" if mesh is None else ",".join(f"{n}={mesh.shape[n]}" for n in MESH_AXES)


def logical_to_spec(axes: tuple[str | None, ...] | None, mesh: Mesh) -> PartitionSpec:
    """The PartitionSpec of logical axes under RULES, dropping mesh axes of size 1 and axes used twice."""
    if axes is None:
        return PartitionSpec()
    used: set[str] = set()
    out = []
    for name in axes:
        target = RULES.get(name) if name is not None else None
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        keep = tuple(t for t in targets if mesh.shape[t] > 1 and t not in used)
        used |= set(keep)
        out.append(keep[0] if len(keep) == 1 else (keep or None))
    return PartitionSpec(*out)


def check_divisible(shape: tuple[int, ...], spec: PartitionSpec, mesh: Mesh, what: str) -> None:
    """Raise naming both numbers when a dimension does not split evenly over its mesh axes."""
    for dim, axes in zip(shape, spec):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        parts = math.prod(mesh.shape[a] for a in names)
        if parts > 1 and dim % parts:
            raise GptjaxError(f"{what}: dimension {dim} is not divisible by the mesh's {' x '.join(names)} size "
                              f"{parts}")


def check_config(config: Any, mesh: Mesh) -> None:
    """Raise naming both numbers when the model's heads or MLP width do not split over the tensor axis."""
    t = mesh.shape["tensor"]
    for name, value in (("n_head", config.n_head), ("MLP width", config.mlp_width)):
        if value % t:
            raise GptjaxError(f"{name}={value} is not divisible by the mesh's tensor size {t}")
    if config.n_embd % mesh.shape["fsdp"]:
        raise GptjaxError(f"n_embd={config.n_embd} is not divisible by the mesh's fsdp size {mesh.shape['fsdp']}")


def state_shardings(state: Any, mesh: Mesh) -> Any:
    """NamedShardings for an NNX state (or optimizer state of the same layout) from its logical axis metadata.
    A vocabulary that does not divide over its mesh axes is replicated instead (gpt2's 50,257 is prime to 2)."""
    from flax import nnx

    def leaf(variable: Any) -> NamedSharding:
        axes = variable.get_metadata().get("out_sharding") if isinstance(variable, nnx.Variable) else None
        shape = variable.shape if isinstance(variable, nnx.Variable) else ()
        spec = logical_to_spec(axes, mesh)
        if axes:
            spec = PartitionSpec(*(None if a == "vocab" and not _divides(d, s, mesh) else s
                                   for a, d, s in zip(axes, shape, spec)))
        check_divisible(shape, spec, mesh, f"parameter with axes {axes}")
        return NamedSharding(mesh, spec)

    return jax.tree.map(leaf, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _divides(dim: int, axes: Any, mesh: Mesh) -> bool:
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return dim % math.prod(mesh.shape[a] for a in names) == 0


def cache_sharding(mesh: Mesh, ndim: int = 4) -> NamedSharding:
    """KV cache [B, H, S, K] (or its int8 scales [B, H, S]): rows over the batch axes, heads over tensor."""
    return NamedSharding(mesh, logical_to_spec(("batch", "act_heads") + (None,) * (ndim - 2), mesh))


def shard_state(state: Any, mesh: Mesh) -> Any:
    """Place an NNX state on the mesh according to its logical axes."""
    return jax.device_put(state, state_shardings(state, mesh))


def batch_sharding(mesh: Mesh, ndim: int = 2, leading: int = 0) -> NamedSharding:
    """Sharding for token batches [..., B, T]: B over (data, fsdp), `leading` replicated dims before it."""
    spec = logical_to_spec((None,) * leading + ("batch",) + (None,) * (ndim - leading - 1), mesh)
    return NamedSharding(mesh, spec)


def shard_batch(batch: np.ndarray, mesh: Mesh, leading: int = 0) -> jax.Array:
    """Place a batch [..., B, T] on the mesh. With several processes each passes its own rows (its slice of
    the global batch, in process order) and gets the global array."""
    sharding = batch_sharding(mesh, batch.ndim, leading)
    if jax.process_count() > 1:
        shape = list(batch.shape)
        shape[leading] *= jax.process_count()
        check_divisible(tuple(shape), sharding.spec, mesh, "batch")
        return jax.make_array_from_process_local_data(sharding, batch, tuple(shape))
    check_divisible(batch.shape, sharding.spec, mesh, "batch")
    return jax.device_put(batch, sharding)


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, *, cpu_collectives: str = "gloo") -> None:
    """Join a multi-process JAX job (jax.distributed.initialize): explicit arguments, or the environment
    (Slurm, Open MPI, TPU pods, or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID). On CPU the
    collectives go through gloo."""
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and "JAX_NUM_PROCESSES" in os.environ:
        num_processes = int(os.environ["JAX_NUM_PROCESSES"])
    if process_id is None and "JAX_PROCESS_ID" in os.environ:
        process_id = int(os.environ["JAX_PROCESS_ID"])
    if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
        raise GptjaxError(f"process_id={process_id} must be in [0, num_processes={num_processes})")
    # CPU devices need a collectives library to talk across processes; set before any backend exists
    # (querying the backend here would initialise it, which jax.distributed.initialize forbids)
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(coordinator_address, num_processes, process_id)


def per_device_bytes(config: Any, mesh_sizes: Mapping[str, int], batch: int, seq_len: int,
                     precision: str = "fp32") -> dict[str, float]:
    """Estimated bytes per device of parameters, AdamW state (2 x fp32) and gradients, and the main
    activations of one training step, for a mesh: what FSDP (params/optimizer / fsdp) and TP (/ tensor)
    buy. Activations: per layer the residual stream, attention scores and MLP hidden kept for backward."""
    data, fsdp, tensor = (mesh_sizes.get(k, 1) for k in MESH_AXES)
    params = config.weight_bytes(precision) / (fsdp * tensor)
    full = config.num_params() * 4 / (fsdp * tensor)
    rows = batch / (data * fsdp)
    L, D, F, H, T = config.n_layer, config.n_embd, config.mlp_width, config.n_head, seq_len
    per_layer = rows * T * (6 * D + (F + H * T + 3 * D) / tensor) * 4
    logits = rows * T * config.vocab_size / tensor * 4
    return {"parameters": params, "gradients": full, "optimizer": 2 * full,
            "activations": L * per_layer + logits}


def mesh_table(config: Any, spec: str, batch: int, seq_len: int | None) -> str:
    """Per-device bytes of training on a mesh ("data=2,fsdp=2,tensor=2"; data -1 counts as 1) next to one
    device, as a markdown table: what FSDP and tensor parallelism buy."""
    sizes = parse_mesh(spec)
    if sizes["data"] == -1:
        sizes["data"] = 1
    T = seq_len or config.n_positions
    rows = batch // (sizes["data"] * sizes["fsdp"])
    if batch < 1 or rows * sizes["data"] * sizes["fsdp"] != batch:
        raise GptjaxError(f"batch {batch} is not divisible by data x fsdp = {sizes['data'] * sizes['fsdp']}")
    one = per_device_bytes(config, {}, batch, T)
    mesh = per_device_bytes(config, sizes, batch, T)
    label = ",".join(f"{k}={sizes[k]}" for k in MESH_AXES)
    lines = [f"| per device (fp32 AdamW, batch {batch}, T={T}) | 1 device | {label} | ratio |", "|---|---|---|---|"]
    for key in one:
        lines.append(f"| {key} | {human(one[key], 'B')} | {human(mesh[key], 'B')} | {mesh[key] / one[key]:.3f}x |")
    total = sum(one.values()), sum(mesh.values())
    lines.append(f"| total | {human(total[0], 'B')} | {human(total[1], 'B')} | {total[1] / total[0]:.3f}x |")
    return "\n".join(lines)
