"""Mask-based merging: TALL masks and consensus merging.

With ``θ_0`` the base, ``θ_t`` expert ``t`` and ``τ_t = θ_t − θ_0`` its task vector:

- **TALL masks** (Wang et al., 2024) mark, per task, the entries of a multi-task vector
  ``τ_MTL`` that matter to that task: ``m_t = 1{|τ_t| ≥ λ_t · |τ_MTL − τ_t|}``; the task's
  model is rebuilt as ``θ_0 + m_t ∘ τ_MTL`` (:func:`tall_masks`, :func:`apply_task_mask`).
- **Consensus merging** (same paper) keeps the entries of ``τ_MTL`` that at least ``k``
  TALL masks keep, dropping "selfish" (one task) and "catastrophic" (no task) weights: one
  model, a registered method (:func:`consensus`, :func:`consensus_ties`).

EMR-merging (:mod:`~umtam_jax.merging._emr`) reuses this module's mask checks and
reconstruction.

Masks are boolean pytrees with the base's structure, 1 byte per entry in memory and 1 bit
packed (:func:`pack_mask`, :func:`unpack_mask`). Everything is computed in float32 for
16-bit inputs (the inputs' dtype when wider) and every model cast back to the base's dtypes.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from umtam_jax.merging import _gta as G
from umtam_jax.merging import _pipeline as pipeline
from umtam_jax.merging import _registry as R
from umtam_jax.merging import _validation as V
from umtam_jax.merging._mask_packing import check_boolean
from umtam_jax.merging._registry import DENSITY, SCALING, SCOPE, Param
from umtam_jax.optimizer._layout import RowAxesFn

# --------------------------------------------------------------------------- options


_LAMBDAS = Param(
    "lambdas",
    "numbers",
    "TALL mask threshold λ_t ≥ 0 (one, or one per expert)",
    per_expert="tall_lambda",
    low=0.0,
)


def _mask_leaves(mask: Any, prepared: V.Prepared, what: str) -> list[jax.Array]:
    """The boolean leaves of ``mask`` after checking its paths and shapes against the base."""
    leaves = V.aligned_leaves(mask, prepared, what)
    for path, b, m in zip(prepared.paths, prepared.base, leaves, strict=True):
        check_boolean(m, path, what)
        V.check_shape(m, b, path, what)
    return [V.as_array(m) for m in leaves]


def _unflatten(prepared: V.Prepared, leaves: list[Any]) -> Any:
    """``leaves`` (masks, task vectors) in the base's structure, without Variables."""
    return jax.tree_util.tree_unflatten(prepared.treedef, leaves)


# --------------------------------------------------------------------------- leaf steps


def _tall(taus: list[jax.Array], mtl: jax.Array, lambdas: list[Any]) -> list[jax.Array]:
    """``m_t = |τ_t| ≥ λ_t · |τ_MTL − τ_t|`` for each task (traced helper)."""
    return [
        jnp.abs(t) >= jnp.asarray(lam, t.dtype) * jnp.abs(mtl - t)
        for t, lam in zip(taus, lambdas, strict=True)
    ]


def _task_vectors(base: jax.Array, ws: list[jax.Array]) -> tuple[jax.Array, list[jax.Array]]:
    dt = G.compute_dtype(base)
    b = base.astype(dt)
    return b, [w.astype(dt) - b for w in ws]


@jax.jit
def _tall_leaf(base, ws, merged, lambdas):
    b, taus = _task_vectors(base, ws)
    if merged is None:
        mtl = G.sum_terms(taus)
    else:
        dt = jnp.promote_types(b.dtype, merged.dtype)
        b, taus, mtl = b.astype(dt), [t.astype(dt) for t in taus], merged.astype(dt) - b
    return _tall(taus, mtl, lambdas)


@functools.partial(jax.jit, static_argnames=("ties", "normalize"))
def _consensus_leaf(base, ws, trims, lambdas, k, scaling, ties, normalize):
    """Consensus TA (``ties`` False: ``τ_MTL = Σ τ_t``) or TIES (``τ_MTL``: TIES on the
    ``trims``-masked task vectors, mergekit's sign vote, summed or with ``normalize``
    averaged), then ``θ_0 + scaling · 1{Σ_t m_t ≥ k} ∘ τ_MTL``."""
    b, taus = _task_vectors(base, ws)
    n = len(ws)
    if ties:  # _gta on task vectors over a zero base: exactly TIES's merged task vector
        zero = jnp.zeros_like(b)
        mtl = G.gta(zero, taus, trims, [1.0] * n, 1.0, [1.0] * n, G.NO_RESCALE, True, normalize)
    else:
        mtl = G.sum_terms(taus)
    count = G.sum_terms([m.astype(jnp.int32) for m in _tall(taus, mtl, lambdas)])
    keep = count >= k
    return (b + scaling * jnp.where(keep, mtl, 0)).astype(base.dtype)


@jax.jit
def _reconstruct(base, delta, mask, scale):
    """``θ_0 + scale · mask ∘ Δ`` in the wider of the compute and ``Δ`` dtypes."""
    dt = jnp.promote_types(G.compute_dtype(base), delta.dtype)
    out = base.astype(dt) + jnp.asarray(scale, dt) * jnp.where(mask, delta.astype(dt), 0)
    return out.astype(base.dtype)


@jax.jit
def _apply_leaf(base, merged, mask):
    dt = jnp.promote_types(G.compute_dtype(base), merged.dtype)
    return _reconstruct(base, merged.astype(dt) - base.astype(dt), mask, 1.0)


# --------------------------------------------------------------------------- TALL masks


def tall_masks(
    base: Any,
    experts: Sequence[Any],
    *,
    lambdas: float | Sequence[float] = 0.4,
    merged: Any = None,
) -> list[Any]:
    """TALL masks: the entries of the multi-task vector each task needs.

    ``m_t = 1{|τ_t| ≥ λ_t · |τ_MTL − τ_t|}`` entrywise (Wang et al., Eq. 3), with
    ``τ_t = θ_t − θ_0`` and ``τ_MTL`` the multi-task vector: task arithmetic's ``Σ_t τ_t``,
    or ``θ_merged − θ_0`` for a given merged model (TIES, ...). ``m_t`` keeps the entries
    where the merge is closer to the task's model than the base is, up to ``λ_t``; the
    task's model is ``θ_0 + m_t ∘ τ_MTL`` (:func:`apply_task_mask`). ``λ_t = 0`` keeps
    everything. Difference from the reference code, whose comparison is strict (``>``):
    an entry with ``|τ_t| = λ_t · |τ_MTL − τ_t|`` is kept here. Where no task changes an
    entry this changes nothing (``τ_MTL`` is 0 there), but with ``λ_t = 0`` the entries
    task t leaves unchanged while others change them (``τ_t = 0 ≠ τ_MTL``) are kept here
    and dropped there, which changes task t's model and the consensus counts. The paper picks
    ``λ_t`` per task on validation data from {0.2, …, 0.6}.

    Args:
      base: the shared initial parameters ``θ_0``.
      experts: a sequence of parameter pytrees with the base's structure, shapes and dtypes.
      lambdas: ``λ ≥ 0``, one for every expert or one per expert.
      merged: the merged model whose task vector is ``τ_MTL`` (default: ``θ_0 + Σ τ_t``).

    Returns:
      One mask per expert: a pytree of boolean arrays with the base's structure.

    Raises:
      ValueError / TypeError: invalid inputs or ``lambdas``; messages name the leaf path.

    Example:
      >>> import jax.numpy as jnp
      >>> from umtam_jax import merging
      >>> base = {"w": jnp.zeros(3)}
      >>> experts = [{"w": jnp.array([1., 0., 2.])}, {"w": jnp.array([0., 1., 2.])}]
      >>> [m["w"].tolist() for m in merging.tall_masks(base, experts, lambdas=0.5)]
      [[True, False, True], [False, True, True]]

    References:
      Wang et al., "Localizing Task Information for Improved Model Merging and
      Compression", ICML 2024, arXiv:2405.07813; FusionBench ``tall_mask``.
    """
    prepared = V.prepare(base, experts)
    k = len(prepared.experts)
    lambdas = _LAMBDAS.check(lambdas, k)
    mtl = [None] * len(prepared.base)
    if merged is not None:
        mtl = V.leaves_like(merged, prepared, "merged")
    rows = [
        _tall_leaf(b, [ws[j] for ws in prepared.experts], mtl[j], lambdas)
        for j, b in enumerate(prepared.base)
    ]
    return [_unflatten(prepared, [row[t] for row in rows]) for t in range(k)]


def apply_task_mask(base: Any, merged: Any, mask: Any) -> Any:
    """A task's model from a merged one and its mask: ``θ_0 + m_t ∘ (θ_merged − θ_0)``.

    Entries outside the mask take the base's value. Used with :func:`tall_masks` (the
    paper's per-task reconstruction) or any boolean mask.

    Args:
      base: the shared initial parameters ``θ_0``.
      merged: the merged parameters, with the base's structure, shapes and dtypes.
      mask: a pytree of boolean arrays with the base's structure and shapes.

    Returns:
      The task's parameters, a pytree like ``base``.

    Raises:
      ValueError / TypeError: invalid inputs; messages name the leaf path.

    Example:
      >>> import jax.numpy as jnp
      >>> from umtam_jax import merging
      >>> base, merged = {"w": jnp.zeros(2)}, {"w": jnp.array([3., 4.])}
      >>> merging.apply_task_mask(base, merged, {"w": jnp.array([True, False])})["w"].tolist()
      [3.0, 0.0]

    References:
      Wang et al., arXiv:2405.07813, Eq. 2.
    """
    prepared = V.prepare(base, [merged], what="merged")
    masks = _mask_leaves(mask, prepared, "mask")
    out = [
        _apply_leaf(b, w, m)
        for b, w, m in zip(prepared.base, prepared.experts[0], masks, strict=True)
    ]
    return V.rebuild(prepared, out)


# --------------------------------------------------------------------------- consensus


def consensus(
    base: Any,
    experts: Sequence[Any],
    *,
    k: float = 2,
    lambdas: float | Sequence[float] = 0.4,
    scaling: float = 1.0,
) -> Any:
    """Consensus task arithmetic: keep the entries at least ``k`` TALL masks agree on.

    With ``τ_MTL = Σ_t τ_t`` and the TALL masks ``m_t`` of :func:`tall_masks` (threshold
    ``λ_t``), ``m_cons = 1{Σ_t m_t ≥ k}`` (Wang et al., Eq. 4) and the result is
    ``θ_0 + scaling · m_cons ∘ τ_MTL``. ``k = 2`` (the paper's default) removes the
    "selfish" weights one task alone needs and the "catastrophic" ones no task needs;
    ``k = 1`` only the catastrophic ones; ``k = 0`` is task arithmetic; ``k`` above the
    number of experts gives the base. The reference code calls ``k`` ``prun_thre_k`` and
    ``λ`` ``tall_mask_lambda``; ``scaling`` is task arithmetic's ``α`` (selected on
    validation in the paper, as the ``λ_t``). Computed per tensor, so the out-of-core
    engine gives the same result.

    Args:
      base: the shared initial parameters ``θ_0``.
      experts: a sequence of parameter pytrees with the base's structure, shapes and dtypes.
      k: the minimum number ``≥ 0`` of tasks whose masks keep an entry.
      lambdas: TALL mask threshold ``λ ≥ 0``, one or one per expert.
      scaling: factor on the kept multi-task vector.

    Returns:
      The merged parameters, a pytree like ``base``.

    Raises:
      ValueError / TypeError: invalid inputs or options; messages name the leaf path.

    Example:
      >>> import jax.numpy as jnp
      >>> from umtam_jax import merging
      >>> base = {"w": jnp.zeros(3)}
      >>> experts = [{"w": jnp.array([1., 0., 2.])}, {"w": jnp.array([0., 1., 2.])}]
      >>> merging.consensus(base, experts, lambdas=0.5)["w"].tolist()
      [0.0, 0.0, 4.0]

    References:
      Wang et al., "Localizing Task Information for Improved Model Merging and
      Compression", ICML 2024, arXiv:2405.07813 (Consensus TA).
    """
    return pipeline.merge(CONSENSUS, base, experts, None, k=k, lambdas=lambdas, scaling=scaling)


def consensus_ties(
    base: Any,
    experts: Sequence[Any],
    *,
    density: float | Sequence[float],
    k: float = 2,
    lambdas: float | Sequence[float] = 0.4,
    scaling: float = 1.0,
    normalize: bool = False,
    scope: str | RowAxesFn = "tensor",
) -> Any:
    """Consensus TIES: :func:`consensus` with TIES's merged task vector as ``τ_MTL``.

    ``τ_MTL`` is TIES's on the task vectors (:func:`ties`: each keeps its top-``density``
    ``|τ_t|``, per tensor or with ``scope="global"`` over the whole expert as the paper's
    20%; ``vote = sign(Σ trimmed)``, a zero sum voting +1; agreeing entries summed, or
    averaged with ``normalize`` (the reference code's ``ties_agg``: ``"sum"`` by default,
    ``"mean"``)). The TALL masks compare the untrimmed ``τ_t`` with it; the result is
    ``θ_0 + scaling · 1{Σ_t m_t ≥ k} ∘ τ_MTL``.

    Args:
      base: the shared initial parameters ``θ_0``.
      experts: a sequence of parameter pytrees with the base's structure, shapes and dtypes.
      density: fraction in (0, 1] of each task vector TIES keeps, or one per expert.
      k: the minimum number ``≥ 0`` of tasks whose masks keep an entry.
      lambdas: TALL mask threshold ``λ ≥ 0``, one or one per expert.
      scaling: factor on the kept multi-task vector.
      normalize: average the agreeing entries instead of summing them.
      scope: where TIES's keep count is exact: ``"tensor"``, ``"layer"``, ``"global"`` or
        a layout callable such as ``umtam_jax.scanned("blocks")`` (as :func:`ties`).

    Returns:
      The merged parameters, a pytree like ``base``.

    Raises:
      ValueError / TypeError: invalid inputs or options; messages name the leaf path.

    Example:
      >>> import jax.numpy as jnp
      >>> from umtam_jax import merging
      >>> base = {"w": jnp.zeros(3)}
      >>> experts = [{"w": jnp.array([1., -1., 2.])}, {"w": jnp.array([0., 1., 2.])}]
      >>> merging.consensus_ties(base, experts, density=1.0)["w"].tolist()
      [0.0, 1.0, 4.0]

    References:
      Wang et al., arXiv:2405.07813 (Consensus TIES); Yadav et al., arXiv:2306.01708.
    """
    return pipeline.merge(
        CONSENSUS_TIES, base, experts, None, density=density, k=k, lambdas=lambdas,
        scaling=scaling, normalize=normalize, scope=scope,
    )  # fmt: skip


def _consensus_kernel(ties: bool):
    def kernel(opts, b, ws, masks, scores, extras):
        return _consensus_leaf(
            b, ws, masks, opts["lambdas"], opts["k"], opts["scaling"], ties,
            opts.get("normalize", False),
        )  # fmt: skip

    return kernel


_K = Param("k", "number", "minimum number of TALL masks keeping an entry", low=0.0)

CONSENSUS = R.register(
    R.Method(
        "consensus",
        consensus,
        "task arithmetic on the entries at least k TALL masks keep",
        (_K, _LAMBDAS, SCALING),
        _consensus_kernel(False),
    )
)
CONSENSUS_TIES = R.register(
    R.Method(
        "consensus_ties",
        consensus_ties,
        "TIES on the entries at least k TALL masks keep",
        (DENSITY, _K, _LAMBDAS, SCALING,
         Param("normalize", "bool", "average the agreeing entries (TIES) instead of summing"),
         SCOPE),
        _consensus_kernel(True),
        importance=G.magnitude,
        sparsify="topk",
    )
)  # fmt: skip
