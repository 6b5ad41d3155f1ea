"""State and statistics containers of the UMTAM optimizer.

Every array of a leaf's state keeps the axes of the parameter it belongs to, so it can be
sharded like that parameter. For a factored parameter of shape ``batch + rows + cols`` (its
stacking axes, then the row and column axes of each matrix), ``u`` has shape
``batch + rows + (r,)``, ``v`` ``batch + cols + (r,)``, ``sigma`` ``batch + (r, r)``,
``row`` ``batch + rows``, ``col`` ``batch + cols`` and ``rank`` ``batch``;
``dense_momentum``, ``saliency`` and ``initial`` have the parameter's shape, which is
``row.shape + col.shape[len(batch):]``. A parameter whose axes are in another order keeps
them in its own order instead, each array with size 1 on the axes it lacks (the keepdims
form of :mod:`._axis_order`). Either way no static metadata is needed to rebuild dense
statistics.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax

Array = jax.Array


class FactoredLeafState(NamedTuple):
    """Optimizer state of one factored (matrix-like) parameter, docs/algorithm.md §2.2.

    Attributes:
      u: left factor of the low-rank momentum, shape ``batch + rows + (r,)``.
      sigma: ``batch + (r, r)`` cores of the momentum ``U Σ Vᵀ`` (diagonal right after a
        decomposition, a full core between refreshes, docs/algorithm.md §2.5).
      v: right factor, shape ``batch + cols + (r,)``.
      dense_momentum: the last step's momentum ``M̃`` before its rank-r compression
        (parameter shape), so that the compression error is ``E = M̃ − U Σ Vᵀ``; ``None``
        when ``error_decay == 0``. Keeping ``M̃`` rather than ``E`` (same size) lets the next
        step form ``b1 U Σ Vᵀ + γ E = γ M̃ + (b1 − γ) U Σ Vᵀ`` without expanding ``U Σ Vᵀ``
        when ``b1 == γ`` (the defaults).
      row: row second moments ``R`` (shape ``batch + rows``).
      col: column second moments ``C`` (shape ``batch + cols``).
      saliency: tracked saliency ``S`` (parameter shape), ``None`` with ``saliency="final"``.
      initial: the initial parameter ``W0``, ``None`` with ``saliency="final"``.
      rank: active rank (int32, shape ``batch``) when adaptive rank is on, else ``None``.
    """

    u: Array
    sigma: Array
    v: Array
    dense_momentum: Array | None
    row: Array
    col: Array
    saliency: Array | None
    initial: Array | None
    rank: Array | None


class DenseLeafState(NamedTuple):
    """Optimizer state of one dense (vector-like or small) parameter, docs/algorithm.md §2.4.

    Attributes:
      mu: first moment ``m``.
      nu: second moment ``v`` (initialised to ``eps``).
      saliency: tracked saliency ``S``, ``None`` with ``saliency="final"``.
      initial: the initial parameter ``W0``, ``None`` with ``saliency="final"``.
    """

    mu: Array
    nu: Array
    saliency: Array | None
    initial: Array | None


class ScaleByUmtamState(NamedTuple):
    """State of :func:`umtam_jax.scale_by_umtam`.

    Attributes:
      count: number of updates applied so far (int32).
      leaves: a pytree shaped like the parameters whose leaves are
        :class:`FactoredLeafState` or :class:`DenseLeafState`.
    """

    # The field shadows tuple.count (a method), which mypy reports; the public name stays.
    count: Array  # type: ignore[assignment]
    leaves: Any


class FactoredStatistics(NamedTuple):
    """Merging statistics of one factored parameter (docs/algorithm.md §3), the fields of
    its :class:`FactoredLeafState` that merging reads.

    Attributes:
      u: left factor of the momentum ``U Σ Vᵀ``, shape ``batch + rows + (r,)``.
      sigma: ``batch + (r, r)`` cores of the momentum.
      v: right factor (not a second moment), shape ``batch + cols + (r,)``.
      row: row second moments ``R`` (shape ``batch + rows``).
      col: column second moments ``C`` (shape ``batch + cols``).
      saliency: tracked saliency ``S`` (parameter shape); ``None`` when the optimizer ran
        with ``saliency="final"``, and merging computes it from the expert, the base and
        ``row``/``col``.
    """

    u: Array
    sigma: Array
    v: Array
    row: Array
    col: Array
    saliency: Array | None


class DenseStatistics(NamedTuple):
    """Merging statistics of one dense parameter (docs/algorithm.md §3).

    Attributes:
      mu: first moment ``m`` (parameter shape).
      nu: second moment ``v`` (parameter shape; not the factored leaves' right factor).
      saliency: tracked saliency ``S`` (parameter shape), ``None`` with
        ``saliency="final"``.
    """

    mu: Array
    nu: Array
    saliency: Array | None


LeafState = FactoredLeafState | DenseLeafState
LeafStatistics = FactoredStatistics | DenseStatistics


# The fields a leaf state's mapping form always holds; the others may be dropped when None.
_REQUIRED_FIELDS: tuple[tuple[type[LeafState], frozenset[str]], ...] = (
    (FactoredLeafState, frozenset({"u", "sigma", "v", "row", "col"})),
    (DenseLeafState, frozenset({"mu", "nu"})),
)


def _mapping_kind(x: Any) -> type[LeafState] | None:
    """The leaf-state class ``x`` is the mapping form of, or ``None``.

    A ``flax.nnx.Optimizer`` holds each leaf state as an ``nnx.State`` of its non-``None``
    fields. A mapping is taken for one only when its keys are exactly such a field set and
    its values are arrays, never containers: a parameter sub-tree named ``mu``/``sigma``/
    ``nu`` maps to the states of its own leaves, so it is never mistaken for one.
    """
    if not isinstance(x, Mapping) or any(isinstance(v, Mapping | tuple | list) for v in x.values()):
        return None
    keys = set(x)
    for kind, required in _REQUIRED_FIELDS:
        if required <= keys <= set(kind._fields):
            return kind
    return None


def is_mapping_leaf_state(x: Any) -> bool:
    """True for the mapping form of a leaf state (see :func:`as_leaf_state`)."""
    return _mapping_kind(x) is not None


def as_leaf_state(x: Any) -> Any:
    """Rebuilds a leaf state from its mapping form (a ``flax.nnx.Optimizer`` holds each as an
    ``nnx.State`` of its non-``None`` fields); anything else is returned unchanged."""
    kind = None if is_leaf_state(x) else _mapping_kind(x)
    if kind is None:
        return x
    return kind(**{field: x.get(field) for field in kind._fields})


def is_leaf_state(x: Any) -> bool:
    """True for a per-parameter optimizer state node."""
    return isinstance(x, FactoredLeafState | DenseLeafState)


def is_leaf_statistics(x: Any) -> bool:
    """True for a per-parameter statistics node."""
    return isinstance(x, FactoredStatistics | DenseStatistics)
