"""The `gptjax` command: `train`, `distill`, `eval`, `generate`, `serve`, `quantize`, `info` (size calculator), `demo`,
`backends`, `bench`, `export`.

One module per command, each with NAME, HELP, DESCRIPTION, add_arguments(parser) and run(args) -> exit status;
the logic they call lives in the library. Modules that take seconds to import (jax, flax, optax, orbax; the
serve extra) are imported inside the commands that need them, so `gptjax --help` and `gptjax info` start fast.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from gptjax import __version__
from gptjax.cli import backends, bench, demo, distill, evaluate, export, generate, info, quantize, serve, train
from gptjax.cli.options import common_parser
from gptjax.errors import GptjaxError
from gptjax.tracing.setup import EXPORTERS, configure

COMMANDS = (info, demo, generate, train, distill, evaluate, quantize, export, serve, backends, bench)  # in --help's order


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `gptjax` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    provider = None
    try:
        provider = _telemetry(args)
        return args.func(args) or 0
    except GptjaxError as e:
        print(f"gptjax {args.command}: error: {e}", file=sys.stderr)
        return 2
    finally:
        if provider is not None:
            provider.shutdown()  # flush the spans of this command


def build_parser() -> argparse.ArgumentParser:
    """The parser: the common flags, then one subcommand per module in COMMANDS."""
    p = argparse.ArgumentParser(prog="gptjax", description=__doc__.split(":", 1)[0] + ": GPT-2 in NumPy and "
                                "Flax NNX, with every LLM performance lever measurable.")
    p.add_argument("--version", action="version", version=f"gptjax {__version__}")
    sub = p.add_subparsers(dest="command", title="commands", metavar="COMMAND")
    common = common_parser()  # every command takes --trace/--log-format
    for command in COMMANDS:
        parser = sub.add_parser(command.NAME, parents=[common], help=command.HELP, description=command.DESCRIPTION)
        command.add_arguments(parser)
        parser.set_defaults(func=command.run)
    return p


def _telemetry(args: argparse.Namespace) -> Any:
    """Configure tracing and log format from the common flags; the provider to flush at exit (or None)."""
    trace = args.trace
    if trace is None and args.log_format == "text" and not os.environ.get("OTEL_TRACES_EXPORTER"):
        return None  # the common case: configure (and import) no SDK
    if trace and trace not in EXPORTERS and os.path.sep not in trace and not trace.endswith(".jsonl"):
        raise GptjaxError(f"--trace {trace!r}: give an exporter ({', '.join(EXPORTERS)}) or a file path "
                          "ending in .jsonl (or containing a /)")
    exporter, path = (trace, None) if trace in EXPORTERS else (("jsonl", trace) if trace else (None, None))
    return configure(exporter, path=path, json_logs=args.log_format == "json")
