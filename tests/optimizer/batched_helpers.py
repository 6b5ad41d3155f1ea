"""The error measure shared by the ``test_batched_*.py`` modules."""

from __future__ import annotations

import numpy as np


def _relative_error(actual, expected):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-300)
