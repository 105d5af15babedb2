"""The predicates the boundary checks share: what counts as an integer and as a finite real number."""

from __future__ import annotations

import math
import numbers

import numpy as np


def is_int(x: object) -> bool:
    """An integer (Python or NumPy), not a bool."""
    return isinstance(x, numbers.Integral) and not isinstance(x, (bool, np.bool_))


def is_real(x: object) -> bool:
    """A finite real number (int or float, Python or NumPy), not a bool; an int too large for a float is not."""
    if not isinstance(x, numbers.Real) or isinstance(x, (bool, np.bool_)):
        return False
    try:
        return math.isfinite(x)
    except OverflowError:  # math.isfinite(10**400) converts to float first
        return False
