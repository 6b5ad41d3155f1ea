"""UMTAM merging, Algorithm 2 of the paper in the elementwise reading of docs/algorithm.md §4."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from umtam_jax._precision import at_least_float32
from umtam_jax.merging import _pipeline as pipeline
from umtam_jax.merging import _registry as R
from umtam_jax.merging._gta import power_of_two_below
from umtam_jax.merging._registry import DENSITY, SCALING, SCOPE, Param
from umtam_jax.optimizer._layout import RowAxesFn
from umtam_jax.optimizer._statistics import curvature as _curvature
from umtam_jax.optimizer._statistics import momentum as _momentum
from umtam_jax.optimizer._statistics import saliency as _saliency

NORMALIZE_MODES = ("all", "selected")


def umtam(
    base: Any,
    experts: Sequence[Any],
    statistics: Sequence[Any],
    *,
    density: float | Sequence[float] = 0.2,
    lambda_momentum: float = 1.0,
    lambda_curvature: float = 1.0,
    curvature_pruning: bool = True,
    sign_election: bool = True,
    curvature_aggregation: bool = True,
    normalize: str = "all",
    scaling: float = 1.0,
    scope: str | RowAxesFn = "tensor",
) -> Any:
    """Merges experts with UMTAM's curvature-aware merging (Algorithm 2, docs/algorithm.md §4).

    Per leaf, with task vectors ``Δ_τ = w_τ − w0``:

    1. importance ``I_τ = S_τ`` (the saliency tracked by the optimizer, or computed once as
       ``(w_τ − w0)² ⊙ sqrt(R_i C_j)`` when it ran with ``saliency="final"``); with
       ``curvature_pruning=False``, ``I_τ = |Δ_τ|``;
    2. mask ``M_τ`` keeping exactly ``max(1, int(density · N))`` entries of largest ``I_τ``
       (``N`` the leaf size for ``scope="tensor"``, one layer's for a layout such as
       ``umtam_jax.scanned("blocks")`` or for ``"layer"`` (each slice of the first axis of
       a leaf with three or more), the expert size for ``"global"``; ties go to the lower
       flat index);
    3. sign election (``sign_election=True``): ``s± = Σ_{τ: M_τ, Δ_τ ≷ 0} |Δ_τ| I_τ``,
       ``elected = sign(s+ − s−)``, ``M_τ ← M_τ ∧ (sign Δ_τ = elected)``; an elected sign of
       0 drops every expert at that entry;
    4. weights ``P̂_τ = lambda_momentum · (U Σ Vᵀ)_τ² + lambda_curvature · Ŝ_τ`` (dense
       leaves: ``m²`` and ``v``); ``P̂_τ = 1`` with ``curvature_aggregation=False``;
    5. ``Δ = Σ_τ P̂_τ M_τ Δ_τ / den`` with ``den = Σ_τ P̂_τ`` (``normalize="all"``, the
       paper's ``P̂_combined``) or ``Σ_τ P̂_τ M_τ`` (``normalize="selected"``, a weighted
       mean over the kept experts); ``Δ = 0`` where ``den = 0``;
    6. result ``w0 + scaling · Δ``.

    With ``density=1``, ``sign_election=False`` and ``curvature_aggregation=False`` this is
    the plain mean of the experts in both normalize modes. K copies of one expert merge to
    ``w0 + M ⊙ Δ`` with ``normalize="selected"`` (the expert itself at ``density=1`` when its
    weights ``P̂`` are positive); ``normalize="all"`` shrinks the dropped entries' share.

    Computation is in float32 (float64 for float64 inputs); results have the base's dtypes.
    The function is pure and jit-able with the Python options static, e.g.
    ``jax.jit(umtam, static_argnames=("density", "curvature_pruning", "sign_election",
    "curvature_aggregation", "normalize", "scope"))``.

    Args:
      base: the shared initial parameters ``w0`` (a pytree of arrays).
      experts: a sequence of fine-tuned parameter pytrees with the base's structure,
        shapes and dtypes.
      statistics: one statistics pytree per expert, as returned by
        ``umtam_jax.statistics(opt_state)`` (leaves ``FactoredStatistics`` /
        ``DenseStatistics``, or dicts with their field names as restored from a
        checkpoint), or the expert's UMTAM optimizer state itself.
      density: fraction in (0, 1] of entries each expert keeps, or one per expert.
      lambda_momentum: weight ``λ1`` of the squared momentum in ``P̂``.
      lambda_curvature: weight ``λ2`` of the curvature ``Ŝ`` in ``P̂``.
      curvature_pruning: rank entries by saliency (True) or by ``|Δ|`` (False).
      sign_election: resolve sign conflicts by importance-weighted election.
      curvature_aggregation: weight experts by ``P̂`` (True) or uniformly (False).
      normalize: ``"all"`` or ``"selected"``, the denominator of step 5.
      scaling: factor on the merged task vector.
      scope: where the keep count is exact: ``"tensor"``, ``"layer"`` (each slice of the
        first axis of a leaf with three or more), ``"global"``, or a layout callable
        ``(key_path, shape) -> int | MatrixAxes`` such as ``umtam_jax.scanned("blocks")``
        (each slice over the batch axes it gives a leaf).

    Returns:
      The merged parameters, a pytree like ``base``.

    Raises:
      ValueError: mismatched structures/shapes/dtypes (the message names the leaf path),
        no experts, wrong number of statistics or densities, density outside (0, 1],
        unknown ``normalize`` or ``scope``, parameters without statistics.
      TypeError: non-sequence ``experts``/``statistics``, non-floating leaves.

    Example:
      >>> import jax.numpy as jnp
      >>> import umtam_jax
      >>> from umtam_jax import merging
      >>> base = {"b": jnp.zeros(4)}
      >>> experts = [{"b": jnp.array([1., -1., 2., 0.])}, {"b": jnp.array([1., 1., -1., 0.])}]
      >>> stats = [{"b": umtam_jax.DenseStatistics(mu=jnp.zeros(4), nu=jnp.ones(4),
      ...                                          saliency=None)} for _ in experts]
      >>> merged = merging.umtam(base, experts, stats, density=1.0)
      >>> merged["b"].tolist()
      [1.0, 0.0, 1.0, 0.0]

    References:
      UMTAM: "Bridging Training and Merging Through Momentum-Aware Optimization",
      arXiv:2512.17109, Algorithm 2 (read elementwise: docs/algorithm.md §4, §6, §7).
      TIES-Merging (sign election), arXiv:2306.01708.
      OTA merging (second moments as curvature weights), arXiv:2509.11167.
    """
    return pipeline.merge(
        UMTAM,
        base,
        experts,
        statistics,
        density=density,
        lambda_momentum=lambda_momentum,
        lambda_curvature=lambda_curvature,
        curvature_pruning=curvature_pruning,
        sign_election=sign_election,
        curvature_aggregation=curvature_aggregation,
        normalize=normalize,
        scaling=scaling,
        scope=scope,
    )


def _compute_dtype(x: jax.Array) -> jnp.dtype:
    return at_least_float32(x.dtype)


# The kernels below are jit-compiled once per leaf shape, dtype and number of experts; the
# boolean options are traced (both branches are computed and selected), so the ablations of
# docs/algorithm.md §4.1 do not trigger recompilation. Under an outer jit with static
# options, XLA folds the unused branch away.


@jax.jit
def _importance(w0: jax.Array, w: jax.Array, node: Any, curvature_pruning: Any) -> jax.Array:
    """Step 1: saliency ``S`` (tracked, or from ``Δ`` and ``R``, ``C``) or ``|Δ|``."""
    dt = _compute_dtype(w0)
    if node.saliency is not None:
        sal = _saliency(node).astype(dt)
    else:
        sal = _saliency(node, params=w, initial_params=w0).astype(dt)
    return jnp.where(curvature_pruning, sal, jnp.abs(w.astype(dt) - w0.astype(dt)))


def _common_scale(xs: list[jax.Array]) -> jax.Array:
    """Entry by entry, the power of two at or below the largest magnitude over ``xs``
    (the experts): dividing by it leaves each entry's comparison across the experts as it
    was, without crushing the tensor's small entries under its largest."""
    return power_of_two_below(functools.reduce(jnp.maximum, [jnp.abs(x) for x in xs]))


@jax.jit
def _combine(
    base: jax.Array,
    ws: list[jax.Array],
    imps: list[jax.Array],
    masks: list[jax.Array],
    nodes: list[Any],
    scaling: Any,
    lambda_momentum: Any,
    lambda_curvature: Any,
    sign_election: Any,
    curvature_aggregation: Any,
    normalize_all: Any,
) -> jax.Array:
    """Steps 3-6 for one leaf."""
    dt = _compute_dtype(base)
    k = len(ws)
    b = base.astype(dt)
    d = [w.astype(dt) - b for w in ws]
    # Step 3: importance-weighted sign election. Each entry's task vectors and importances
    # are divided by powers of two common to the experts, which leaves the election as it
    # was and keeps |Δ| · I from overflowing where both are large.
    d_scale, i_scale = _common_scale(d), _common_scale(imps)
    support = [(jnp.abs(d[t]) / d_scale) * (imps[t] / i_scale) for t in range(k)]
    s_pos = sum(jnp.where(masks[t] & (d[t] > 0), support[t], 0) for t in range(k))
    s_neg = sum(jnp.where(masks[t] & (d[t] < 0), support[t], 0) for t in range(k))
    elected = jnp.sign(s_pos - s_neg)
    agree = (elected != 0) | jnp.logical_not(sign_election)
    m = [masks[t] & agree & ((jnp.sign(d[t]) == elected) | ~sign_election) for t in range(k)]
    # Step 4: elementwise preconditioner weights (1 without curvature aggregation).
    p = [
        jnp.where(
            curvature_aggregation,
            lambda_momentum * jnp.square(_momentum(n).astype(dt))
            + lambda_curvature * _curvature(n).astype(dt),
            1,
        )
        for n in nodes
    ]
    # Step 5: curvature-weighted average over all experts or over the kept ones.
    num = sum(jnp.where(m[t], p[t] * d[t], 0) for t in range(k))
    den_all = sum(p)
    den_selected = sum(jnp.where(m[t], p[t], 0) for t in range(k))
    den = jnp.where(normalize_all, den_all, den_selected)
    delta = jnp.where(den == 0, 0, num / jnp.where(den == 0, 1, den))
    # Step 6.
    return (b + scaling * delta).astype(base.dtype)


UMTAM = R.register(
    R.Method(
        "umtam",
        umtam,
        "saliency masks, importance-weighted sign election, curvature-weighted average",
        (
            DENSITY,
            Param("lambda_momentum", "number", "weight λ1 of the squared momentum in P̂"),
            Param("lambda_curvature", "number", "weight λ2 of the curvature Ŝ in P̂"),
            Param("curvature_pruning", "bool", "rank entries by saliency (else by |Δ|)"),
            Param("sign_election", "bool", "importance-weighted sign election"),
            Param("curvature_aggregation", "bool", "weight experts by P̂ (else uniformly)"),
            Param(
                "normalize",
                "choice",
                "denominator: P̂ of all experts or of the kept ones",
                choices=NORMALIZE_MODES,
            ),
            SCALING,
            SCOPE,
        ),
        lambda opts, b, ws, masks, imps, nodes: _combine(
            b,
            ws,
            imps,
            masks,
            nodes,
            opts["scaling"],
            opts["lambda_momentum"],
            opts["lambda_curvature"],
            opts["sign_election"],
            opts["curvature_aggregation"],
            opts["normalize"] == "all",
        ),
        extra="statistics",
        importance=lambda opts, b, w, node: _importance(b, w, node, opts["curvature_pruning"]),
        sparsify="topk",
    )
)
