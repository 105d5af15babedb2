"""`gptjax info`: the size calculator's table for a preset or a checkpoint, optionally per device on a mesh."""

from __future__ import annotations

import argparse
import os
from collections import Counter

from gptjax.cli.options import MODEL_OVERRIDES, add_mesh_flag
from gptjax.config import GPTConfig, get_preset
from gptjax.errors import GptjaxError
from gptjax.sizes import size_table
from gptjax.weights import checkpoint_dtypes, load_config

NAME = "info"
HELP = "parameters, FLOPs, weight and KV-cache bytes of a preset or checkpoint"
DESCRIPTION = ("Print the size calculator's table for a preset or a checkpoint directory; with overrides (e.g. "
               "--n-layer 6 --n-embd 384) it shows both shapes side by side.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of `gptjax info`."""
    p.add_argument("model", nargs="?", default="gpt2", help="preset name or checkpoint directory (default gpt2)")
    for flag, field in MODEL_OVERRIDES.items():
        p.add_argument(flag, type=int, dest=field, metavar="N", help=f"override {field}")
    p.add_argument("--seq-len", type=int, metavar="T", help="sequence length for FLOPs (default: the context)")
    add_mesh_flag(p, "per-device memory of training on a mesh", "data=2,fsdp=2,tensor=2 (sizes need not match "
                  "this machine's devices)")
    p.add_argument("--batch", type=int, default=8, metavar="B", help="global batch for --mesh (default 8)")


def run(args: argparse.Namespace) -> int:
    """Print the table (and the mesh table with --mesh, the stored dtypes of a checkpoint)."""
    label, base = resolve_model(args.model)
    changes = {field: getattr(args, field) for field in MODEL_OVERRIDES.values() if getattr(args, field) is not None}
    columns = [(label, base)] + ([("override", base.replace(**changes))] if changes else [])
    if args.seq_len is not None and not 1 <= args.seq_len <= max(c.n_positions for _, c in columns):
        raise GptjaxError(f"--seq-len {args.seq_len} must be in [1, n_positions]")
    print(size_table(columns, args.seq_len))
    if args.mesh:
        # gptjax.sharding imports jax (about a second): only --mesh pays for it
        from gptjax.sharding import mesh_table

        print("\n" + mesh_table(columns[-1][1], args.mesh, args.batch, args.seq_len))
    if os.path.isdir(args.model):
        counts = Counter(checkpoint_dtypes(args.model).values())
        print("stored tensors: " + ", ".join(f"{n} x {dtype}" for dtype, n in sorted(counts.items())))
    return 0


def resolve_model(name_or_path: str) -> tuple[str, GPTConfig]:
    """A preset name or a checkpoint directory → (label, config)."""
    if os.path.sep in name_or_path or os.path.exists(name_or_path):
        return name_or_path, load_config(name_or_path)
    return name_or_path, get_preset(name_or_path)
