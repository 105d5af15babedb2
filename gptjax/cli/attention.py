"""`gptjax attention`: draw what every head of a checkpoint attends to on a prompt (the NumPy oracle's weights)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gptjax import attention_maps
from gptjax.bench.env import git_commit
from gptjax.errors import GptjaxError, os_cause
from gptjax.version import __version__

NAME = "attention"
HELP = "draw the attention maps (layers x heads) of a checkpoint on a prompt"
DESCRIPTION = ("Run the NumPy oracle on --prompt with return_attention and draw every layer's and head's "
               "softmax(QK^T/sqrt(K) + M) weights as a grid of heat maps (rows: layers, columns: heads; token labels "
               "on the axes). --json also writes the weights (4 decimals) as JSON lines, the first stamped with "
               "the commit. Example: gptjax attention --checkpoint tests/fixtures/trained_byte_tiny --prompt "
               "'def add(a, b):' --out attention.png")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of `gptjax attention`."""
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="a float checkpoint directory: "
                   "runs/<timestamp>/model (what `gptjax train` writes) or tests/fixtures/trained_byte_tiny")
    p.add_argument("--prompt", required=True, metavar="TEXT", help="the text to look at (at most the context's "
                   "tokens; up to 48 are all named on the axes)")
    p.add_argument("--out", required=True, metavar="PNG", help="the picture to write")
    p.add_argument("--json", metavar="FILE", help="also write the weights as JSON lines (an environment row, then "
                   "one attention row)")


def run(args: argparse.Namespace) -> int:
    """Compute the maps, draw them, and write the JSON when asked."""
    row = attention_maps.to_row(attention_maps.from_checkpoint(args.checkpoint, args.prompt))
    maps = attention_maps.from_row(row)  # the picture is drawn from the data --json writes (4 decimals)
    try:
        out = attention_maps.plot(maps, args.out)
        if args.json:
            _write_json(Path(args.json), row)
    except OSError as e:
        raise GptjaxError(f"cannot write {e.filename or args.out}: {os_cause(e)}") from None
    L, H, T, _ = maps.weights.shape
    print(f"{out}: {L} layers x {H} heads over {T} tokens" + (f"; data in {args.json}" if args.json else ""))
    return 0


def _write_json(path: Path, row: dict) -> None:
    """An environment row (commit, version) and the maps' row, one JSON object a line."""
    env = {"kind": "environment", "env": {"git": git_commit(), "gptjax": __version__}, "data_hash":
           attention_maps.data_hash(row)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in (env, row)), encoding="utf-8")
