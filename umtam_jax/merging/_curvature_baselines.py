"""Curvature- and saliency-based baselines: OTA merging and single-expert pruning.

- :func:`ota` averages the task vectors with per-entry weights ``v^power`` from each
  expert's curvature (Adam's second moment, or UMTAM's ``Ŝ``), in the style of OTA merging.
- :func:`prune` keeps one expert's top-density task-vector entries, ranked by its UMTAM
  saliency (curvature-aware pruning), by given scores, or by magnitude, and reverts the rest.

Both run per leaf through the registry, in memory and in the out-of-core engine; the dtype
helpers come from :mod:`._gta`.

References:
  Mahdavinia et al., OTA merging, arXiv:2509.11167; UMTAM, arXiv:2512.17109, Sec. 4.2;
  TIES-Merging's trim step, arXiv:2306.01708.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from umtam_jax.merging import _pipeline as pipeline
from umtam_jax.merging import _registry as R
from umtam_jax.merging import _validation as V
from umtam_jax.merging._gta import abs_delta, compute_dtype, sum_terms
from umtam_jax.merging._registry import SCALING, SCOPE, WEIGHTS, Param
from umtam_jax.merging._umtam import _importance
from umtam_jax.optimizer._layout import RowAxesFn


def ota(
    base: Any,
    experts: Sequence[Any],
    curvatures: Sequence[Any],
    *,
    power: float = 0.5,
    weights: Sequence[float] | None = None,
    scaling: float = 1.0,
) -> Any:
    """Curvature-weighted averaging of task vectors in the style of OTA merging.

    ``w0 + scaling · Σ_τ c_τ v_τ^power Δ_τ / Σ_τ c_τ v_τ^power`` elementwise, with ``v_τ`` the
    expert's second-moment (curvature) estimate and ``c_τ`` the optional expert weights;
    where the denominator is 0 the base value is kept. ``power = 0.5`` weights by Adam's
    preconditioner denominator ``sqrt(v)``, as OTA does; ``power = 1`` is Fisher merging
    with ``v`` as the diagonal Fisher.

    Args:
      base: the shared initial parameters ``w0``.
      experts: a sequence of parameter pytrees with the base's structure, shapes and dtypes.
      curvatures: one per expert: either a params-shaped pytree of non-negative curvature
        arrays (e.g. Adam's ``nu``), or UMTAM statistics / optimizer state, whose
        curvature ``Ŝ = R Cᵀ / sum(R)`` (dense leaves: ``v``) is used.
      power: exponent ``p`` on the curvature; with ``p < 0`` every curvature entry must
        be positive.
      weights: one weight per expert (default 1.0 each).
      scaling: factor on the merged task vector.

    Returns:
      The merged parameters, a pytree like ``base``.

    Raises:
      ValueError / TypeError: invalid inputs (a negative curvature entry, or a zero one
        with ``power < 0``, included); messages name the leaf path.

    Example:
      >>> import jax.numpy as jnp
      >>> from umtam_jax import merging
      >>> base = {"w": jnp.zeros(2)}
      >>> experts = [{"w": jnp.array([1., 1.])}, {"w": jnp.array([4., 4.])}]
      >>> curv = [{"w": jnp.array([9., 1.])}, {"w": jnp.array([1., 1.])}]
      >>> merging.ota(base, experts, curv)["w"].tolist()
      [1.75, 2.5]

    References:
      Mahdavinia et al., "Harnessing Optimization Dynamics for Curvature-Informed Model
      Merging" (OTA merging), arXiv:2509.11167.
    """
    return pipeline.merge(
        OTA, base, experts, curvatures, power=power, weights=weights, scaling=scaling
    )


def _check_ota(call: pipeline.Call) -> None:
    """Non-negative weights with a positive sum; OTA's ``v^power`` is defined for
    ``v ≥ 0`` (``v > 0`` when ``power < 0``)."""
    V.check_convex_weights(call.options["weights"])
    power = call.options["power"]
    strict = not isinstance(power, jax.core.Tracer) and float(power) < 0
    assert call.extras is not None  # plan requires the curvatures
    named = [
        (f"curvatures[{i}]{path}", c)
        for i, leaves in enumerate(call.extras)
        for path, c in zip(call.prepared.paths, leaves, strict=True)
    ]
    bound = "> 0 when power < 0" if strict else "≥ 0"
    V.check_non_negative(
        named,
        f"OTA needs curvatures {bound} (v^power is not a real number otherwise)",
        strict=strict,
    )


@jax.jit
def _ota_leaf(base, ws, curv, weights, power, scaling):
    dt = compute_dtype(base)
    b = base.astype(dt)
    coef = [jnp.asarray(w, dt) * c.astype(dt) ** power for w, c in zip(weights, curv, strict=True)]
    num = sum_terms([c * (w.astype(dt) - b) for c, w in zip(coef, ws, strict=True)])
    den = sum_terms(coef)
    delta = jnp.where(den == 0, 0, num / jnp.where(den == 0, 1, den))
    return (b + scaling * delta).astype(base.dtype)


def prune(
    base: Any,
    expert: Any,
    scores: Any = None,
    *,
    density: float,
    scope: str | RowAxesFn = "tensor",
) -> Any:
    """Keeps the top-``density`` task-vector entries of one expert, reverting the rest.

    Entry ``i`` keeps the expert's value when its score is among the
    ``max(1, int(density · N))`` largest (per tensor, or over the whole expert with
    ``scope="global"``; equal scores go to the lower flat index), else takes the base's.
    Kept values are the expert's exactly (no rescaling, no dtype round trip).

    Args:
      base: the initial parameters ``w0``.
      expert: the fine-tuned parameters, with the base's structure, shapes and dtypes.
      scores: a params-shaped pytree of scores; or the expert's UMTAM statistics /
        optimizer state, whose saliency ``S`` is used (docs/algorithm.md §3; computed from
        the expert, the base, ``R`` and ``C`` when not tracked); or ``None`` for magnitude
        pruning by ``|w − w0|``.
      density: fraction in (0, 1] of entries to keep.
      scope: ``"tensor"``, ``"layer"`` (each slice of the first axis of a leaf with three
        or more), ``"global"``, or a layout callable such as ``umtam_jax.scanned("blocks")``
        (each slice over its batch axes).

    Returns:
      The pruned parameters, a pytree like ``base``.

    Raises:
      ValueError / TypeError: invalid inputs; messages name the leaf path.

    Example:
      >>> import jax.numpy as jnp
      >>> from umtam_jax import merging
      >>> base = {"w": jnp.zeros(4)}
      >>> expert = {"w": jnp.array([1., -3., 2., 0.5])}
      >>> merging.prune(base, expert, density=0.5)["w"].tolist()
      [0.0, -3.0, 2.0, 0.0]

    References:
      UMTAM, arXiv:2512.17109, Sec. 4.2 (curvature-aware vs magnitude pruning);
      TIES-Merging's trim step, arXiv:2306.01708.
    """
    return pipeline.merge(PRUNE, base, expert, scores, density=density, scope=scope)


@jax.jit
def _select(mask: jax.Array, x: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.where(mask, x, b)


# --------------------------------------------------------------------------- registry

OTA = R.register(
    R.Method(
        "ota",
        ota,
        "task vectors averaged with weights curvature^power (Adam's v or UMTAM's Ŝ)",
        (
            Param("power", "number", "exponent on the curvature (0.5: Adam's sqrt(v))"),
            WEIGHTS,
            SCALING,
        ),
        lambda opts, b, ws, masks, scores, curv: _ota_leaf(
            b, ws, curv, opts["weights"], opts["power"], opts["scaling"]
        ),
        extra="curvatures",
        check=_check_ota,
    )
)


def _prune_importance(opts: Any, b: jax.Array, w: jax.Array, x: Any) -> jax.Array:
    if x is None:
        return abs_delta(b, w)
    if hasattr(x, "saliency"):  # a statistics node: its saliency
        return _importance(b, w, x, True)
    return x


PRUNE = R.register(
    R.Method(
        "prune",
        prune,
        "keep one expert's top-density entries by saliency or |Δ|, revert the rest",
        (Param("density", "density", "fraction in (0, 1] of entries kept"), SCOPE),
        lambda opts, b, ws, masks, scores, extras: _select(masks[0], ws[0], b),
        extra="scores",
        importance=_prune_importance,
        sparsify="topk",
        single_expert=True,
    )
)
