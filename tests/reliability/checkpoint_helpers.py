"""Trees and a helper shared by the checkpoint safety tests (``test_checkpoint_*.py``)."""

from __future__ import annotations

import os

import numpy as np

OLD = {"w": np.arange(12, dtype=np.float32).reshape(4, 3), "b": np.ones(3, np.float32)}
NEW = {"w": -np.arange(12, dtype=np.float32).reshape(4, 3), "b": np.zeros(3, np.float32)}


def _hidden_leftovers(path) -> list[str]:
    parent, name = os.path.split(os.fspath(path))
    return sorted(n for n in os.listdir(parent) if n.startswith(f".{name}.") or ".orbax" in n)
