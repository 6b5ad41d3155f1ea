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
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import jax
import numpy as np

from umtam_jax.merging import _registry as R
from umtam_jax.merging import _validation as V
from umtam_jax.merging._select import keep_count
from umtam_jax.optimizer._statistics import curvature as _curvature
from umtam_jax.optimizer._statistics import momentum as _momentum


def _f64(x: Any) -> np.ndarray:
    """A leaf as a flat float64 NumPy copy (the input is never written)."""
    return np.asarray(jax.device_get(x)).astype(np.float64).ravel()


def _rate(num: float, den: float) -> float | None:
    return float(num) / float(den) if den else None


def _matrix(num: np.ndarray, den: np.ndarray) -> list[list[float | None]]:
    return [
        [_rate(n, d) for n, d in zip(rn, rd, strict=True)] for rn, rd in zip(num, den, strict=True)
    ]


def _plan(method: Any, base: Any, experts: Any, extra: Any, params: dict) -> R.Call:
    method = method if isinstance(method, R.Method) else R.get(method)
    return R.plan(method, base, experts, extra, params)


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
        b = _f64(prepared.base[j])
        taus = np.stack([_f64(ws[j]) - b for ws in prepared.experts])
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
        per_leaf[path] = _rate(conflict.sum(), n_eligible)
    return {
        "rate": _rate(conflicts, eligible),
        "density": density,
        "entries": eligible,
        "conflicts": conflicts,
        "mass": _rate(conflict_mass, mass),
        "per_leaf": per_leaf,
        "pairwise": _matrix(disagree, both),
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
    """
    if density is not None and not (
        isinstance(density, int | float) and not isinstance(density, bool) and 0 < density <= 1
    ):
        raise ValueError(f"density must be a number in (0, 1], got {density!r}")
    return _sign_conflict(V.prepare(base, experts), density)


# --------------------------------------------------------------------------- masks


def _mask_leaves(masks: Any) -> list[list[Any]]:
    masks = V.check_sequence(masks, "masks")
    ref, rows = None, []
    for i, mask in enumerate(masks):
        paths, leaves, _ = V.flatten(mask)
        if ref is None:
            ref, ref_leaves = paths, leaves
            if not paths:
                raise ValueError("masks[0] has no array leaves")
        if paths != ref:
            raise V.structure_error(f"masks[{i}]", ref, paths, "masks[0]")
        for path, m, r in zip(paths, leaves, ref_leaves, strict=True):
            if not V.is_array(m) or np.dtype(m.dtype) != np.bool_:
                raise TypeError(f"masks[{i}]{path} must be a boolean array, got {V.describe(m)}")
            if tuple(m.shape) != tuple(r.shape):
                raise ValueError(
                    f"shape mismatch at {path}: masks[0] has {tuple(r.shape)}, "
                    f"masks[{i}] has {tuple(m.shape)}"
                )
        rows.append(leaves)
    return rows


def _mask_overlap(k: int, columns: Iterable[list[Any]]) -> dict[str, Any]:
    """``columns``: per leaf, the K experts' masks (consumed one leaf at a time)."""
    inter = np.zeros((k, k))
    kept_by = np.zeros(k + 1)
    size = 0
    for column in columns:
        m = np.stack([_f64(x) for x in column])
        inter += m @ m.T
        kept_by += np.bincount(m.sum(0).astype(np.int64), minlength=k + 1)
        size += m.shape[1]
    kept = np.diag(inter)
    union = kept[:, None] + kept[None, :] - inter
    jaccard = [[r if r is not None else 1.0 for r in row] for row in _matrix(inter, union)]
    any_kept = kept_by[1:].sum()
    return {
        "jaccard": jaccard,
        "kept_by": [_rate(c, any_kept) for c in kept_by[1:]],
        "density": [float(c) / size for c in kept],
    }


def mask_overlap(masks: Sequence[Any]) -> dict[str, Any]:
    """How much the experts' keep masks overlap.

    Disjoint masks (TALL, low densities) keep each expert's entries intact but dilute
    them; overlapping ones are where sign conflicts and averaging act.

    Args:
      masks: one boolean pytree per expert, all with the same structure and shapes (e.g.
        from :func:`method_masks`).

    Returns:
      A dict with ``jaccard``: the K×K matrix ``|M_i ∧ M_j| / |M_i ∨ M_j|`` (1 for two
      empty masks); ``kept_by``: K fractions, the ``c``-th the share of the entries kept by
      some expert that exactly ``c + 1`` experts keep (``None`` if none is kept);
      ``density``: each mask's fraction of kept entries.

    Raises:
      TypeError: ``masks`` is not a sequence, or a leaf is not a boolean array.
      ValueError: no masks, or their structures or shapes differ (naming the leaf path).

    Example:
      >>> import jax.numpy as jnp
      >>> from umtam_jax.merging import diagnostics
      >>> masks = [{"w": jnp.array([True, True, False])}, {"w": jnp.array([False, True, True])}]
      >>> d = diagnostics.mask_overlap(masks)
      >>> d["jaccard"][0][1], d["kept_by"]
      (0.3333333333333333, [0.6666666666666666, 0.3333333333333333])
    """
    rows = _mask_leaves(masks)
    return _mask_overlap(len(rows), zip(*rows, strict=True))


def _keep_masks(call: R.Call) -> Iterator[list[Any]]:
    """Per leaf, the K keep masks (all leaves at once only for a global top-k)."""
    m = call.method
    if m.sparsify is None:
        raise ValueError(f"method {m.name!r} has no sparsify step, so no keep masks")
    if m.sparsify == "topk" and call.options.get("scope", "tensor") == "global":
        yield from zip(*R.masks(call, R.importances(call)), strict=True)
        return
    for j in range(len(call.prepared.base)):
        yield R.leaf_masks(call, j, R.leaf_importances(call, j))


def method_masks(
    method: str | R.Method, base: Any, experts: Any, extra: Any = None, **params: Any
) -> list[Any]:
    """The per-expert keep masks a registered method's sparsify step draws.

    These are the masks before any sign election (UMTAM's and TIES's step 3 drops more).

    Args:
      method: a name in ``merging.METHODS`` with a sparsify step (``umtam``, ``ties``,
        ``dare``, ``dare_ties``, ``prune``, ``consensus_ties``), or a ``Method``.
      base, experts, extra: the method's inputs, as for ``merging.merge``.
      **params: the method's parameters (``density``, ``scope``, ``key``, …).

    Returns:
      One boolean pytree per expert, with the base's structure (Variables unwrapped).

    Raises:
      ValueError: the method has no sparsify step (the message names it), or as
        ``merging.merge`` for invalid inputs or parameters.

    Example:
      >>> import jax.numpy as jnp
      >>> from umtam_jax.merging import diagnostics
      >>> base = {"w": jnp.zeros(4)}
      >>> masks = diagnostics.method_masks("ties", base, [{"w": jnp.array([1., -3., 2., 0.])}],
      ...                                  density=0.5)
      >>> masks[0]["w"].tolist()
      [False, True, True, False]
    """
    call = _plan(method, base, experts, extra, params)
    rows = zip(*_keep_masks(call), strict=True)
    return [jax.tree_util.tree_unflatten(call.prepared.treedef, list(row)) for row in rows]


# --------------------------------------------------------------------------- importances


def _columns(call: R.Call, of: str) -> Iterator[list[Any]]:
    """Per leaf, the K experts' importances, or UMTAM's weights ``λ1 m_t² + λ2 Ŝ_t``."""
    o = call.options
    for j, b in enumerate(call.prepared.base):
        if of == "importances":
            yield R.leaf_importances(call, j)
        elif not o["curvature_aggregation"]:
            yield [np.ones(b.shape)] * len(call.extras)
        else:
            lm, lc = float(o["lambda_momentum"]), float(o["lambda_curvature"])
            nodes = [x[j] for x in call.extras]
            yield [lm * np.square(_f64(_momentum(n))) + lc * _f64(_curvature(n)) for n in nodes]


def _importance_spread(call: R.Call, of: str) -> dict[str, Any]:
    m, k = call.method, len(call.prepared.experts)
    if of == "weights" and m.extra != "statistics":
        raise ValueError(f"method {m.name!r} has no UMTAM weights P̂ (of='weights' needs umtam)")
    if of == "importances" and m.importance is None:
        raise ValueError(f"method {m.name!r} has no importance step, so no importances")
    tv_sum = ent_sum = 0.0
    entries = undefined = 0
    per_leaf = {}
    for path, column in zip(call.prepared.paths, _columns(call, of), strict=True):
        p = np.stack([_f64(x) for x in column])
        if np.any(p < 0):
            raise ValueError(f"{of} at {path} are negative; their shares are undefined")
        total = p.sum(0)
        p = p[:, total > 0] / total[total > 0]
        tv = 0.5 * np.abs(p - 1.0 / k).sum(0)
        plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
        ent = -plogp.sum(0) / math.log(k) if k > 1 else np.ones(p.shape[1])
        tv_sum, ent_sum = tv_sum + float(tv.sum()), ent_sum + float(ent.sum())
        entries, undefined = entries + p.shape[1], undefined + int(np.sum(total <= 0))
        per_leaf[path] = {
            "tv": _rate(tv.sum(), p.shape[1]),
            "entropy": _rate(ent.sum(), p.shape[1]),
        }
    return {
        "tv": _rate(tv_sum, entries),
        "max_tv": 1.0 - 1.0 / k,
        "entropy": _rate(ent_sum, entries),
        "entries": entries,
        "undefined": undefined,
        "per_leaf": per_leaf,
    }


def importance_spread(
    method: str | R.Method,
    base: Any,
    experts: Any,
    extra: Any = None,
    *,
    of: str = "importances",
    **params: Any,
) -> dict[str, Any]:
    """How far a method's per-entry expert shares are from uniform.

    With shares ``P̂_t = P_t / Σ_s P_s`` per entry, uniform shares ``1/K`` make a weighted
    merge a plain mean; the further from uniform, the more the statistics (saliency,
    curvature) decide which expert an entry follows.

    Args:
      method: a registered method with an importance step (``umtam``, ``ties``, ``prune``,
        ``consensus_ties``), or ``"umtam"`` with ``of="weights"``.
      base, experts, extra: the method's inputs, as for ``merging.merge``.
      of: ``"importances"``: the scores ``P_t`` its masks rank (UMTAM: the saliency, which
        also weighs its sign election; TIES: ``|τ_t|``); ``"weights"``: UMTAM's averaging
        weights ``P_t = λ1 m_t² + λ2 Ŝ_t`` (docs/algorithm.md §4.1 step 4).
      **params: the method's parameters.

    Returns:
      A dict with ``tv``: the mean over entries of the total-variation distance
      ``½ Σ_t |P̂_t − 1/K|`` (0 uniform, at most ``max_tv = 1 − 1/K``); ``entropy``: the
      mean normalized entropy ``−Σ_t P̂_t log P̂_t / log K`` (1 uniform, 0 one expert);
      ``entries``: the entries counted; ``undefined``: those where every ``P_t`` is 0,
      left out; ``per_leaf``: leaf path → ``{"tv", "entropy"}``.

    Raises:
      ValueError: the method has no importances (or ``of="weights"`` without UMTAM
        statistics), negative importances, or as ``merging.merge`` (naming the leaf path).

    Example:
      >>> import jax.numpy as jnp
      >>> from umtam_jax.merging import diagnostics
      >>> base = {"w": jnp.zeros(2)}
      >>> experts = [{"w": jnp.array([1., 3.])}, {"w": jnp.array([1., -1.])}]
      >>> d = diagnostics.importance_spread("ties", base, experts, density=1.0)
      >>> d["tv"], round(d["entropy"], 4), d["per_leaf"]["['w']"]["tv"]
      (0.125, 0.9056, 0.125)
    """
    V.check_option("of", of, ("importances", "weights"))
    return _importance_spread(_plan(method, base, experts, extra, params), of)


# --------------------------------------------------------------------------- delta norms


def _delta_norms(prepared: V.Prepared, merged: list[Any]) -> dict[str, Any]:
    k = len(prepared.experts)
    m_sq, e_sq, dots = 0.0, np.zeros(k), np.zeros(k)
    leaf_sq, leaf_ratio = {}, {}
    for j, path in enumerate(prepared.paths):
        b = _f64(prepared.base[j])
        tm = _f64(merged[j]) - b
        taus = np.stack([_f64(ws[j]) - b for ws in prepared.experts])
        leaf_sq[path] = float(tm @ tm)
        leaf_ratio[path] = _rate(math.sqrt(leaf_sq[path]), np.sqrt((taus * taus).sum(1)).mean())
        m_sq += leaf_sq[path]
        e_sq += (taus * taus).sum(1)
        dots += taus @ tm
    norm, norms = math.sqrt(m_sq), np.sqrt(e_sq)
    return {
        "merged_norm": norm,
        "expert_norms": [float(n) for n in norms],
        "ratio": _rate(norm, norms.mean()),
        "cosine": [  # clipped: rounding may give 1 + 1e-16
            None if c is None else min(1.0, max(-1.0, c))
            for c in (_rate(d, norm * n) for d, n in zip(dots, norms, strict=True))
        ],
        "leaf_share": {p: _rate(s, m_sq) for p, s in leaf_sq.items()},
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
    """
    call = _plan(method, base, experts, extra, params)
    m, prepared = call.method, call.prepared
    out: dict[str, Any] = {
        "method": m.name,
        "experts": len(prepared.experts),
        "sign_conflict": _sign_conflict(prepared),
        "sign_conflict_kept": _sign_conflict(prepared, KEPT_DENSITY),
    }
    if m.sparsify is not None:
        out["mask_overlap"] = _mask_overlap(len(prepared.experts), _keep_masks(call))
    if m.importance is not None:
        out["importance_spread"] = _importance_spread(call, "importances")
    if m.extra == "statistics":
        out["weight_spread"] = _importance_spread(call, "weights")
    if merged is not None:
        out["delta_norms"] = _delta_norms(prepared, V.leaves_like(merged, prepared, "merged"))
    return out
