"""The :func:`umtam` optimizer: :func:`scale_by_umtam` chained with decoupled weight decay
and the learning rate, as Optax's aliases are built."""

from __future__ import annotations

import math
from typing import Any, Literal

import jax
import numpy as np
import optax

from umtam_jax.optimizer._config import check, concrete
from umtam_jax.optimizer._layout import RowAxesFn
from umtam_jax.optimizer._transform import scale_by_umtam


def _check_learning_rate(value: Any) -> None:
    """A float, a 0-d array (or traced value) or an Optax schedule; finite when concrete."""
    if callable(value):
        return
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    is_scalar_array = isinstance(value, jax.Array | np.ndarray | np.generic) and not np.shape(value)
    if not (is_number or is_scalar_array):
        raise TypeError(
            "learning_rate must be a float, a scalar array or an optax schedule (a "
            f"callable of the step), got {value!r} ({type(value).__name__})"
        )


def umtam(
    learning_rate: optax.ScalarOrSchedule,
    *,
    rank: int = 32,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    error_decay: float = 0.9,
    clip_threshold: float | None = 1.0,
    saliency_decay: float = 0.9,
    weight_decay: float = 0.0,
    mask: Any = None,
    svd_method: Literal["exact", "subspace"] = "subspace",
    svd_every: int = 1,
    min_dim_size_to_factor: int = 128,
    oversampling: int = 0,
    power_iterations: int = 0,
    row_axes: RowAxesFn | None = None,
    bias_correction: bool = False,
    saliency: Literal["tracked", "final"] = "tracked",
    buffer_dtype: Any = None,
    adaptive_rank: bool = False,
    max_rank: int | None = None,
    min_rank: int = 1,
    rank_step: int = 4,
    rank_update_every: int = 100,
    rank_grow_threshold: float = 1.5,
    rank_shrink_threshold: float = 0.5,
    seed: int = 0,
    group_leaves: bool = False,
) -> optax.GradientTransformation:
    """The UMTAM optimizer: ``chain(scale_by_umtam, add_decayed_weights, scale_by_learning_rate)``.

    With ``learning_rate=1`` and ``weight_decay=0`` the update is exactly ``−D`` of
    docs/algorithm.md §2.2. The state keeps, per parameter, what model merging needs
    (momentum factors, factored second moments, saliency): read it with
    :func:`umtam_jax.statistics`.

    Args:
      learning_rate: a float or an Optax schedule.
      rank: momentum rank r.
      b1: momentum decay.
      b2: second-moment decay.
      eps: base regulariser of the preconditioner.
      error_decay: error-feedback weight γ (0: no m×n momentum buffer).
      clip_threshold: per-parameter gradient-norm clipping (``None``: off).
      saliency_decay: saliency EMA decay α.
      weight_decay: decoupled weight decay, applied as in ``optax.adamw``.
      mask: pytree or callable choosing the parameters that receive weight decay.
      svd_method: ``"exact"`` or ``"subspace"`` (default, warm-started range finder).
      svd_every: fresh decomposition period (core re-projection in between).
      min_dim_size_to_factor: smallest side of a factored parameter.
      oversampling, power_iterations, row_axes, bias_correction, saliency, buffer_dtype,
        adaptive_rank, max_rank, min_rank, rank_step, rank_update_every,
        rank_grow_threshold, rank_shrink_threshold, seed, group_leaves: as in
        :func:`scale_by_umtam`.

    Returns:
      An ``optax.GradientTransformation``.

    Raises:
      TypeError / ValueError: an invalid option, at construction (the message names it).

    Example:
      >>> import jax, jax.numpy as jnp, optax, umtam_jax
      >>> params = {"w": jnp.ones((256, 128))}
      >>> opt = optax.chain(optax.clip_by_global_norm(1.0), umtam_jax.umtam(1e-3, rank=8))
      >>> state = opt.init(params)
      >>> grads = jax.tree.map(jnp.ones_like, params)
      >>> updates, state = opt.update(grads, state, params)
      >>> params = optax.apply_updates(params, updates)

    References:
      UMTAM, arXiv:2512.17109.
    """
    _check_learning_rate(learning_rate)
    for name, value in (("learning_rate", learning_rate), ("weight_decay", weight_decay)):
        number = None if callable(value) else concrete(name, value)  # None: traced
        check(number is None or math.isfinite(number), f"{name} must be finite, got {value!r}")
    return optax.chain(
        scale_by_umtam(
            rank=rank,
            b1=b1,
            b2=b2,
            eps=eps,
            error_decay=error_decay,
            clip_threshold=clip_threshold,
            saliency_decay=saliency_decay,
            svd_method=svd_method,
            svd_every=svd_every,
            min_dim_size_to_factor=min_dim_size_to_factor,
            oversampling=oversampling,
            power_iterations=power_iterations,
            row_axes=row_axes,
            bias_correction=bias_correction,
            saliency=saliency,
            buffer_dtype=buffer_dtype,
            adaptive_rank=adaptive_rank,
            max_rank=max_rank,
            min_rank=min_rank,
            rank_step=rank_step,
            rank_update_every=rank_update_every,
            rank_grow_threshold=rank_grow_threshold,
            rank_shrink_threshold=rank_shrink_threshold,
            seed=seed,
            group_leaves=group_leaves,
        ),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )
