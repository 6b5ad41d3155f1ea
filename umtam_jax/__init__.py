"""umtam_jax: UMTAM training and model merging for JAX/Optax.

The optimizer (``umtam``, ``scale_by_umtam``) keeps per-parameter low-rank momentum,
factored second moments and saliency; ``statistics``/``saliency``/``curvature``/``momentum``
read them back for merging (``umtam_jax.merging``) and checkpoints (``umtam_jax.checkpoint``).
"""

import types
from typing import TYPE_CHECKING

from umtam_jax.optimizer import (
    STATIC_HYPERPARAMS,
    DenseLeafState,
    DenseStatistics,
    FactoredLeafState,
    FactoredStatistics,
    MatrixAxes,
    NoUmtamStateError,
    ScaleByUmtamState,
    curvature,
    default_row_axes,
    momentum,
    saliency,
    scale_by_umtam,
    scanned,
    state_shardings,
    statistics,
    umtam,
)

__version__ = "0.1.0"

_SUBMODULES = ("checkpoint", "engine", "experiments", "merging")


if TYPE_CHECKING:  # what the lazy attributes below are, for type checkers
    from umtam_jax import checkpoint, engine, experiments, merging  # noqa: F401


def __getattr__(name: str) -> types.ModuleType:
    # Lazy submodules: ``import umtam_jax`` stays light (no Orbax import) until used.
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f"umtam_jax.{name}")
    raise AttributeError(f"module 'umtam_jax' has no attribute {name!r}")


__all__ = [
    "STATIC_HYPERPARAMS",
    "DenseLeafState",
    "DenseStatistics",
    "FactoredLeafState",
    "FactoredStatistics",
    "MatrixAxes",
    "NoUmtamStateError",
    "ScaleByUmtamState",
    "checkpoint",
    "engine",
    "experiments",
    "curvature",
    "default_row_axes",
    "merging",
    "momentum",
    "saliency",
    "scale_by_umtam",
    "scanned",
    "state_shardings",
    "statistics",
    "umtam",
]
