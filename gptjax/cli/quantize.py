"""`gptjax quantize`: write a checkpoint in a storage of gptjax.precision, or report every mode's trade-off."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from gptjax import data
from gptjax import precision as registry
from gptjax.cli.evaluate import validation_tokens
from gptjax.cli.options import QUANTIZED_CHECKPOINTS, seq_len
from gptjax.errors import GptjaxError, os_cause
from gptjax.precision_report import DEFAULT_MODES, report, table
from gptjax.quantize import convert
from gptjax.weights import load_checkpoint, save_checkpoint, stored_precision

NAME = "quantize"
_SCALED = [s for s in registry.STORAGES.values() if s.scaled]
HELP = f"write a {'/'.join(QUANTIZED_CHECKPOINTS)} checkpoint, or report every precision mode's trade-off"
DESCRIPTION = (f"--to {'|'.join(QUANTIZED_CHECKPOINTS)} --out DIR writes a quantised checkpoint (" + "; ".join(
    f"{name}: {next(m for m in registry.MODES.values() if m.storage == name).description}"
    for name in QUANTIZED_CHECKPOINTS) + "); the mode and group size are recorded in the safetensors metadata and "
    f"loading never quantises again. --report measures {', '.join(m.label for m in DEFAULT_MODES)} on the same "
    "validation windows: bytes, loss/perplexity change, top-1 agreement, logit error, prefill and decode tokens/s.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of `gptjax quantize`."""
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="a float checkpoint")
    p.add_argument("--to", choices=QUANTIZED_CHECKPOINTS, help="write the checkpoint in this precision")
    p.add_argument("--out", metavar="DIR", help="where --to writes (never the source)")
    p.add_argument("--group-size", type=int, metavar="G", help=_group_size_help())
    p.add_argument("--keep-head", action="store_true", help=_keep_head_help())
    p.add_argument("--report", action="store_true", help="print the precision report instead of writing")
    p.add_argument("--data", metavar="SPEC", help="report: validation text, as for train (default stdlib)")
    p.add_argument("--val-fraction", type=float, default=0.05, help="report: as the run used (default 0.05)")
    p.add_argument("--seq-len", type=int, metavar="T", help="report: window length (default: the context)")
    p.add_argument("--windows", type=int, default=64, metavar="N", help="report: validation windows (default 64)")
    p.add_argument("--runs", type=int, default=5, metavar="N", help="report: timed runs per mode (default 5)")
    p.add_argument("--no-speed", action="store_true", help="report: quality and bytes only")
    p.add_argument("--json", metavar="FILE", help="report: also write one JSON line per mode")


def _group_size_help() -> str:
    """--group-size's help, per scaled storage of the registry."""
    allowed = ", ".join(map(str, registry.INT4_GROUP_SIZES))
    return "one scale per G inputs of each output channel; " + "; ".join(
        f"{s.name}: G in {allowed} (default {s.group_size})" if s.bits < 8
        else f"{s.name}: any G dividing the input widths (default: one per channel)" for s in _SCALED)


def _keep_head_help() -> str:
    """--keep-head's help: the storage each scaled storage keeps the head in."""
    return "store the (tied) embedding/LM head in another storage: " + ", ".join(
        f"{s.name}: {s.head_storage}{' per row' if registry.STORAGES[s.head_storage].scaled else ''}" for s in _SCALED)


def run(args: argparse.Namespace) -> int:
    """Write the quantised checkpoint (--to, --out) or print the report (--report)."""
    if (args.to is None) == (not args.report):
        raise GptjaxError("give --to MODE --out DIR (write a quantised checkpoint) or --report (measure every mode)")
    stored = stored_precision(args.checkpoint)
    if stored != "fp32":
        raise GptjaxError(f"{args.checkpoint} is already a {stored} checkpoint; quantise from float weights")
    return _report(args) if args.report else _write(args)


def _write(args: argparse.Namespace) -> int:
    if not args.out:
        raise GptjaxError("--to needs --out DIR (the quantised checkpoint; the source is never overwritten)")
    source, out = Path(args.checkpoint).resolve(), Path(args.out).resolve()
    _check_out(args.out, source, out)
    config, params = load_checkpoint(source)
    quantised = convert(params, config, args.to, group_size=args.group_size, keep_head=args.keep_head)
    group_size = registry.group_size(args.to, args.group_size, (config.n_embd, config.mlp_width))  # int4's default
    metadata = {"gptjax.group_size": str(group_size or 0), "gptjax.keep_head": str(args.keep_head).lower()}
    try:  # save_checkpoint writes a temporary directory and swaps it in: a failure leaves nothing behind
        save_checkpoint(config, quantised, out, metadata=metadata, extra_files_from=source)
    except OSError as e:  # a read-only or full disk, no permission: not a bug to show a traceback for
        print(f"gptjax quantize: cannot write {out}: {os_cause(e)}", file=sys.stderr)
        return 1
    before = sum(np.asarray(v).nbytes for v in params.values())
    after = sum(np.asarray(v).nbytes for v in quantised.values())
    head = registry.STORAGES[args.to].head_storage
    print(f"wrote {out} ({args.to}{f', groups of {group_size}' if group_size else ''}"
          f"{f', head kept {head}' if args.keep_head else ''}): weights {after / 1e6:.2f} MB = "
          f"{after / before:.3f} x float32's {before / 1e6:.2f} MB")
    return 0


# what --out may already hold: a checkpoint an earlier `gptjax quantize` (or save_checkpoint) wrote, which the
# new one replaces; anything else might be someone's data, and save_checkpoint swaps the whole directory
_REPLACEABLE = {"config.json", "model.safetensors", "tokenizer.json", "vocab.json", "merges.txt",
                "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"}


def _check_out(given: str, source: Path, out: Path) -> None:
    """--out must be new, empty, or a previous gptjax checkpoint; never the source, inside it, or above it."""
    if out == source or source in out.parents:
        raise GptjaxError(f"--out {given!r} is the source checkpoint or inside it; write the quantised one "
                          "elsewhere")
    if out in source.parents:
        raise GptjaxError(f"--out {given!r} holds the source checkpoint; give a new or empty directory")
    if out.exists() and not out.is_dir():
        raise GptjaxError(f"--out {given!r} is a file; give a new or empty directory")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in _REPLACEABLE) if out.exists() else []
    if foreign:
        raise GptjaxError(f"--out {given!r} holds {foreign[:5]}{' ...' if len(foreign) > 5 else ''}, which is not "
                          "a gptjax checkpoint; give a new or empty directory (nothing was written)")


def _report(args: argparse.Namespace) -> int:
    config, params = load_checkpoint(args.checkpoint)
    if args.runs < 1 or args.windows < 1 or (args.seq_len is not None and args.seq_len < 2):
        raise GptjaxError(f"--runs {args.runs} and --windows {args.windows} must be >= 1, --seq-len >= 2")
    tokens, _ = validation_tokens(args, config)
    T = seq_len(args.seq_len, config)
    windows = data.eval_windows(tokens, T, args.windows)
    timing = None if args.no_speed else {"prompt": min(32, config.n_positions // 2),
                                         "new_tokens": min(32, config.n_positions // 2), "runs": args.runs}
    modes = [m for m in DEFAULT_MODES  # a group size (int4: its default too) must divide both input widths
             if not (g := registry.group_size(registry.storage(m.precision), m.group_size))
             or (config.n_embd % g == 0 and config.mlp_width % g == 0)]
    rows = report(config, params, windows, modes, timing=timing,
                  progress=lambda m: print(f"  timing {m}", file=sys.stderr, flush=True))
    print(f"{args.checkpoint}: {len(windows)} validation windows of {T} tokens ({windows[:, 1:].size:,} "
          f"predictions); quality vs fp32 on the JAX backend; speed: median of {args.runs} interleaved runs\n")
    print(table(rows))
    if args.json:
        Path(args.json).write_text("\n".join(json.dumps(r.as_dict()) for r in rows) + "\n", encoding="utf-8")
    return 0
