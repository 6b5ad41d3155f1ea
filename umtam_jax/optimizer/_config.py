"""Hyper-parameters of UMTAM: the frozen :class:`Config`, its validation at construction,
and the quantities that derive from the hyper-parameters alone (compute dtype, bias
corrections)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from umtam_jax._precision import at_least_float32
from umtam_jax.optimizer._layout import RowAxesFn
from umtam_jax.optimizer._lowrank import SVD_METHODS


@dataclasses.dataclass(frozen=True)
class Config:
    """The options of :func:`umtam_jax.scale_by_umtam`, resolved (``row_axes`` and
    ``max_rank`` defaulted, ``saliency`` read as ``track_saliency``, ``buffer_dtype`` a
    dtype or ``None``)."""

    rank: int
    b1: float
    b2: float
    eps: float
    error_decay: float
    clip_threshold: float | None
    saliency_decay: float
    svd_method: str
    svd_every: int
    oversampling: int
    power_iterations: int
    min_dim_size_to_factor: int
    row_axes: RowAxesFn
    bias_correction: bool
    track_saliency: bool
    buffer_dtype: Any
    adaptive_rank: bool
    max_rank: int
    min_rank: int
    rank_step: int
    rank_update_every: int
    rank_grow_threshold: float
    rank_shrink_threshold: float
    seed: int
    group_leaves: bool = False

    def __post_init__(self) -> None:
        # NumPy integers, bools and reals stand for Python ones (as optax's options take
        # them): a float64 one would otherwise turn float32 computations into float64
        # ones under jax_enable_x64. 16-bit reals are left to validate, which refuses them.
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, np.integer | np.bool_):
                object.__setattr__(self, field.name, value.item())
            elif (
                isinstance(value, np.generic | np.ndarray)
                and np.ndim(value) == 0
                and np.issubdtype(value.dtype, np.floating)
                and value.dtype.itemsize >= 4
            ):
                object.__setattr__(self, field.name, float(value))


#: The real-valued hyper-parameters (``optax.inject_hyperparams`` may trace them).
FLOAT_HYPERPARAMS = (
    "b1",
    "b2",
    "eps",
    "error_decay",
    "clip_threshold",
    "saliency_decay",
    "rank_grow_threshold",
    "rank_shrink_threshold",
)


def in_dtype(cfg: Config, dtype: Any) -> Config:
    """``cfg`` with its array-valued real hyper-parameters (injected ones) in ``dtype``,
    a leaf's compute dtype: a float64 one injected for a mixed tree would otherwise make
    a float32 leaf's computations float64 (and the branches of its conditionals differ)."""
    changes: dict[str, Any] = {
        name: jnp.asarray(value, dtype)
        for name in FLOAT_HYPERPARAMS
        if isinstance(value := getattr(cfg, name), jax.Array | np.ndarray | np.generic)
    }
    return dataclasses.replace(cfg, **changes) if changes else cfg


SEED_RANGE = (-(2**63), 2**63 - 1)
"""The seeds ``jax.random.key`` accepts (a C long)."""

# The integer options: each fixes array shapes or a loop.
_INTEGERS = (
    "rank",
    "svd_every",
    "min_dim_size_to_factor",
    "oversampling",
    "power_iterations",
    "max_rank",
    "min_rank",
    "rank_step",
    "rank_update_every",
    "seed",
)
STATIC_HYPERPARAMS = (
    *_INTEGERS,
    "row_axes",
    "group_leaves",
    "buffer_dtype",
    "error_decay",
    "mask",
)
"""Arguments that fix array shapes, dtypes or control flow (integers, the ``row_axes``
callable, ``buffer_dtype`` and a callable weight-decay ``mask`` (``inject_hyperparams``
would take any callable for a schedule of the step), and ``error_decay``, whose value 0
drops the m×n momentum buffer from the state): pass
``optax.inject_hyperparams(umtam, static_args=STATIC_HYPERPARAMS)``. ``scale_by_umtam``
takes no weight decay: for it, ``[n for n in STATIC_HYPERPARAMS if n != "mask"]``."""


def check(condition: bool, message: str) -> None:
    """Raises ``ValueError(message)`` unless ``condition``."""
    if not condition:
        raise ValueError(message)


def concrete(name: str, value: Any) -> float | None:
    """The value of the real-valued hyper-parameter ``name``, or ``None`` when it is traced
    (``optax.inject_hyperparams``).

    Raises:
      TypeError: ``value`` is neither a Python int or float nor a NumPy / JAX scalar
        (0-d, real dtype), traced ones included.
    """
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    is_scalar = (
        isinstance(value, jax.Array | np.ndarray | np.generic)
        and np.ndim(value) == 0
        and (jnp.issubdtype(value.dtype, jnp.floating) or jnp.issubdtype(value.dtype, jnp.integer))
    )
    if not (is_number or is_scalar):
        raise TypeError(
            f"{name} must be a real number (a Python int or float, or a NumPy / JAX scalar), "
            f"got {value!r} ({type(value).__name__})"
        )
    coarse = is_scalar and jnp.issubdtype(value.dtype, jnp.floating) and value.dtype.itemsize < 4
    if coarse and name in FLOAT_HYPERPARAMS:  # the learning rate is applied by Optax
        raise TypeError(
            f"{name} is a {value.dtype} scalar: 16-bit floats are too coarse for UMTAM's "
            "hyper-parameters (b2=0.999 rounds to 1.0 in bfloat16, eps=1e-8 to 0.0 in "
            "float16); pass a Python float, and to optax.inject_hyperparams, which gives "
            "them the parameters' dtype, hyperparam_dtype=jnp.float32"
        )
    if isinstance(value, jax.core.Tracer):
        return None
    return float(value)


def _check_range(name: str, value: Any, low: float, high: float, high_open: bool) -> None:
    v = concrete(name, value)
    if v is None:
        return
    ok = low <= v < high if high_open else low <= v <= high
    bracket = ")" if high_open else "]"
    check(ok, f"{name} must be in [{low}, {high}{bracket}, got {value!r}")


def as_dtype(value: Any) -> Any:
    """``buffer_dtype`` as a ``jnp.dtype`` (``None`` stays ``None``)."""
    if value is None:
        return None
    try:
        return jnp.dtype(value)
    except TypeError:
        raise TypeError(f"buffer_dtype must be a dtype, got {value!r}") from None


def validate(cfg: Config) -> None:
    """Checks every option; traced (injected) float hyper-parameters are skipped.

    Raises:
      TypeError: a static option is not a Python int, ``row_axes`` is not callable,
        ``bias_correction`` / ``adaptive_rank`` / ``group_leaves`` is not a bool, a float
        option is not a real number (:func:`concrete`), or ``buffer_dtype`` is not
        floating-point.
      ValueError: an option is out of its range, or ``min_rank`` / ``max_rank`` is given
        without ``adaptive_rank``.
    """
    if not callable(cfg.row_axes):
        raise TypeError(
            "row_axes must be a callable (key_path, shape) -> int | MatrixAxes (e.g. "
            f"umtam_jax.scanned(...)) or None, got {cfg.row_axes!r} "
            f"({type(cfg.row_axes).__name__})"
        )
    for name in ("bias_correction", "adaptive_rank", "group_leaves"):
        value = getattr(cfg, name)
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False, got {value!r}")
    for name in _INTEGERS:
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(
                f"{name} must be a Python int (it fixes array shapes), got {value!r}; with "
                "optax.inject_hyperparams pass static_args=umtam_jax.STATIC_HYPERPARAMS "
                "(for scale_by_umtam, those of them but 'mask')"
            )
    low, high = SEED_RANGE
    check(low <= cfg.seed <= high, f"seed must fit in a 64-bit signed int, got {cfg.seed!r}")
    # Compared with the int32 step counter, or array sizes; max_rank defaults to 2 · rank,
    # read only with adaptive_rank.
    for name in set(_INTEGERS) - {"seed", *(() if cfg.adaptive_rank else ("max_rank",))}:
        value = getattr(cfg, name)
        check(value < 2**31, f"{name} must be < 2**31, got {value!r}")
    check(cfg.rank >= 1, f"rank must be ≥ 1, got {cfg.rank!r}")
    for name in ("b1", "b2", "saliency_decay"):
        _check_range(name, getattr(cfg, name), 0.0, 1.0, high_open=True)
    _check_range("error_decay", cfg.error_decay, 0.0, 1.0, high_open=False)
    eps = concrete("eps", cfg.eps)
    check(
        eps is None or (eps > 0.0 and math.isfinite(eps)),
        f"eps must be finite and > 0, got {cfg.eps!r}",
    )
    clip = None if cfg.clip_threshold is None else concrete("clip_threshold", cfg.clip_threshold)
    check(
        clip is None or (clip > 0.0 and math.isfinite(clip)),
        f"clip_threshold must be finite and > 0, or None, got {cfg.clip_threshold!r}",
    )
    if cfg.buffer_dtype is not None and not is_wide_float(cfg.buffer_dtype):
        raise TypeError(
            f"buffer_dtype must be a real floating-point dtype of 16 bits or more (e.g. "
            f"jnp.bfloat16), got {jnp.dtype(cfg.buffer_dtype)}: the momentum and saliency "
            "buffers are stored in it"
        )
    if cfg.buffer_dtype is not None and jnp.finfo(cfg.buffer_dtype).nexp < 8:
        raise TypeError(
            f"buffer_dtype {jnp.dtype(cfg.buffer_dtype)} has a narrower range than float32: "
            "the saliency of a fine-tuning run (often below 1e-8) would round to 0 and a "
            "large momentum overflow to inf; use jnp.bfloat16 (float32's range) or float32"
        )
    check(
        cfg.svd_method in SVD_METHODS,
        f"unknown svd_method {cfg.svd_method!r}; expected one of {SVD_METHODS}",
    )
    check(cfg.svd_every >= 1, f"svd_every must be ≥ 1, got {cfg.svd_every!r}")
    check(cfg.oversampling >= 0, f"oversampling must be ≥ 0, got {cfg.oversampling!r}")
    check(cfg.power_iterations >= 0, f"power_iterations must be ≥ 0, got {cfg.power_iterations!r}")
    check(
        cfg.min_dim_size_to_factor >= 1,
        f"min_dim_size_to_factor must be ≥ 1, got {cfg.min_dim_size_to_factor!r}",
    )
    # The adaptive-rank options are checked whether or not adaptive_rank is on: a wrong
    # one is a mistake either way.
    for name in ("min_rank", "max_rank", "rank_step", "rank_update_every"):
        check(getattr(cfg, name) >= 1, f"{name} must be ≥ 1, got {getattr(cfg, name)!r}")
    if cfg.adaptive_rank:
        check(
            cfg.min_rank <= cfg.rank <= cfg.max_rank,
            "adaptive rank needs 1 ≤ min_rank ≤ rank ≤ max_rank, got "
            f"min_rank={cfg.min_rank}, rank={cfg.rank}, max_rank={cfg.max_rank}",
        )
    else:  # refused, not ignored; max_rank is resolved already (its default is 2 · rank)
        for name, value, default in (
            ("min_rank", cfg.min_rank, 1),
            ("max_rank", cfg.max_rank, 2 * cfg.rank),
        ):
            check(
                value == default,
                f"{name}={value!r} given without adaptive_rank=True: min_rank/max_rank "
                "take effect only with adaptive_rank=True (pass it, or leave them out)",
            )

    def threshold(name: str) -> float | None:
        value = getattr(cfg, name)
        if value is None and not cfg.adaptive_rank:
            return None  # left out: only adaptive_rank reads it
        return concrete(name, value)

    grow, shrink = threshold("rank_grow_threshold"), threshold("rank_shrink_threshold")
    check(
        grow is None or grow > 1.0,
        f"rank_grow_threshold must be > 1, got {cfg.rank_grow_threshold!r}",
    )
    check(
        shrink is None or 0.0 < shrink < 1.0,
        f"rank_shrink_threshold must be in (0, 1), got {cfg.rank_shrink_threshold!r}",
    )


def is_wide_float(dtype: Any) -> bool:
    """Whether ``dtype`` is a real floating-point dtype of 16 bits or more (float8 and
    narrower types take part in no implicit promotion, and hold no optimizer statistics)."""
    return jnp.issubdtype(dtype, jnp.floating) and jnp.dtype(dtype).itemsize >= 2


def is_static_zero(value: Any) -> bool:
    """True for a Python number equal to 0 (a traced or array value is never static)."""
    return isinstance(value, int | float) and value == 0


def compute_dtype(dtype: Any) -> Any:
    """The dtype a parameter's statistics are computed in: at least float32."""
    return at_least_float32(dtype)


def bias_corrections(cfg: Config, count: jax.Array, dtype: Any) -> tuple[Any, Any]:
    """The divisors ``(1 − b1^t, 1 − b2^t)`` of step ``t = count`` (``(1, 1)`` without
    ``bias_correction``)."""
    if not cfg.bias_correction:
        return 1.0, 1.0
    t = count.astype(dtype)
    return 1.0 - cfg.b1**t, 1.0 - cfg.b2**t
