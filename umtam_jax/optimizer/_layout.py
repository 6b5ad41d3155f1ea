"""Which axes of a parameter form the matrices UMTAM factors.

UMTAM works on matrices: a leaf of shape ``batch + rows + cols`` is a stack of
``prod(batch)`` independent ``prod(rows) × prod(cols)`` matrices, each with its own
low-rank momentum, second moments, clipping norm, ε_t, saliency and adaptive rank. The
split is chosen per leaf by a callable ``(key_path, shape) -> int | MatrixAxes``:
an ``int`` k means no batch axes and rows ``shape[:k]`` (the historical form), a
:class:`MatrixAxes` gives the number of leading batch axes too.

Layer-stacked models (``flax.nnx.scan``, ``flax.linen.scan``, ``nnx.vmap``-built layers)
keep the weights of all L layers in one ``[L, d_in, d_out]`` array: :func:`scanned` marks
those leaves' leading axis as a batch axis, so each layer is factored on its own.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax


class MatrixAxes(NamedTuple):
    """The axes of one leaf: ``batch`` leading batch axes, then ``rows`` row axes; the
    remaining trailing axes form the columns.

    Attributes:
      batch: how many leading axes index independent matrices (0: one matrix).
      rows: how many of the following axes form the rows of each matrix.
    """

    batch: int
    rows: int


RowAxesFn = Callable[[tuple[Any, ...], tuple[int, ...]], "int | MatrixAxes"]
"""``(key_path, shape) -> k | MatrixAxes``: the matrix view of a leaf (see module doc)."""


def default_row_axes(path: tuple[Any, ...], shape: tuple[int, ...]) -> int:
    """Default view: one matrix, fan-in × fan-out = ``(prod(shape[:-1]), shape[-1])``.

    Right for Flax ``Dense`` (in, out), ``DenseGeneral`` and ``Conv`` (..., in, out)
    kernels. For layer-stacked (scanned) models use :func:`scanned`.

    Example:
      >>> default_row_axes((), (3, 3, 16, 32))
      3
    """
    del path
    return max(len(shape) - 1, 0)


def _key_name(key: Any) -> Any:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return getattr(key, attr)
    return key


def scanned(
    *names: str, batch: int = 1, inner: RowAxesFn = default_row_axes
) -> Callable[[tuple[Any, ...], tuple[int, ...]], int | MatrixAxes]:
    """A ``row_axes`` callable for layer-stacked (scanned) models.

    Leaves whose key path contains one of ``names`` (a module or collection name such as
    the attribute holding an ``nnx.scan``-built block) have ``batch`` leading layer
    axes: each layer's matrix is factored on its own, with the view ``inner`` gives for
    the shape without those axes. Other leaves keep ``inner``'s view.

    Args:
      *names: key names marking the scanned subtrees; none: every leaf with more than
        two axes is treated as scanned.
      batch: number of leading stacking axes of the scanned leaves.
      inner: the view of one layer's weight (default :func:`default_row_axes`).

    Returns:
      A callable for ``umtam(..., row_axes=...)``.

    Example:
      >>> import jax.numpy as jnp, umtam_jax
      >>> params = {"blocks": {"kernel": jnp.ones((4, 256, 128))}, "head": jnp.ones((256, 8))}
      >>> opt = umtam_jax.umtam(1e-3, rank=8, row_axes=umtam_jax.scanned("blocks"))
      >>> opt.init(params)[0].leaves["blocks"]["kernel"].sigma.shape  # one core per layer
      (4, 8, 8)

    References:
      Flax ``nnx.scan`` / ``linen.scan`` (stacked layer parameters); the batch axes of
      ``optax.contrib.muon``'s dimension numbers.
    """
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    wanted = set(names)

    def row_axes(path: tuple[Any, ...], shape: tuple[int, ...]) -> int | MatrixAxes:
        hit = any(_key_name(k) in wanted for k in path) if wanted else len(shape) > 2
        if not hit or len(shape) <= batch:
            return inner(path, shape)
        k = inner(path, shape[batch:])
        if isinstance(k, MatrixAxes):
            return MatrixAxes(batch + k.batch, k.rows)
        return MatrixAxes(batch, k)

    return row_axes


@dataclasses.dataclass(frozen=True)
class Layout:
    """Static per-leaf layout: batch axes, the matrix view and the buffer rank.

    ``row_axes`` is ``None`` for a dense (Adam-like) leaf; its ``batch_axes`` still make
    the clipping norm and ε_t per slice (a scanned model's stacked biases).
    """

    row_axes: int | None
    rows: int = 0
    cols: int = 0
    buffer_rank: int = 0
    batch_axes: int = 0


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
    if len(shape) < 2:
        return Layout(None)
    spec = row_axes(path, shape)
    where = f"row_axes returned {spec!r} for {jax.tree_util.keystr(path)} of shape {shape}"
    if isinstance(spec, MatrixAxes):
        nb, k = spec
        if not (isinstance(nb, int) and isinstance(k, int) and nb >= 0 and k >= 0):
            raise ValueError(f"{where}; MatrixAxes needs non-negative ints")
        if nb + k > len(shape):
            raise ValueError(f"{where}; batch + rows exceed the {len(shape)} axes")
    elif isinstance(spec, int) and not isinstance(spec, bool):
        nb, k = 0, spec
        if not 0 <= k <= len(shape):
            raise ValueError(f"{where}; expected an int in [0, {len(shape)}] or a MatrixAxes")
    else:
        raise ValueError(f"{where}; expected an int or a MatrixAxes")
    matrix = shape[nb:]
    if k in (0, len(matrix)):
        return Layout(None, batch_axes=nb)
    rows, cols = math.prod(matrix[:k]), math.prod(matrix[k:])
    if min(rows, cols) < min_dim_size_to_factor:
        return Layout(None, batch_axes=nb)
    return Layout(k, rows, cols, min(max_rank, rows, cols), nb)
