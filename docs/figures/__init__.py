"""The figures of the docs, one module per chapter; importing this package registers every block and picture
in figures.common.BLOCKS and PLOTS (docs/render.py is the engine that renders them)."""

from figures import evaluation, frontier, int4, monitoring, peers, precision, provenance, speculative, suite  # noqa: F401 (registers)
from figures.common import BLOCKS, PLOTS

__all__ = ["BLOCKS", "PLOTS"]
