"""UMTAM merging, Algorithm 2 of the paper in the elementwise reading of SPEC §4."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from umtam_jax.merging import _validation as V
from umtam_jax.merging._select import keep_masks
from umtam_jax.optimizer._statistics import curvature as _curvature
from umtam_jax.optimizer._statistics import momentum as _momentum
from umtam_jax.optimizer._statistics import saliency as _saliency

NORMALIZE_MODES = ("all", "selected")
SCOPES = ("tensor", "global")


def _leaf_saliency(node: Any, w: jax.Array, w0: jax.Array) -> jax.Array:
    if node.saliency is not None:
        return _saliency(node)
    return _saliency(node, params=w, initial_params=w0)


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
    scope: str = "tensor",
) -> Any:
    """Merges experts with UMTAM's curvature-aware merging (Algorithm 2, SPEC §4).

    Per leaf, with task vectors ``Δ_τ = w_τ − w0``:

    1. importance ``I_τ = S_τ`` (the saliency tracked by the optimizer, or computed once as
       ``(w_τ − w0)² ⊙ sqrt(R_i C_j)`` when it ran with ``saliency="final"``); with
       ``curvature_pruning=False``, ``I_τ = |Δ_τ|``;
    2. mask ``M_τ`` keeping exactly ``max(1, int(density · N))`` entries of largest ``I_τ``
       (``N`` the leaf size for ``scope="tensor"``, the expert size for ``"global"``; ties
       go to the lower flat index);
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
      scope: ``"tensor"`` or ``"global"``, where the keep count is exact.

    Returns:
      The merged parameters, a pytree like ``base``.

    Raises:
      ValueError: mismatched structures/shapes/dtypes (the message names the leaf path),
        no experts, wrong number of statistics or densities, density outside (0, 1],
        unknown ``normalize`` or ``scope``, parameters without statistics.
      TypeError: non-sequence ``experts``/``statistics``, non-floating leaves.

    Example:
      >>> import jax.numpy as jnp
      >>> from umtam_jax import merging
      >>> from umtam_jax.optimizer._state import DenseStatistics
      >>> base = {"b": jnp.zeros(4)}
      >>> experts = [{"b": jnp.array([1., -1., 2., 0.])}, {"b": jnp.array([1., 1., -1., 0.])}]
      >>> stats = [{"b": DenseStatistics(mu=jnp.zeros(4), nu=jnp.ones(4), saliency=None)}
      ...          for _ in experts]
      >>> merged = merging.umtam(base, experts, stats, density=1.0)
      >>> merged["b"].tolist()
      [1.0, 0.0, 1.0, 0.0]

    References:
      UMTAM: "Bridging Training and Merging Through Momentum-Aware Optimization",
      arXiv:2512.17109, Algorithm 2 (read elementwise, SPEC §4 and §9).
      TIES-Merging (sign election), arXiv:2306.01708.
      OTA merging (second moments as curvature weights), arXiv:2509.11167.
    """
    V.check_option("normalize", normalize, NORMALIZE_MODES)
    V.check_option("scope", scope, SCOPES)
    prepared = V.prepare(base, experts)
    k = len(prepared.experts)
    statistics = V.check_sequence(statistics, "statistics")
    V.check_count(statistics, k, "statistics pytrees")
    densities = V.check_densities(density, k)
    nodes = [V.statistics_leaves(s, prepared, f"statistics[{i}]") for i, s in enumerate(statistics)]

    dtypes = [
        V.float_dtype(b.dtype, p, "base")
        for p, b in zip(prepared.paths, prepared.base, strict=True)
    ]
    w0 = [b.astype(dt) for b, dt in zip(prepared.base, dtypes, strict=True)]
    deltas = [
        [w.astype(dt) - b for w, b, dt in zip(leaves, w0, dtypes, strict=True)]
        for leaves in prepared.experts
    ]

    # Steps 1-2: importance and keep masks, per expert.
    importance, masks = [], []
    for t in range(k):
        if curvature_pruning:
            imp = [
                _leaf_saliency(n, w, b).astype(dt)
                for n, w, b, dt in zip(
                    nodes[t], prepared.experts[t], prepared.base, dtypes, strict=True
                )
            ]
        else:
            imp = [jnp.abs(d) for d in deltas[t]]
        importance.append(imp)
        masks.append(keep_masks(imp, densities[t], scope))

    out = []
    for j, (b, dt) in enumerate(zip(w0, dtypes, strict=True)):
        d = [deltas[t][j] for t in range(k)]
        m = [masks[t][j] for t in range(k)]
        # Step 3: importance-weighted sign election.
        if sign_election:
            support = [jnp.abs(d[t]) * importance[t][j] for t in range(k)]
            s_pos = sum(jnp.where(m[t] & (d[t] > 0), support[t], 0) for t in range(k))
            s_neg = sum(jnp.where(m[t] & (d[t] < 0), support[t], 0) for t in range(k))
            elected = jnp.sign(s_pos - s_neg)
            m = [m[t] & (jnp.sign(d[t]) == elected) & (elected != 0) for t in range(k)]
        # Step 4: elementwise preconditioner weights.
        if curvature_aggregation:
            p = []
            for t in range(k):
                node = nodes[t][j]
                mom = _momentum(node).astype(dt)
                curv = _curvature(node).astype(dt)
                p.append(lambda_momentum * jnp.square(mom) + lambda_curvature * curv)
        else:
            p = [jnp.ones_like(b)] * k
        # Step 5: curvature-weighted average.
        num = sum(jnp.where(m[t], p[t] * d[t], 0) for t in range(k))
        selected = [jnp.where(m[t], p[t], 0) for t in range(k)]
        den = sum(p) if normalize == "all" else sum(selected)
        safe = jnp.where(den == 0, 1, den)
        delta = jnp.where(den == 0, 0, num / safe)
        out.append(b + scaling * delta)
    return V.finish(prepared, out)
