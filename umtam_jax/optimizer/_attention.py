"""Flax attention projections viewed as the matrices (and vectors) they stand for.

``nnx.MultiHeadAttention`` and ``linen.MultiHeadDotProductAttention`` (and MaxText) keep
each projection as a ``DenseGeneral`` kernel of three axes, and the query/key/value
biases as ``(heads, head_dim)``; PyTorch stores each projection as one matrix and each
bias as one vector. The optimizer's default view (``default_row_axes``) and the merges
that decompose matrices read these leaves as PyTorch stores them.
"""

from __future__ import annotations

from typing import Any

from umtam_jax import _pytrees

#: The attention projections whose 3-axis kernels are ``(in, heads, head_dim)``.
_ATTENTION_INPUTS = frozenset({"query", "key", "value"})
#: The attention projection whose 3-axis kernel is ``(heads, head_dim, out)``.
_ATTENTION_OUTPUT = "out"


def attention_rows(path: tuple[Any, ...], shape: tuple[int, ...]) -> int | None:
    """The row axes of a Flax attention projection's kernel viewed as one matrix.

    ``nnx.MultiHeadAttention`` and ``linen.MultiHeadDotProductAttention`` (and MaxText)
    keep each projection as a ``DenseGeneral`` kernel with three axes: a ``kernel`` under
    ``query``, ``key`` or ``value`` is ``(in, heads, head_dim)`` when its first axis is
    longer than its second (a layer-stacked ``[L, in, out]`` kernel of that name, with
    fewer layers than inputs, is not), one matrix ``(in, heads · head_dim)``; a ``kernel``
    under ``out`` is ``(heads, head_dim, out)`` when ``heads · head_dim = out`` (the
    default of both layers; a stacked ``[L, in, out]`` kernel of that name is not), one
    matrix ``(heads · head_dim, out)``.

    Args:
      path: the leaf's key path.
      shape: the leaf's shape.

    Returns:
      1 or 2 (the leading axes forming the rows) for such a kernel; None otherwise.

    Example:
      >>> import jax
      >>> from umtam_jax.optimizer._attention import attention_rows
      >>> key = lambda *names: tuple(jax.tree_util.DictKey(n) for n in names)
      >>> attention_rows(key("attn", "query", "kernel"), (512, 8, 64))
      1
      >>> attention_rows(key("attn", "out", "kernel"), (8, 64, 512))
      2
      >>> attention_rows(key("blocks", "out", "kernel"), (12, 512, 2048)) is None  # [L, in, out]
      True
      >>> attention_rows(key("mlp", "kernel"), (8, 64, 512)) is None
      True
    """
    if len(shape) != 3 or len(path) < 2:
        return None
    module, leaf = (str(_pytrees.key_name(k)) for k in path[-2:])
    if leaf != "kernel":
        return None
    if module in _ATTENTION_INPUTS and shape[0] > shape[1]:
        return 1
    return 2 if module == _ATTENTION_OUTPUT and shape[0] * shape[1] == shape[2] else None


def is_attention_bias(path: tuple[Any, ...], shape: tuple[int, ...]) -> bool:
    """Whether a leaf is the ``(heads, head_dim)`` bias of a Flax attention ``query``,
    ``key`` or ``value`` projection (one vector of ``heads · head_dim`` entries).

    Example:
      >>> import jax
      >>> from umtam_jax.optimizer._attention import is_attention_bias
      >>> path = tuple(jax.tree_util.DictKey(n) for n in ("attn", "query", "bias"))
      >>> is_attention_bias(path, (8, 64)), is_attention_bias(path[1:], (64,))
      (True, False)
    """
    if len(shape) != 2 or len(path) < 2:
        return False
    module, leaf = (str(_pytrees.key_name(k)) for k in path[-2:])
    return leaf == "bias" and module in _ATTENTION_INPUTS
