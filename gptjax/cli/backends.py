"""`gptjax backends`: the backend names get_backend accepts (built-ins and plugins)."""

from __future__ import annotations

import argparse

from gptjax.backends import available_backends

NAME = "backends"
HELP = "list the available backends (built-in and plugins)"
DESCRIPTION = None


def add_arguments(p: argparse.ArgumentParser) -> None:
    """`gptjax backends` takes only the common flags."""


def run(args: argparse.Namespace) -> int:
    """Print one backend name per line."""
    print("\n".join(available_backends()))
    return 0
