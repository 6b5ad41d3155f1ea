"""Leaves whose axes are not in canonical order (batch axes, then rows, then columns).

The update works on every leaf in canonical order (:class:`._layout.Layout`). A leaf in
another order, such as a ``[d_in, L, d_out]`` kernel stacked along its second axis, is
transposed into it for the step and its direction transposed back.

Its state is stored in the parameter's own axis order, so that it can be sharded like the
parameter and read without knowing the layout: the parameter-shaped arrays (``saliency``,
``initial``, ``dense_momentum``, the dense moments) have the parameter's shape, and every
per-matrix array keeps all of the parameter's axes, with size 1 on the axes it does not
have (*keepdims* form). For a ``[d_in, L, d_out]`` kernel with rank r: ``row`` is
``(d_in, L, 1)``, ``col`` ``(1, L, d_out)``, ``u`` ``(d_in, L, 1, r)``, ``v``
``(1, L, d_out, r)``, ``sigma`` ``(1, L, 1, r, r)``, ``rank`` ``(1, L, 1)``. An axis is a
batch axis where ``row`` and ``col`` have the same size, a row axis where only ``col`` is 1
and a column axis where only ``row`` is 1 (an axis of size 1 may be read as any of them).
A leaf in canonical order keeps the compact form of :mod:`._state` (``row`` shaped
``batch + rows``, ``sigma`` ``batch + (r, r)``); the two are told apart by
``row.ndim == sigma.ndim - 2``, which the compact form never has (it has rows).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from umtam_jax.optimizer._layout import Layout
from umtam_jax.optimizer._state import DenseLeafState, FactoredLeafState, FactoredStatistics

_PARAMETER_SHAPED = ("dense_momentum", "saliency", "initial", "mu", "nu")


def to_canonical(x: jax.Array, perm: tuple[int, ...] | None) -> jax.Array:
    """A parameter-shaped array in canonical order (``x.transpose(perm)``)."""
    return x if perm is None else jnp.transpose(x, perm)


def from_canonical(x: jax.Array, perm: tuple[int, ...] | None) -> jax.Array:
    """The inverse of :func:`to_canonical`."""
    return x if perm is None else jnp.transpose(x, tuple(int(i) for i in np.argsort(perm)))


def _spread(x: jax.Array, present: tuple[int, ...], ndim: int) -> jax.Array:
    """``x`` whose leading axes are the parameter's axes ``present`` (in that order),
    followed by trailing axes of its own, in keepdims form: the parameter's ``ndim`` axes in
    their order (size 1 where absent), then the trailing axes."""
    lead = len(present)
    order = sorted(range(lead), key=lambda j: present[j])
    x = jnp.transpose(x, (*order, *range(lead, x.ndim)))
    missing = tuple(i for i in range(ndim) if i not in present)
    return jnp.expand_dims(x, missing) if missing else x


def _collect(x: jax.Array, present: tuple[int, ...], ndim: int) -> jax.Array:
    """The inverse of :func:`_spread`."""
    missing = tuple(i for i in range(ndim) if i not in present)
    x = jnp.squeeze(x, missing) if missing else x
    ordered = sorted(present)
    return jnp.transpose(x, (*(ordered.index(a) for a in present), *range(len(present), x.ndim)))


def _map_parameter_shaped(state: Any, fn: Any) -> dict[str, Any]:
    return {
        name: fn(getattr(state, name))
        for name in _PARAMETER_SHAPED
        if name in state._fields and getattr(state, name) is not None
    }


def _groups(layout: Layout) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """The parameter axes of the batch, of ``u``/``row`` and of ``v``/``col``."""
    perm, nb = layout.perm, layout.batch_axes
    # Only factored leaves (row_axes set) kept out of canonical order (perm set) are
    # regrouped: see _convert.
    assert perm is not None and layout.row_axes is not None
    k = nb + layout.row_axes
    return perm[:nb], perm[:k], perm[:nb] + perm[k:]


def _convert(state: Any, layout: Layout, ndim: int, *, to_stored: bool) -> Any:
    """A leaf state or statistics node moved between canonical order and the stored form
    (see module doc)."""
    if layout.perm is None:
        return state
    move = from_canonical if to_stored else to_canonical
    reshape = _spread if to_stored else _collect
    moved = _map_parameter_shaped(state, lambda x: move(x, layout.perm))
    if isinstance(state, DenseLeafState):
        return state._replace(**moved)
    batch, rows, cols = _groups(layout)
    if getattr(state, "rank", None) is not None:  # statistics have no rank
        moved["rank"] = reshape(state.rank, batch, ndim)
    return state._replace(
        u=reshape(state.u, rows, ndim),
        sigma=reshape(state.sigma, batch, ndim),
        v=reshape(state.v, cols, ndim),
        row=reshape(state.row, rows, ndim),
        col=reshape(state.col, cols, ndim),
        **moved,
    )


def stored_state(state: Any, layout: Layout, ndim: int) -> Any:
    """A leaf state computed in canonical order, in the stored form (see module doc)."""
    return _convert(state, layout, ndim, to_stored=True)


def canonical_state(state: Any, layout: Layout, ndim: int) -> Any:
    """The inverse of :func:`stored_state`: a stored leaf state in canonical order."""
    return _convert(state, layout, ndim, to_stored=False)


def is_keepdims(leaf: FactoredLeafState | FactoredStatistics) -> bool:
    """Whether a factored leaf state or statistics node is in keepdims form."""
    return np.ndim(leaf.row) == np.ndim(leaf.sigma) - 2


def check_state_shape(path: Any, leaf: Any, shape: tuple[int, ...]) -> None:
    """Raises ``ValueError`` unless ``leaf`` is the stored state of a parameter of ``shape``
    (read off its arrays' static shapes: nothing is computed).

    Raises:
      ValueError: ``leaf`` is no leaf state, or one built for a parameter of another shape
        (a state from ``init`` on other parameters, a stale checkpoint).
    """
    where = jax.tree_util.keystr(tuple(path)) or "the root"
    if isinstance(leaf, DenseLeafState):
        built = tuple(np.shape(leaf.mu))
    elif isinstance(leaf, FactoredLeafState):
        row, col = tuple(np.shape(leaf.row)), tuple(np.shape(leaf.col))
        if not is_keepdims(leaf):
            built = row + col[np.ndim(leaf.sigma) - 2 :]
        elif len(row) == len(col):
            built = tuple(max(r, c) for r, c in zip(row, col, strict=True))
        else:
            built = None
    else:
        raise ValueError(
            f"the optimizer state at {where} is not an UMTAM leaf state (got "
            f"{type(leaf).__name__}): pass the state returned by init"
        )
    if built != tuple(shape):
        raise ValueError(
            f"the optimizer state at {where} was built for a parameter of shape {built}, "
            f"but the parameter has shape {tuple(shape)}: initialise the state with "
            "init(params) for these parameters"
        )


def keepdims_axes(
    row_shape: tuple[int, ...], col_shape: tuple[int, ...]
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """The parameter's batch, row and column axes read off keepdims ``row``/``col`` shapes
    (see module doc).

    Raises:
      ValueError: the shapes are not a keepdims pair (an axis where neither is 1 and they
        differ).
    """
    batch, rows, cols = [], [], []
    for i, (r, c) in enumerate(zip(row_shape, col_shape, strict=True)):
        if r == c:
            batch.append(i)
        elif c == 1:
            rows.append(i)
        elif r == 1:
            cols.append(i)
        else:
            raise ValueError(f"row {row_shape} and col {col_shape} differ on axis {i}")
    return tuple(batch), tuple(rows), tuple(cols)


def canonical_statistics(s: FactoredStatistics) -> tuple[FactoredStatistics, Any]:
    """Factored statistics in canonical order, with the permutation that took the
    parameter there (``None`` if the statistics were already canonical)."""
    if not is_keepdims(s):
        return s, None
    batch, rows, cols = keepdims_axes(tuple(s.row.shape), tuple(s.col.shape))
    layout = Layout(len(rows), batch_axes=len(batch), perm=batch + rows + cols)
    return canonical_state(s, layout, s.row.ndim), layout.perm
