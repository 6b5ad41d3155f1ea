"""Which axes of a parameter form the matrices UMTAM factors.

UMTAM works on matrices: a leaf is a stack of ``prod(batch)`` independent
``prod(rows) × prod(cols)`` matrices, each with its own low-rank momentum, second moments,
clipping norm, ε_t, saliency and adaptive rank. The split is chosen per leaf by a callable
``(key_path, shape) -> int | MatrixAxes``: an ``int`` k means no batch axes and rows
``shape[:k]``; a :class:`MatrixAxes` names the batch axes and the row axes, either as counts
of leading axes (``MatrixAxes(1, 1)``: ``[L, d_in, d_out]``) or as axis positions
(``MatrixAxes(batch=(1,), rows=(0,))``: ``[d_in, L, d_out]``); the other axes are the
columns.

Layer-stacked models (``flax.nnx.scan``, ``flax.linen.scan``, ``nnx.vmap``-built layers)
keep the weights of all L layers in one array, with the layer axis first (``[L, d_in,
d_out]``) or elsewhere (MaxText's ``param_scan_axis=1``: ``[d_in, L, d_out]``):
:func:`scanned` marks those leaves' layer axis as a batch axis, so each layer is factored
on its own.

Internally a leaf is updated in its *canonical* order, batch axes then rows then columns;
a leaf whose axes are in another order is transposed into it and back (see
:mod:`._axis_order`), which costs a copy of its m×n arrays per step.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple, TypeGuard

import jax
import numpy as np

from umtam_jax import _pytrees
from umtam_jax._callers import user_stacklevel
from umtam_jax.optimizer._attention import attention_rows


class MatrixAxes(NamedTuple):
    """The axes of one leaf: which index independent matrices (batch) and which form each
    matrix's rows; the remaining axes form its columns.

    Each field is a count of leading axes or a tuple of axis positions (negative positions
    count from the end). With counts, the batch axes come first and the row axes follow
    them; a count of rows with a tuple of batch axes takes the first non-batch axes.

    Attributes:
      batch: the axes indexing independent matrices (0 or ``()``: one matrix).
      rows: the axes forming the rows of each matrix.

    Example:
      >>> from umtam_jax import MatrixAxes
      >>> MatrixAxes(1, 1)  # [L, d_in, d_out]: one d_in × d_out matrix per layer
      MatrixAxes(batch=1, rows=1)
      >>> MatrixAxes(batch=(1,), rows=(0,))  # [d_in, L, d_out] (layer axis second)
      MatrixAxes(batch=(1,), rows=(0,))
    """

    batch: int | tuple[int, ...]
    rows: int | tuple[int, ...]


RowAxesFn = Callable[[tuple[Any, ...], tuple[int, ...]], "int | MatrixAxes"]
"""``(key_path, shape) -> k | MatrixAxes``: the matrix view of a leaf (see module doc)."""


def default_row_axes(path: tuple[Any, ...], shape: tuple[int, ...]) -> int:
    """Default view: one matrix, fan-in × fan-out.

    All axes but the last are the rows, ``(prod(shape[:-1]), shape[-1])``: right for Flax
    ``Dense`` (in, out), ``Conv`` (..., in, out) and ``DenseGeneral`` kernels with one
    output axis (an attention output projection, ``(heads, head_dim, out)``), except the
    query, key and value projections of Flax attention (``nnx.MultiHeadAttention``,
    ``linen.MultiHeadDotProductAttention``, MaxText): a 3-axis ``kernel`` under a
    ``query``, ``key`` or ``value`` key whose first axis is longer than its second is
    ``(in, heads, head_dim)``, one row axis (viewed as ``(in · heads, head_dim)`` it would
    split the fan-out, and its usually small ``head_dim`` would leave it dense); a
    layer-stacked ``[L, in, out]`` kernel of that name (fewer layers than inputs) keeps
    the all-but-last view unless :func:`scanned` gives it one per layer. Other
    ``DenseGeneral`` layouts with several output axes need their own ``row_axes``. For
    layer-stacked (scanned) models use :func:`scanned`, which applies this view to each
    layer.

    Args:
      path: the leaf's key path.
      shape: the leaf's shape.

    Returns:
      The number of leading axes that form the rows.

    Example:
      >>> import jax
      >>> from umtam_jax import default_row_axes
      >>> default_row_axes((), (3, 3, 16, 32))  # a Conv kernel
      3
      >>> query = (jax.tree_util.DictKey("query"), jax.tree_util.DictKey("kernel"))
      >>> default_row_axes(query, (512, 8, 64))  # (in, heads, head_dim)
      1
    """
    rows = attention_rows(path, shape)
    return max(len(shape) - 1, 0) if rows is None else rows


def scanned(
    *names: str, batch: int = 1, axis: int = 0, inner: RowAxesFn = default_row_axes
) -> Callable[[tuple[Any, ...], tuple[int, ...]], int | MatrixAxes]:
    """A ``row_axes`` callable for layer-stacked (scanned) models.

    Leaves whose key path contains one of ``names`` (a module or collection name such as
    the attribute holding an ``nnx.scan``-built block) have ``batch`` layer axes starting
    at position ``axis``: each layer's matrix is factored on its own, with the view
    ``inner`` gives for the shape without those axes. Other leaves keep ``inner``'s view.

    Args:
      *names: key names marking the scanned subtrees; none: every leaf with more than
        two axes is treated as scanned.
      batch: number of stacking axes of the scanned leaves.
      axis: position of the first stacking axis: 0 for ``nnx.scan`` / ``linen.scan`` with
        the default ``variable_axes={"params": 0}``, 1 for MaxText's ``param_scan_axis=1``
        (``[d_in, L, d_out]`` kernels, ``[d, L]`` biases). A leaf with fewer than
        ``axis + batch`` axes takes its last ``batch`` axes as the stacking axes; a
        per-layer scalar (a gate stacked into ``[L]``) is one value per layer.
      inner: the view of one layer's weight (default :func:`default_row_axes`).

    Returns:
      A callable for ``umtam(..., row_axes=...)``.

    Example:
      >>> import jax, jax.numpy as jnp, umtam_jax
      >>> params = {"blocks": {"kernel": jnp.ones((4, 256, 128))}, "head": jnp.ones((256, 8))}
      >>> opt = umtam_jax.umtam(1e-3, rank=8, row_axes=umtam_jax.scanned("blocks"))
      >>> opt.init(params)[0].leaves["blocks"]["kernel"].sigma.shape  # one core per layer
      (4, 8, 8)
      >>> umtam_jax.scanned("blocks", axis=1)((jax.tree_util.DictKey("blocks"),), (256, 4, 128))
      MatrixAxes(batch=(1,), rows=(0,))

    References:
      Flax ``nnx.scan`` / ``linen.scan`` (stacked layer parameters), MaxText's
      ``param_scan_axis``; the batch axes of ``optax.contrib.muon``'s dimension numbers.
    """
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    if not isinstance(axis, int) or isinstance(axis, bool) or axis < 0:
        raise ValueError(f"axis must be a non-negative int, got {axis!r}")
    bad = [n for n in names if not isinstance(n, str) or not n]
    if bad:
        raise TypeError(
            f"scanned takes key names as separate strings (scanned('a', 'b')), got {bad[0]!r}"
        )
    return _Scanned(tuple(names), batch, axis, inner)


@dataclasses.dataclass(frozen=True)
class _Scanned:
    """The callable :func:`scanned` returns: equal for equal arguments (one compilation
    for two equal layouts) and shown as the call that made it (in errors and records)."""

    names: tuple[str, ...]
    batch: int
    axis: int
    inner: RowAxesFn = dataclasses.field(hash=False)  # a user's callable may not hash

    def __repr__(self) -> str:
        args = [repr(n) for n in self.names] + [f"batch={self.batch}", f"axis={self.axis}"]
        if self.inner is not default_row_axes:
            args.append(f"inner={self.inner!r}")
        return f"scanned({', '.join(args)})"

    def __call__(self, path: tuple[Any, ...], shape: tuple[int, ...]) -> int | MatrixAxes:
        batch, inner = self.batch, self.inner
        hit = (
            any(_pytrees.key_name(k) in self.names for k in path) if self.names else len(shape) > 2
        )
        if not hit or len(shape) < batch:
            return inner(path, shape)
        first = min(self.axis, len(shape) - batch)
        stacked = tuple(range(first, first + batch))
        others = tuple(i for i in range(len(shape)) if i not in stacked)
        inner_shape = tuple(shape[i] for i in others)
        view = inner(path, inner_shape)
        where = (
            f"scanned's inner returned {view!r} for {jax.tree_util.keystr(path)} of shape "
            f"{shape} without its stacking axes {stacked} ({inner_shape})"
        )
        inner_batch, inner_rows = _validated_positions(view, inner_shape, where)
        if first == 0 and inner_batch == () and inner_rows == tuple(range(len(inner_rows))):
            return MatrixAxes(batch, len(inner_rows))  # the leading layout, in counts
        return MatrixAxes(
            stacked + tuple(others[i] for i in inner_batch), tuple(others[i] for i in inner_rows)
        )


def missing_names(layout: Any, paths: Iterable[tuple[Any, ...]]) -> list[str]:
    """The names of a :func:`scanned` layout that no key path of ``paths`` contains (a
    misspelt name leaves the stacked leaves unsliced); ``[]`` for any other layout.

    Args:
      layout: a ``row_axes`` or ``scope`` value.
      paths: the key paths of the leaves it is applied to.
    """
    if not isinstance(layout, _Scanned):
        return []
    found = {_pytrees.key_name(k) for path in paths for k in path}
    return [n for n in layout.names if n not in found]


def warn_unstacked(row_axes: Any, paths_and_leaves: list[tuple[Any, Any]]) -> None:
    """Warns when ``row_axes`` is a :func:`scanned` layout none of whose names a key path
    holds while a leaf has more than two axes: most likely a misspelt name, which factors
    each stack as one matrix. (It is right where a transform sees only part of a model,
    e.g. under ``optax.masked``, so it is no error.)"""
    missing = missing_names(row_axes, [path for path, _ in paths_and_leaves])
    if (
        missing
        and len(missing) == len(row_axes.names)
        and any(len(_shape(x)) > 2 for _, x in paths_and_leaves)
    ):
        warnings.warn(
            f"row_axes={row_axes!r}: no parameter's key path contains "
            f"{', '.join(map(repr, missing))}, so every leaf is factored unstacked; name "
            "the key that holds the stacked layers (ignore this where the transform sees "
            "only part of the model)",
            stacklevel=user_stacklevel(),
        )


def check_scope_names(scope: Any, paths: Iterable[tuple[Any, ...]]) -> None:
    """Raises ``ValueError`` when ``scope`` is a :func:`scanned` layout with a name that no
    key path of ``paths`` (a whole merged tree) contains."""
    missing = missing_names(scope, paths)
    if missing:  # a misspelt name would leave the stacked leaves unsliced
        raise ValueError(
            f"scope={scope!r}: no leaf's key path contains {', '.join(map(repr, missing))}"
        )


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(getattr(_pytrees.unwrap(x), "shape", ()))


def _positions(spec: int | MatrixAxes, ndim: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(batch, rows)`` axis positions of a view (``int`` or :class:`MatrixAxes`), as
    given; validity is checked by :func:`layout`."""
    if not isinstance(spec, MatrixAxes):
        return (), tuple(range(spec))
    batch, rows = spec
    if isinstance(batch, int) and not isinstance(batch, bool):
        batch = tuple(range(batch))
    # _validated_positions, the only caller, has rejected bools: each field is a count
    # (made a tuple here) or a tuple of positions.
    assert isinstance(batch, tuple)
    if isinstance(rows, int) and not isinstance(rows, bool):
        free = [i for i in range(ndim) if i not in {b % ndim for b in batch}]
        if rows > len(free):
            raise ValueError(f"batch + rows exceed the {ndim} axes")
        rows = tuple(free[:rows])
    assert isinstance(rows, tuple)
    return tuple(batch), tuple(rows)


@dataclasses.dataclass(frozen=True)
class Layout:
    """Static per-leaf layout: batch axes, the matrix view and the buffer rank.

    Every field but ``perm`` describes the leaf in canonical order (batch axes, rows,
    columns). ``row_axes`` is ``None`` for a dense (Adam-like) leaf; its ``batch_axes``
    still make the clipping norm and ε_t per slice (a scanned model's stacked biases).
    ``perm`` is ``None`` when the parameter's axes are already in canonical order, else
    the permutation taking them there (``param.transpose(perm)``).
    """

    row_axes: int | None
    rows: int = 0
    cols: int = 0
    buffer_rank: int = 0
    batch_axes: int = 0
    perm: tuple[int, ...] | None = None


def _plain_ints(x: Any) -> Any:
    """``x`` with NumPy integers (alone or in a tuple) as Python ints."""
    if isinstance(x, tuple):
        return tuple(int(a) if isinstance(a, np.integer) else a for a in x)
    return int(x) if isinstance(x, np.integer) else x


def _validated_positions(
    spec: Any, shape: tuple[int, ...], where: str
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The batch and row axis positions of a ``row_axes`` result, checked against
    ``shape`` (see :func:`layout`)."""
    ndim = len(shape)
    if isinstance(spec, MatrixAxes):  # NumPy integers as Python ones
        spec = MatrixAxes(*(_plain_ints(f) for f in spec))
    else:
        spec = _plain_ints(spec)

    def is_int(x: Any) -> TypeGuard[int]:
        return isinstance(x, int) and not isinstance(x, bool)

    def is_axes(x: Any) -> bool:
        return isinstance(x, tuple) and all(is_int(a) for a in x)

    if isinstance(spec, MatrixAxes):
        if not all(is_int(f) and 0 <= f <= ndim or is_axes(f) for f in spec):
            raise ValueError(
                f"{where}; MatrixAxes needs counts in [0, {ndim}] or tuples of axis positions"
            )
    elif is_int(spec):
        if not 0 <= spec <= ndim:
            raise ValueError(f"{where}; expected an int in [0, {ndim}] or a MatrixAxes")
    else:
        raise ValueError(f"{where}; expected an int or a MatrixAxes")
    try:
        batch, rows = _positions(spec, ndim)
    except ValueError as e:
        raise ValueError(f"{where}; {e}") from None
    if any(not -ndim <= a < ndim for a in batch + rows):
        raise ValueError(f"{where}; an axis position is outside the {ndim} axes")
    batch = tuple(a % ndim for a in batch)
    rows = tuple(a % ndim for a in rows)
    if len(set(batch + rows)) < len(batch + rows):
        raise ValueError(f"{where}; an axis is named twice")
    return batch, rows


def matrix_view(
    row_axes: RowAxesFn, path: tuple[Any, ...], shape: tuple[int, ...], name: str = "row_axes"
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The batch and row axis positions ``row_axes`` gives one leaf, checked.

    Args:
      row_axes: a ``(key_path, shape) -> int | MatrixAxes`` callable.
      path: the leaf's key path.
      shape: the leaf's shape.
      name: what errors call the callable (the keyword it was given as).

    Returns:
      ``(batch, rows)``: non-negative axis positions, as returned (not sorted).

    Raises:
      ValueError: naming the leaf, when ``row_axes`` raises or returns something that is
        not a valid split of ``shape``.

    Example:
      >>> import jax
      >>> from umtam_jax.optimizer._layout import matrix_view, scanned
      >>> matrix_view(scanned("blocks", axis=1), (jax.tree_util.DictKey("blocks"),), (8, 4, 2))
      ((1,), (0,))
    """
    leaf = f"{jax.tree_util.keystr(path) or 'the root'} of shape {shape}"
    try:
        spec = row_axes(path, shape)
    except Exception as err:  # a user's callable: name the leaf it failed on
        raise ValueError(f"{name} raised {type(err).__name__} for {leaf}: {err}") from err
    return _validated_positions(spec, shape, f"{name} returned {spec!r} for {leaf}")


def layout(
    row_axes: RowAxesFn,
    min_dim_size_to_factor: int,
    max_rank: int,
    path: tuple[Any, ...],
    shape: tuple[int, ...],
) -> Layout:
    """The :class:`Layout` of one leaf (dense when a side is below the factoring size).

    Raises:
      ValueError: ``row_axes`` returned something that is not a valid split of ``shape``.
    """
    if not shape:  # a scalar: one value, nothing to split
        return Layout(None)
    batch, rows = matrix_view(row_axes, path, shape)
    cols = tuple(i for i in range(len(shape)) if i not in batch + rows)
    nb, k = len(batch), len(rows)
    identity = tuple(range(len(shape)))
    # A dense leaf only needs its batch axes first (one clipping norm and ε_t per slice).
    dense_perm = tuple(sorted(batch)) + tuple(i for i in identity if i not in batch)
    dense = Layout(None, batch_axes=nb, perm=None if dense_perm == identity else dense_perm)
    perm: tuple[int, ...] | None = tuple(sorted(batch)) + tuple(sorted(rows)) + cols
    perm = None if perm == identity else perm
    if not rows or not cols:
        return dense
    m, n = math.prod(shape[i] for i in rows), math.prod(shape[i] for i in cols)
    if min(m, n) < min_dim_size_to_factor:
        return dense
    return Layout(k, m, n, min(max_rank, m, n), nb, perm)
