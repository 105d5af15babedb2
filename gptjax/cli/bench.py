"""`gptjax bench`: the benchmark suite (its flags and modes live in gptjax.bench.command)."""

from __future__ import annotations

import argparse

from gptjax.bench import command

NAME = "bench"
HELP = ("benchmark suite: prefill, decode, train step per precision, with measured ceilings, MFU, bandwidth use "
        "and an optional HF peer")
DESCRIPTION = ("Measure ceilings (matmul FLOP/s per dtype, memory bandwidth) and then each workload on whatever "
               "platform JAX sees; write results.jsonl, results.md and plots.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of `gptjax bench`."""
    command.add_arguments(p)


def run(args: argparse.Namespace) -> int:
    """Run the suite, --compare or --device-check."""
    return command.main(args)
