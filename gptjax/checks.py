"""The predicates the boundary checks share: what counts as an integer and as a finite real number."""

from __future__ import annotations

import math
import numbers

import numpy as np


def is_int(x: object) -> bool:
    """An integer (Python or NumPy), not a bool."""
    return isinstance(x, numbers.Integral) and not isinstance(x, (bool, np.bool_))


def is_real(x: object) -> bool:
    """A finite real number (int or float, Python or NumPy), not a bool."""
    return isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_)) and math.isfinite(x)
