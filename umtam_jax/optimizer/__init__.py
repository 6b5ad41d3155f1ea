"""The UMTAM optimizer (Algorithm 1) as Optax gradient transformations."""

from umtam_jax.optimizer._alias import umtam
from umtam_jax.optimizer._config import STATIC_HYPERPARAMS
from umtam_jax.optimizer._layout import MatrixAxes, default_row_axes, scanned
from umtam_jax.optimizer._lowrank import SVD_METHODS
from umtam_jax.optimizer._sharding import state_shardings
from umtam_jax.optimizer._state import (
    DenseLeafState,
    DenseStatistics,
    FactoredLeafState,
    FactoredStatistics,
    ScaleByUmtamState,
)
from umtam_jax.optimizer._statistics import (
    NoUmtamStateError,
    curvature,
    momentum,
    saliency,
    statistics,
)
from umtam_jax.optimizer._transform import scale_by_umtam

__all__ = [
    "STATIC_HYPERPARAMS",
    "SVD_METHODS",
    "DenseLeafState",
    "DenseStatistics",
    "FactoredLeafState",
    "FactoredStatistics",
    "MatrixAxes",
    "NoUmtamStateError",
    "ScaleByUmtamState",
    "curvature",
    "default_row_axes",
    "momentum",
    "saliency",
    "scale_by_umtam",
    "scanned",
    "state_shardings",
    "statistics",
    "umtam",
]
