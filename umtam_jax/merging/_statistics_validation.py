"""Validation of UMTAM statistics given to a merge: per-parameter statistics nodes (the
optimizer's NamedTuples, their checkpoint dicts, or placeholders), checked against the
parameters' shapes, and per-expert inputs that may be arrays or statistics. Errors name
the offending leaf and field.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import optax

from umtam_jax.merging._validation import (
    Prepared,
    aligned_leaves,
    as_array,
    check_finite,
    check_non_negative,
    describe,
    flatten,
    float_dtype,
    is_array,
    leaves_like,
    structure_error,
)
from umtam_jax.optimizer._axis_order import is_keepdims
from umtam_jax.optimizer._state import DenseStatistics, FactoredStatistics

_FACTORED_FIELDS = frozenset(FactoredStatistics._fields)
_DENSE_FIELDS = frozenset(DenseStatistics._fields)
_FACTORED_REQUIRED = _FACTORED_FIELDS - {"saliency"}
_DENSE_REQUIRED = _DENSE_FIELDS - {"saliency"}


def _is_placeholder(x: Any) -> bool:
    return x is None or isinstance(x, optax.MaskedNode)


def _is_stats_dict(x: Any) -> bool:
    if not isinstance(x, Mapping) or not x:
        return False
    keys = frozenset(x)
    if not all(v is None or is_array(v) for v in x.values()):
        return False
    return (_FACTORED_REQUIRED <= keys <= _FACTORED_FIELDS) or (
        _DENSE_REQUIRED <= keys <= _DENSE_FIELDS
    )


def is_stats_node(x: Any) -> bool:
    """A per-parameter statistics node: NamedTuple, checkpoint dict, or placeholder."""
    return (
        isinstance(x, FactoredStatistics | DenseStatistics)
        or _is_stats_dict(x)
        or (_is_placeholder(x))
    )


def as_node(x: Any) -> Any:
    """A statistics node as its NamedTuple (a checkpoint's mapping form converted)."""
    if isinstance(x, FactoredStatistics | DenseStatistics) or _is_placeholder(x):
        return x
    if frozenset(x) >= _FACTORED_REQUIRED:
        return FactoredStatistics(**{f: x.get(f) for f in FactoredStatistics._fields})
    return DenseStatistics(**{f: x.get(f) for f in DenseStatistics._fields})


def has_stats_nodes(tree: Any) -> bool:
    nodes = jax.tree.leaves(tree, is_leaf=is_stats_node)
    return bool(nodes) and all(is_stats_node(n) for n in nodes)


def check_node(node: Any, shape: tuple[int, ...], where: str) -> None:
    """Raises naming ``where`` if a statistics node's arrays do not fit a parameter of
    ``shape`` (TypeError: not an array or not floating-point; ValueError: a shape)."""

    def check(name: str, x: Any, expected: tuple[int, ...] | None) -> None:
        if not is_array(x):
            raise TypeError(f"{where}.{name} is a {type(x).__name__}, not an array")
        float_dtype(x.dtype, "", f"{where}.{name}")
        if expected is not None and tuple(x.shape) != expected:
            raise ValueError(
                f"statistics shape mismatch at {where}.{name}: expected {expected} for a "
                f"parameter of shape {shape}, got {tuple(x.shape)}"
            )

    if isinstance(node, FactoredStatistics):
        for name in ("row", "col", "u", "sigma"):
            check(name, getattr(node, name), None)
        fields = _keepdims_shapes if is_keepdims(node) else _compact_shapes
        r = node.u.shape[-1] if node.u.ndim else -1
        for name, expected in fields(node, shape, r, where).items():
            check(name, getattr(node, name), expected)
    else:
        check("mu", node.mu, shape)
        check("nu", node.nu, shape)
    if node.saliency is not None:
        check("saliency", node.saliency, shape)


def _compact_shapes(node: FactoredStatistics, shape: tuple, r: int, where: str) -> dict:
    """The shapes of ``u``, ``v`` and ``sigma`` in the compact (canonical-order) form:
    ``row`` shaped ``batch + rows``, ``col`` ``batch + cols`` with ``shape`` their union."""
    nb = max(node.sigma.ndim - 2, 0)  # leading batch axes: a stack of matrices
    batch = tuple(node.sigma.shape[:nb])
    rows, cols = tuple(node.row.shape[nb:]), tuple(node.col.shape[nb:])
    if batch + rows + cols != shape or tuple(node.col.shape[:nb]) != batch:
        raise ValueError(
            f"statistics shape mismatch at {where}: row {tuple(node.row.shape)} and col "
            f"{tuple(node.col.shape)} (batch {batch}) do not give the parameter's shape {shape}"
        )
    return {"u": batch + rows + (r,), "v": batch + cols + (r,), "sigma": batch + (r, r)}


def _keepdims_shapes(node: FactoredStatistics, shape: tuple, r: int, where: str) -> dict:
    """The shapes of ``u``, ``v`` and ``sigma`` in the keepdims (parameter-order) form of a
    leaf whose axes are not batch, rows, cols in that order: ``row`` and ``col`` have the
    parameter's axes, each of size 1 or the parameter's size."""
    row, col = tuple(node.row.shape), tuple(node.col.shape)
    if len(row) != len(shape) or any(
        (a, b) not in ((d, d), (d, 1), (1, d)) for a, b, d in zip(row, col, shape, strict=True)
    ):
        raise ValueError(
            f"statistics shape mismatch at {where}: row {row} and col {col} do not give the "
            f"parameter's shape {shape}"
        )
    batch = tuple(a if a == b else 1 for a, b in zip(row, col, strict=True))
    return {"u": row + (r,), "v": col + (r,), "sigma": batch + (r, r)}


def _partial_stats_dict(x: Any) -> bool:
    """A mapping of arrays named only by statistics fields that is not a whole node."""
    return (
        isinstance(x, Mapping)
        and bool(x)
        and all(v is None or is_array(v) for v in x.values())
        and frozenset(x) <= _FACTORED_FIELDS | _DENSE_FIELDS
        and not _is_stats_dict(x)
    )


def _check_complete_nodes(stats: Any, what: str) -> None:
    """Raises naming the first node given as a mapping of statistics fields that lacks
    some (a checkpoint's dict without ``nu``, say), where the tree is otherwise not read
    as statistics at all."""
    found = jax.tree_util.tree_flatten_with_path(stats, is_leaf=_partial_stats_dict)[0]
    for path, node in found:
        if _partial_stats_dict(node):
            keys = frozenset(node)
            factored = bool(keys & (_FACTORED_FIELDS - _DENSE_FIELDS))
            missing = sorted((_FACTORED_REQUIRED if factored else _DENSE_REQUIRED) - keys)
            wrong = f"lacks {missing}"
            if not missing:  # every factored field, and some only a dense node has
                wrong = f"mixes the factored fields with {sorted(keys - _FACTORED_FIELDS)}"
            raise ValueError(
                f"{what}{jax.tree_util.keystr(path)} {wrong}: a statistics node holds "
                f"{sorted(_FACTORED_REQUIRED)} (factored) or {sorted(_DENSE_REQUIRED)} "
                "(dense), with an optional 'saliency'"
            )


def statistics_leaves(stats: Any, prepared: Prepared, what: str) -> list[Any]:
    """Flattens one expert's statistics pytree into nodes aligned with the base leaves.

    Accepts a statistics pytree (leaves ``FactoredStatistics`` / ``DenseStatistics``, or
    dicts with those field names as restored from a checkpoint) or an optimizer state
    holding an UMTAM state (extracted with ``umtam_jax.optimizer._statistics.statistics``).

    Raises:
      ValueError: structure or shape mismatch with the base, or a parameter without
        statistics (the optimizer did not see it); the message names the leaf path.
    """
    if not has_stats_nodes(stats):
        from umtam_jax.optimizer._statistics import statistics as _extract

        try:
            stats = _extract(stats)
        except ValueError as err:
            _check_complete_nodes(stats, what)
            raise ValueError(f"{what} holds no UMTAM statistics: {err}") from None
    paths = prepared.paths
    nodes = aligned_leaves(stats, prepared, what, is_leaf=is_stats_node)
    out = []
    for path, b, node in zip(paths, prepared.base, nodes, strict=True):
        if not is_stats_node(node):
            raise TypeError(f"{what}{path} is a {describe(node)}, not a statistics node")
        if _is_placeholder(node):
            raise ValueError(
                f"{what}{path} has no statistics (the optimizer did not update this "
                "parameter, e.g. it was masked out); merge it with another method"
            )
        node = as_node(node)
        check_node(node, tuple(b.shape), f"{what}{path}")
        out.append(jax.tree.map(as_array, node))
    check_finite(
        [
            (f"{what}{path}.{field}", x)
            for path, node in zip(paths, out, strict=True)
            for field, x in node._asdict().items()
            if x is not None
        ]
    )
    check_non_negative(
        [
            (f"{what}{path}.{field}", getattr(node, field))
            for path, node in zip(paths, out, strict=True)
            for field in _NON_NEGATIVE
            if getattr(node, field, None) is not None
        ],
        "second moments and saliency are never negative: these are not an optimizer's statistics",
    )
    return out


#: The statistics that are means of squares (or products of magnitudes).
_NON_NEGATIVE = ("row", "col", "nu", "saliency")


def arrays_or_statistics(x: Any, prepared: Prepared, what: str) -> tuple[str, list[Any]]:
    """Classifies a per-expert input that may be a params-shaped tree of arrays or UMTAM
    statistics (or an optimizer state holding them).

    Returns:
      ``("arrays", leaves)`` or ``("statistics", nodes)``, aligned with the base leaves.
    """
    if has_stats_nodes(x):
        return "statistics", statistics_leaves(x, prepared, what)
    if flatten(x)[0] == prepared.paths:
        return "arrays", leaves_like(x, prepared, what)
    from umtam_jax.optimizer._statistics import statistics as _extract

    try:
        stats = _extract(x)
    except ValueError:
        paths, _, _ = flatten(x)
        raise structure_error(what, prepared.paths, paths, "base") from None
    return "statistics", statistics_leaves(stats, prepared, what)
