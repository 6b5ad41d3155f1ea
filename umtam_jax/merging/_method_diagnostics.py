"""Diagnostics of a registered method's own steps: the keep masks its sparsify step draws
and the per-entry expert shares its importances (or UMTAM's weights) give, and the leaf
helpers every diagnostic shares. Public through :mod:`umtam_jax.merging.diagnostics`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import jax
import numpy as np

from umtam_jax.merging import _pipeline as pipeline
from umtam_jax.merging import _registry as R
from umtam_jax.merging import _validation as V
from umtam_jax.optimizer._statistics import curvature as _curvature
from umtam_jax.optimizer._statistics import momentum as _momentum


def f64(x: Any) -> np.ndarray:
    """A leaf as a flat float64 NumPy copy (the input is never written)."""
    return np.asarray(jax.device_get(x)).astype(np.float64).ravel()


def rate(num: float, den: float) -> float | None:
    """``num / den`` as a float, or None when there is nothing to count (``den`` is 0)."""
    return float(num) / float(den) if den else None


def rate_matrix(num: np.ndarray, den: np.ndarray) -> list[list[float | None]]:
    """:func:`rate` entry by entry, as nested lists."""
    return [
        [rate(n, d) for n, d in zip(rn, rd, strict=True)] for rn, rd in zip(num, den, strict=True)
    ]


def plan(method: Any, base: Any, experts: Any, extra: Any, params: dict) -> pipeline.Call:
    """A registered method's validated call (a name or a ``Method``), as a merge plans it."""
    method = method if isinstance(method, R.Method) else R.get(method)
    return pipeline.plan(method, base, experts, extra, params)


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


def mask_overlap_of(k: int, columns: Iterable[Sequence[Any]]) -> dict[str, Any]:
    """:func:`mask_overlap` of ``columns``: per leaf, the K experts' masks (consumed one
    leaf at a time)."""
    inter = np.zeros((k, k))
    kept_by = np.zeros(k + 1)
    size = 0
    for column in columns:
        m = np.stack([f64(x) for x in column])
        inter += m @ m.T
        kept_by += np.bincount(m.sum(0).astype(np.int64), minlength=k + 1)
        size += m.shape[1]
    kept = np.diag(inter)
    union = kept[:, None] + kept[None, :] - inter
    jaccard = [[r if r is not None else 1.0 for r in row] for row in rate_matrix(inter, union)]
    any_kept = kept_by[1:].sum()
    return {
        "jaccard": jaccard,
        "kept_by": [rate(c, any_kept) for c in kept_by[1:]],
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
    return mask_overlap_of(len(rows), zip(*rows, strict=True))


def keep_masks(call: pipeline.Call) -> Iterator[Sequence[Any]]:
    """Per leaf, the K keep masks (all leaves at once only for a global top-k)."""
    m = call.method
    if m.sparsify is None:
        raise ValueError(f"method {m.name!r} has no sparsify step, so no keep masks")
    if m.sparsify == "topk" and call.options.get("scope", "tensor") == "global":
        every = pipeline.masks(call, pipeline.importances(call))
        assert every is not None  # a top-k method always has masks
        yield from zip(*every, strict=True)
        return
    for j in range(len(call.prepared.base)):
        leaf = pipeline.leaf_masks(call, j, pipeline.leaf_importances(call, j))
        assert leaf is not None  # sparsify is "topk" or "bernoulli" (Method checks it)
        yield leaf


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
    call = plan(method, base, experts, extra, params)
    rows = zip(*keep_masks(call), strict=True)
    return [jax.tree_util.tree_unflatten(call.prepared.treedef, list(row)) for row in rows]


# --------------------------------------------------------------------------- importances


def _columns(call: pipeline.Call, of: str) -> Iterator[list[Any]]:
    """Per leaf, the K experts' importances, or UMTAM's weights ``λ1 m_t² + λ2 Ŝ_t``."""
    o = call.options
    for j, b in enumerate(call.prepared.base):
        if of == "importances":
            scores = pipeline.leaf_importances(call, j)
            assert scores is not None  # importance_spread_of_call checked the method has them
            yield scores
            continue
        # of="weights": importance_spread_of_call checked the method takes UMTAM statistics.
        assert call.extras is not None
        if not o["curvature_aggregation"]:
            yield [np.ones(b.shape)] * len(call.extras)
        else:
            lm, lc = float(o["lambda_momentum"]), float(o["lambda_curvature"])
            nodes = [x[j] for x in call.extras]
            yield [lm * np.square(f64(_momentum(n))) + lc * f64(_curvature(n)) for n in nodes]


def importance_spread_of_call(call: pipeline.Call, of: str) -> dict[str, Any]:
    """:func:`importance_spread` of a planned call (``of`` already checked)."""
    m, k = call.method, len(call.prepared.experts)
    if of == "weights" and m.extra != "statistics":
        raise ValueError(f"method {m.name!r} has no UMTAM weights P̂ (of='weights' needs umtam)")
    if of == "importances" and m.importance is None:
        raise ValueError(f"method {m.name!r} has no importance step, so no importances")
    tv_sum = ent_sum = 0.0
    entries = undefined = 0
    per_leaf = {}
    for path, column in zip(call.prepared.paths, _columns(call, of), strict=True):
        p = np.stack([f64(x) for x in column])
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
            "tv": rate(tv.sum(), p.shape[1]),
            "entropy": rate(ent.sum(), p.shape[1]),
        }
    return {
        "tv": rate(tv_sum, entries),
        "max_tv": 1.0 - 1.0 / k,
        "entropy": rate(ent_sum, entries),
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
    return importance_spread_of_call(plan(method, base, experts, extra, params), of)
