"""The parallelism diagram: which mesh axis splits which dimension of every weight and activation, read from the
code that decides it, so the picture cannot drift from the code.

`rows()` builds the JAX model on a tiny config, reads each parameter's logical axes (the NNX `out_sharding`
metadata the model sets) and maps them through gptjax.sharding's rules (`state_shardings`, the same call that
places a real model; AdamW's m and v are placed the same way), and adds the activations sharding.py places
explicitly (the token batch, the KV cache). It does so on an abstract data=2, fsdp=2, tensor=2 mesh: no devices
needed, and every axis large enough to show. `plot(rows, path)` draws one line per tensor, one box per dimension,
coloured by the mesh axes that split it. `python -m gptjax.sharding_diagram DIR` writes
DIR/parallelism-<sha12>.png (named by the hash of rows()) and prints its name.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from gptjax.errors import GptjaxError

MESH = {"data": 2, "fsdp": 2, "tensor": 2}
LETTERS = {"embed": "D", "heads": "H", "kv": "K", "mlp": "F", "vocab": "V", "length": "T", "layers": "L"}
COLOURS = {"data": "#4c72b0", "fsdp": "#dd8452", "tensor": "#55a868", "data+fsdp": "#8172b3", "": "#d9d9d9"}
ACTIVATIONS = (  # (name, letters of its dimensions, sharding.py's function placing it, its ndim)
    ("tokens [B, T]", ("B", "T"), "batch_sharding", 2),
    ("KV cache [B, H, S, K]", ("B", "H", "S", "K"), "cache_sharding", 4),
)


def rows() -> list[dict[str, Any]]:
    """One row per weight (block 0 standing for every block) and per placed activation: its dimensions' letters,
    logical axes and the mesh axes splitting each ("" where whole)."""
    from jax.sharding import AbstractMesh

    mesh = AbstractMesh(tuple(MESH.values()), tuple(MESH))
    return _weight_rows(mesh) + _activation_rows(mesh)


def _weight_rows(mesh: Any) -> list[dict[str, Any]]:
    """The parameters of the tiny model as the rules shard them."""
    import jax
    from flax import nnx

    from gptjax.backends.jax.model import GPT
    from gptjax.config import get_preset
    from gptjax.sharding import state_shardings
    from gptjax.weights import init_params

    config = get_preset("tiny")
    state = nnx.state(GPT(config, init_params(config)), nnx.Param)
    specs = jax.tree.leaves(state_shardings(state, mesh))
    out = []
    for (path, variable), sharding in zip(nnx.to_flat_state(state), specs):
        if "blocks" in path and path[path.index("blocks") + 1] != 0:
            continue  # every block is sharded as block 0
        axes = variable.get_metadata().get("out_sharding") or ()
        letters = [LETTERS.get(a, str(n)) for a, n in zip(axes, variable.shape)]
        name = ".".join("N" if isinstance(p, int) else p for p in path).replace("blocks.N.", "h.N.")
        out.append({"tensor": f"{name.removesuffix('.kernel.kernel').removesuffix('.kernel')} "
                              f"[{', '.join(letters)}]", "kind": "weight", "dims": letters,
                    "axes": [a or "" for a in axes], "mesh": [_split(s) for s in sharding.spec] + [""] * (
                        len(axes) - len(sharding.spec))})
    return out


def _activation_rows(mesh: Any) -> list[dict[str, Any]]:
    """The activations sharding.py places itself; the others follow XLA's propagation from these and the weights."""
    from gptjax import sharding

    out = []
    for name, letters, function, ndim in ACTIVATIONS:
        spec = getattr(sharding, function)(mesh, ndim).spec
        out.append({"tensor": name, "kind": "activation", "dims": list(letters), "axes": [],
                    "mesh": [_split(s) for s in spec] + [""] * (ndim - len(spec))})
    return out


def _split(entry: Any) -> str:
    """A PartitionSpec entry as 'tensor', 'data+fsdp' or '' (whole)."""
    if entry is None:
        return ""
    return entry if isinstance(entry, str) else "+".join(entry)


def data_hash(table: list[dict[str, Any]]) -> str:
    """The first 12 hex digits of the sha256 of the rows' canonical JSON: the picture's name."""
    return hashlib.sha256(json.dumps(table, sort_keys=True).encode()).hexdigest()[:12]


def plot(table: list[dict[str, Any]], path: str | Path) -> Path:
    """Draw one line per tensor, one box per dimension coloured by the mesh axes splitting it."""
    from gptjax.attention_maps import pyplot

    plt = pyplot()
    from matplotlib.patches import Patch, Rectangle

    fig, ax = plt.subplots(figsize=(10, 0.42 * len(table) + 1.6))
    for i, row in enumerate(table):
        y = len(table) - 1 - i
        ax.text(-0.2, y, row["tensor"], ha="right", va="center", fontsize=9,
                style="italic" if row["kind"] == "activation" else "normal")
        for j, (letter, split) in enumerate(zip(row["dims"], row["mesh"])):
            ax.add_patch(Rectangle((j * 1.6, y - 0.38), 1.5, 0.76, color=COLOURS[split]))
            ax.text(j * 1.6 + 0.75, y, f"{letter}: {split or 'whole'}", ha="center", va="center", fontsize=8)
    ax.set_xlim(-6.5, 4 * 1.6)
    ax.set_ylim(-0.8, len(table) - 0.2)
    ax.axis("off")
    used = {split for row in table for split in row["mesh"]}
    handles = [Patch(color=c, label=f"split over {k}" if k else "whole on every device") for k, c in COLOURS.items()
               if k in used]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=len(handles), fontsize=8, frameon=False)
    mesh = ", ".join(f"{k}={v}" for k, v in MESH.items())
    ax.set_title(f"which mesh axis splits which dimension ({mesh}; from gptjax.sharding's rules)", fontsize=10)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return out


def main(argv: list[str]) -> int:
    """Write DIR/parallelism-<sha12>.png and print its path."""
    if len(argv) != 1:
        raise GptjaxError("usage: python -m gptjax.sharding_diagram DIR (e.g. docs/img)")
    table = rows()
    print(plot(table, Path(argv[0]) / f"parallelism-{data_hash(table)}.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
