"""Per-merge diagnostics that explain why a merge wins or loses.

Pure functions over what the merges accept (dicts of arrays or ``flax.nnx`` states,
validated like a merge: errors name the leaf path), returning plain Python numbers, lists
and dicts keyed by leaf path (``jax.tree_util.keystr``), ready for ``json.dump``. They
compute in float64 with NumPy, one leaf at a time; a rate with nothing to count is ``None``.
:func:`sign_conflict`, :func:`mask_overlap` (with :func:`method_masks`),
:func:`importance_spread` and :func:`delta_norms` measure one aspect each; :func:`diagnose`
gives all that apply to one merge.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from umtam_jax.merging import _registry as R
from umtam_jax.merging import _validation as V
from umtam_jax.merging._method_diagnostics import (
    f64,
    importance_spread,
    importance_spread_of_call,
    keep_masks,
    mask_overlap,
    mask_overlap_of,
    method_masks,
    plan,
    rate,
    rate_matrix,
)
from umtam_jax.merging._select import keep_count

__all__ = [
    "KEPT_DENSITY",
    "delta_norms",
    "diagnose",
    "importance_spread",
    "mask_overlap",
    "method_masks",
    "sign_conflict",
]


# --------------------------------------------------------------------------- sign conflict


KEPT_DENSITY = 0.2
"""The density at which :func:`diagnose` also counts conflicts among the entries each task
vector keeps (``sign_conflict_kept``): TIES-Merging's default trim (its top 20 %)."""


def _kept(tau: np.ndarray, density: float) -> np.ndarray:
    """A flat leaf ``tau`` with all but its ``keep_count`` largest magnitudes set to zero
    (TIES-Merging's trim, in float64; ties towards the lower flat index, as the merges)."""
    keep = np.argsort(-np.abs(tau), kind="stable")[: keep_count(tau.size, density)]
    out = np.zeros_like(tau)
    out[keep] = tau[keep]
    return out


def _sign_conflict(prepared: V.Prepared, density: float | None = None) -> dict[str, Any]:
    k = len(prepared.experts)
    eligible = conflicts = 0
    mass = conflict_mass = 0.0
    both, disagree = np.zeros((k, k)), np.zeros((k, k))
    per_leaf = {}
    for j, path in enumerate(prepared.paths):
        b = f64(prepared.base[j])
        taus = np.stack([f64(ws[j]) - b for ws in prepared.experts])
        if density is not None:
            taus = np.stack([_kept(tau, density) for tau in taus])
        s = np.sign(taus)
        pos, neg = (s > 0).astype(np.float64), (s < 0).astype(np.float64)
        n_eligible = int(np.sum((pos + neg).sum(0) >= 2))
        conflict = (pos.sum(0) > 0) & (neg.sum(0) > 0)
        eligible += n_eligible
        conflicts += int(conflict.sum())
        magnitude = np.abs(taus).sum(0)
        mass += float(magnitude.sum())
        conflict_mass += float(magnitude[conflict].sum())
        both += (pos + neg) @ (pos + neg).T
        disagree += pos @ neg.T + neg @ pos.T
        per_leaf[path] = rate(conflict.sum(), n_eligible)
    return {
        "rate": rate(conflicts, eligible),
        "density": density,
        "entries": eligible,
        "conflicts": conflicts,
        "mass": rate(conflict_mass, mass),
        "per_leaf": per_leaf,
        "pairwise": rate_matrix(disagree, both),
    }


def sign_conflict(
    base: Any, experts: Sequence[Any], density: float | None = None
) -> dict[str, Any]:
    """How often the experts' task vectors disagree in sign.

    Averaging entries of opposite signs cancels them: TIES-Merging's motivation
    (arXiv:2306.01708) and the reason for UMTAM's importance-weighted sign election. How
    intense these conflicts are is the open question of which merge wins (the UMTAM paper,
    arXiv:2512.17109): a mean suffers most when the rate is high, an election least.

    Over all entries, independently fine-tuned experts disagree on about half of them
    (0.49–0.50 for every task pair of the conflict study in benchmarks/RESULTS.md), most
    of them small; the conflicts a sign election resolves are among the entries the
    experts keep, which ``density`` counts alone. The rate does not measure how
    contradictory two tasks are: experts of a task and of its label-swapped mirror
    disagree less often (0.44–0.45) than those of unrelated tasks, while no merge of them
    serves both (the ``conflict_intensity`` benchmark).

    Args:
      base: the base parameters ``θ_0``.
      experts: the fine-tuned parameters ``θ_t``, with the base's structure and dtypes.
      density: if given, in (0, 1]: each task vector keeps only its top ``density``
        fraction of entries by magnitude per leaf (TIES-Merging's trim) before counting.

    Returns:
      A dict with ``rate``: among the entries where at least two task vectors
      ``τ_t = θ_t − θ_0`` (trimmed to ``density``, which is returned too) are non-zero
      (``entries`` of them), the fraction whose non-zero
      ``τ_t`` do not all share one sign (``conflicts`` of them); ``mass``: the share of
      ``Σ_t |τ_t|`` lying at these conflicting entries (how much magnitude is at stake);
      ``per_leaf``: leaf path → rate; ``pairwise``: the K×K matrix whose ``[i][j]`` is the
      fraction of entries where ``τ_i`` and ``τ_j`` have opposite signs, among those where
      both are non-zero (diagonal 0).

    Raises:
      ValueError / TypeError: invalid inputs, as a merge's validation (naming the leaf).

    Example:
      >>> import jax.numpy as jnp
      >>> from umtam_jax.merging import diagnostics
      >>> base = {"w": jnp.zeros(3)}
      >>> experts = [{"w": jnp.array([1., 1., 0.])}, {"w": jnp.array([1., -1., 3.])}]
      >>> d = diagnostics.sign_conflict(base, experts)
      >>> d["rate"], d["entries"], d["mass"], d["per_leaf"], d["pairwise"]
      (0.5, 2, 0.2857142857142857, {"['w']": 0.5}, [[0.0, 0.5], [0.5, 0.0]])
      >>> diagnostics.sign_conflict(base, experts, density=0.67)["rate"]  # top 2 of 3 each
      0.0

    References:
      Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", NeurIPS
      2023, arXiv:2306.01708 (sign conflicts between task vectors; the trim to the top
      ``density`` of magnitudes).
    """
    if density is not None and not (
        isinstance(density, int | float) and not isinstance(density, bool) and 0 < density <= 1
    ):
        raise ValueError(f"density must be a number in (0, 1], got {density!r}")
    return _sign_conflict(V.prepare(base, experts), density)


# --------------------------------------------------------------------------- delta norms


def _delta_norms(prepared: V.Prepared, merged: list[Any]) -> dict[str, Any]:
    k = len(prepared.experts)
    m_sq, e_sq, dots = 0.0, np.zeros(k), np.zeros(k)
    leaf_sq, leaf_ratio = {}, {}
    for j, path in enumerate(prepared.paths):
        b = f64(prepared.base[j])
        tm = f64(merged[j]) - b
        taus = np.stack([f64(ws[j]) - b for ws in prepared.experts])
        leaf_sq[path] = float(tm @ tm)
        leaf_ratio[path] = rate(math.sqrt(leaf_sq[path]), np.sqrt((taus * taus).sum(1)).mean())
        m_sq += leaf_sq[path]
        e_sq += (taus * taus).sum(1)
        dots += taus @ tm
    norm, norms = math.sqrt(m_sq), np.sqrt(e_sq)
    return {
        "merged_norm": norm,
        "expert_norms": [float(n) for n in norms],
        "ratio": rate(norm, norms.mean()),
        "cosine": [  # clipped: rounding may give 1 + 1e-16
            None if c is None else min(1.0, max(-1.0, c))
            for c in (rate(d, norm * n) for d, n in zip(dots, norms, strict=True))
        ],
        "leaf_share": {p: rate(s, m_sq) for p, s in leaf_sq.items()},
        "leaf_ratio": leaf_ratio,
    }


def delta_norms(base: Any, merged: Any, experts: Sequence[Any]) -> dict[str, Any]:
    """Where the merged task vector's norm goes, and how it aligns with each expert's.

    A ratio well below 1 means the merge shrank the experts' updates (cancellation, or a
    denominator counting dropped entries); low cosines mean it follows no expert.

    Args:
      base: the base parameters ``θ_0``.
      merged: the merged parameters, with the base's structure and shapes.
      experts: the fine-tuned parameters ``θ_t``.

    Returns:
      A dict with ``merged_norm`` ``‖τ_merged‖₂`` (over the whole model),
      ``expert_norms`` (each ``‖τ_t‖₂``), ``ratio`` ``‖τ_merged‖ / mean_t ‖τ_t‖``,
      ``cosine`` (``cos(τ_merged, τ_t)`` for each expert, ``None`` for a zero vector),
      ``leaf_share`` (leaf path → its share of ``‖τ_merged‖₂²``; the shares sum to 1) and
      ``leaf_ratio`` (leaf path → the ratio on that leaf alone).

    Raises:
      ValueError / TypeError: as a merge's validation (naming the leaf path).

    Example:
      >>> import jax.numpy as jnp
      >>> from umtam_jax.merging import diagnostics
      >>> base = {"a": jnp.zeros(2), "b": jnp.zeros(1)}
      >>> experts = [{"a": jnp.array([3., 0.]), "b": jnp.array([4.])}]
      >>> merged = {"a": jnp.array([3., 0.]), "b": jnp.array([0.])}
      >>> d = diagnostics.delta_norms(base, merged, experts)
      >>> d["ratio"], d["cosine"], d["leaf_share"]
      (0.6, [0.6], {"['a']": 1.0, "['b']": 0.0})
    """
    prepared = V.prepare(base, experts)
    return _delta_norms(prepared, V.leaves_like(merged, prepared, "merged"))


# --------------------------------------------------------------------------- all together


def diagnose(
    method: str | R.Method,
    base: Any,
    experts: Any,
    merged: Any = None,
    extra: Any = None,
    **params: Any,
) -> dict[str, Any]:
    """All the diagnostics that apply to one merge, for an experiment's JSON results.

    Args:
      method: the registered method that merged (name or ``Method``).
      base, experts, extra: its inputs, as for ``merging.merge`` (``base=None`` for a
        method that allows it: the zero base, as the method uses).
      merged: its result, or None to skip :func:`delta_norms`.
      **params: its parameters.

    Returns:
      A dict with ``method``, ``experts`` (K), ``sign_conflict`` over all entries and
      ``sign_conflict_kept`` among the entries kept at :data:`KEPT_DENSITY`; ``mask_overlap`` for a
      method with a sparsify step (its masks before sign election); ``importance_spread``
      for one with importances; ``weight_spread`` (``of="weights"``) for UMTAM; and
      ``delta_norms`` when ``merged`` is given.

    Raises:
      ValueError / TypeError: as ``merging.merge`` and the functions above.

    Example:
      >>> import jax.numpy as jnp
      >>> from umtam_jax import merging
      >>> from umtam_jax.merging import diagnostics
      >>> base = {"w": jnp.zeros(3)}
      >>> experts = [{"w": jnp.array([1., 2., 0.])}, {"w": jnp.array([-1., 2., 1.])}]
      >>> merged = merging.ties(base, experts, density=1.0)
      >>> d = diagnostics.diagnose("ties", base, experts, merged, density=1.0)
      >>> d["sign_conflict"]["rate"], d["mask_overlap"]["kept_by"]
      (0.5, [0.0, 1.0])
      >>> [round(c, 3) for c in d["delta_norms"]["cosine"]]
      [0.913, 0.667]
      >>> sorted(d)  # doctest: +NORMALIZE_WHITESPACE
      ['delta_norms', 'experts', 'importance_spread', 'mask_overlap', 'method',
       'sign_conflict', 'sign_conflict_kept']

    References:
      Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", NeurIPS
      2023, arXiv:2306.01708 (sign conflicts; ``sign_conflict_kept`` after its trim to the
      top 20 % of magnitudes).
    """
    call = plan(method, base, experts, extra, params)
    m, prepared = call.method, call.prepared
    out: dict[str, Any] = {
        "method": m.name,
        "experts": len(prepared.experts),
        "sign_conflict": _sign_conflict(prepared),
        "sign_conflict_kept": _sign_conflict(prepared, KEPT_DENSITY),
    }
    if m.sparsify is not None:
        out["mask_overlap"] = mask_overlap_of(len(prepared.experts), keep_masks(call))
    if m.importance is not None:
        out["importance_spread"] = importance_spread_of_call(call, "importances")
    if m.extra == "statistics":
        out["weight_spread"] = importance_spread_of_call(call, "weights")
    if merged is not None:
        out["delta_norms"] = _delta_norms(prepared, V.leaves_like(merged, prepared, "merged"))
    return out
