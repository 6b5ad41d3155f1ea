"""Products of a matrix kept in its N-D layout with thin 2-D matrices.

A factored leaf of shape ``rows + cols`` (tuples of axes) is the m×n matrix
``reshape(leaf, (prod(rows), prod(cols)))``. That reshape is never taken for the m×n
arrays: where a sharded axis would be merged into a more major one (``(2, 8@x, 4)`` as
``(16, 4)``), an Auto mesh's propagation cannot express the merged partition and gathers
the whole array onto every device. The products below contract the N-D array over its
several row or column axes instead (one ``dot_general``, which XLA partitions without
gathering it) and reshape only the thin operands and results (m×k, k×n), whose gathering
costs little.

Every function also takes stacks: ``a`` of shape ``stack + rows + cols`` with the thin
operand of shape ``stack + (·, k)``; the number of stack axes is the thin operand's
``ndim - 2``, and ``row_axes`` (the length of ``rows``) splits the rest.
"""

from __future__ import annotations

import math

import jax

from umtam_jax.optimizer import _sharding


def _split(a: jax.Array, stack: int, row_axes: int) -> tuple[tuple, tuple, tuple]:
    """``(stack, rows, cols)`` shapes of ``a``."""
    return a.shape[:stack], a.shape[stack : stack + row_axes], a.shape[stack + row_axes :]


def _like(x: jax.Array, a: jax.Array, dims: list) -> jax.Array:
    """``x`` resharded, under Explicit sharding, to the partition of ``a``'s axes ``dims``
    (``None``: an unpartitioned axis), so that a contraction pairs equally partitioned axes.
    A no-op on Auto meshes."""
    spec = _sharding.explicit_spec(a)
    if spec is None:
        return x
    return _sharding.reshard_like(x, tuple(None if d is None else spec[d] for d in dims))


def matmul(a: jax.Array, w: jax.Array, row_axes: int) -> jax.Array:
    """``M @ w`` for the matrix ``M`` that ``a`` lays out as ``rows + cols`` and a thin
    ``w`` (n×k): the m×k result as a 2-D array (per stacked matrix)."""
    ns = w.ndim - 2
    stack, rows, cols = _split(a, ns, row_axes)
    k = w.shape[-1]
    w_nd = _sharding.reshape(w, stack + cols + (k,))
    w_nd = _like(w_nd, a, [*range(ns), *range(ns + row_axes, a.ndim), None])
    batch = tuple(range(ns))
    contract_a = tuple(range(ns + row_axes, a.ndim))
    contract_w = tuple(range(ns, ns + len(cols)))
    out = _sharding.dot_general(a, w_nd, ((contract_a, contract_w), (batch, batch)))
    return _sharding.reshape(out, stack + (math.prod(rows), k))  # stack + rows + (k,) before


def rmatmul(q: jax.Array, a: jax.Array, row_axes: int) -> jax.Array:
    """``qᵀ M`` for a thin ``q`` (m×k) and the matrix ``M`` that ``a`` lays out as
    ``rows + cols``: the k×n result as a 2-D array (per stacked matrix).

    As :func:`umtam_jax.optimizer._lowrank._tn`, ``qᵀ`` is materialised first, so that
    the large operand is read in its own layout.
    """
    ns = q.ndim - 2
    stack, rows, cols = _split(a, ns, row_axes)
    k = q.shape[-1]
    qt = _sharding.reshape(jax.lax.optimization_barrier(q.mT), stack + (k,) + rows)
    qt = _like(qt, a, [*range(ns), None, *range(ns, ns + row_axes)])
    batch = tuple(range(ns))
    contract_q = tuple(range(ns + 1, qt.ndim))
    contract_a = tuple(range(ns, ns + row_axes))
    out = _sharding.dot_general(qt, a, ((contract_q, contract_a), (batch, batch)))
    return _sharding.reshape(out, stack + (k, math.prod(cols)))  # stack + (k,) + cols before
