"""Focused studies on the suite's harness, one lever each: `gptjax bench --study NAME [its flags]`.

Each study module has a docstring (its --help), FLAGS (its flags), run(args, log) -> Outcome and, where
needed, prepare(args): it checks flag values (a GptjaxError) and sets what must be set before JAX starts. The
runner here parses its flags, opens the results directory (DIR/results.jsonl in the suite's schema: an
environment row with the study's arguments, then one "study" row per measurement; DIR/results.md with its
table) and writes what the study measured."""

from __future__ import annotations

import argparse
import importlib
import time
from collections.abc import Sequence
from typing import Any

from gptjax.bench.results import open_results
from gptjax.errors import GptjaxError
from gptjax.timing import load_average

# --study name -> module in this package
STUDIES = {"long-decode": "long_decode", "kv-cache": "kv_cache", "scaling": "scaling", "serve-load": "serve_load",
           "tracing-overhead": "tracing_overhead", "load-memory": "load_memory", "monitoring": "monitoring",
           "speculative": "speculative", "int4": "int4", "lm-eval": "lm_eval", "frontier": "frontier",
           "quality": "quality"}


def parser(name: str) -> argparse.ArgumentParser:
    """The flags of one study (its module's docstring is the --help text), with --out."""
    module = _module(name)
    p = argparse.ArgumentParser(prog=f"gptjax bench --study {name}", description=module.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag, (default, text, *choices) in module.FLAGS.items():
        p.add_argument(flag, type=type(default) if default is not None else str, default=default,
                       choices=choices[0] if choices else None,
                       help=text if default is None else f"{text} (default {default})")
    p.add_argument("--out", metavar="DIR", help=f"results directory (default runs/{name}-<time>): results.jsonl, "
                   "results.md")
    return p


def main(argv: Sequence[str], out: str | None = None, log: Any = print) -> int:
    """Run `gptjax bench --study NAME FLAGS...`: argv is NAME and its flags; out the default --out."""
    if not argv or argv[0] not in STUDIES:
        given = repr(argv[0]) if argv else "nothing"
        raise GptjaxError(f"--study {given}; allowed: {', '.join(STUDIES)} (then --help for its flags)")
    name = argv[0]
    args = parser(name).parse_args(list(argv[1:]))
    module = _module(name)
    if hasattr(module, "prepare"):  # before the results directory is made and JAX starts
        module.prepare(args)
    args.out = args.out or out or time.strftime(f"runs/{name}-%Y%m%d-%H%M%S")
    arguments = {k: v for k, v in vars(args).items() if k != "out"}
    results = open_results(args.out, log, study=name, args=arguments)
    outcome = module.run(args, log)
    results.write([{"kind": "study", "study": name, "load_avg_1m": load_average()} | row for row in outcome.rows])
    results.finish(outcome.title, outcome.table, log)
    return outcome.status


def _module(name: str) -> Any:
    return importlib.import_module(f"gptjax.bench.studies.{STUDIES[name]}")
