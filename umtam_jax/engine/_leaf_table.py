"""The pieces of a :class:`~umtam_jax.engine._job.Job`'s leaf table.

Each leaf's record (:class:`Leaf`), where a source holds each leaf (:func:`positions`),
a leaf's key path rebuilt around it alone (:func:`wrap`), the casts of abstract and read
leaves to the dtype a merge reads in (:func:`cast_abstract`, :func:`cast_arrays`), and
the leaves cut into groups read together (:func:`byte_groups`), and a tree without the
leaves copied from the base (:func:`without_buffers`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from umtam_jax._cast import cast_checked


@jax.tree_util.register_pytree_with_keys_class
class _PathNode:
    """A pytree node with one child under a given key entry (DictKey, SequenceKey, ...).

    A chain of these rebuilds a leaf's exact key path around the leaf alone, so
    ``keystr`` paths (and hence error messages and DARE's per-leaf keys) are unchanged.
    """

    def __init__(self, key: Any, child: Any):
        self.key = key
        self.child = child

    def tree_flatten_with_keys(self):
        return ((self.key, self.child),), self.key

    @classmethod
    def tree_unflatten(cls, key, children):
        return cls(key, children[0])


def wrap(keypath: tuple[Any, ...], leaf: Any) -> Any:
    """``leaf`` alone in a tree where its key path is ``keypath``.

    Args:
      keypath: the leaf's key path in its model (DictKey, SequenceKey, ... entries).
      leaf: an array, or a subtree such as a statistics node.

    Returns:
      A chain of one-child nodes, one per key, around ``leaf``.
    """
    for key in reversed(keypath):
        leaf = _PathNode(key, leaf)
    return leaf


@dataclasses.dataclass
class Leaf:
    """One leaf of the table.

    Attributes:
      keypath: its key path in the base.
      shape, dtype: the merged output's.
      nbytes: the merged output's size in bytes.
    """

    keypath: tuple[Any, ...]
    shape: tuple[int, ...]
    dtype: np.dtype  # of the merged output (canonical)
    nbytes: int


def positions(tree: Any) -> dict[str, int]:
    """Where a tree holds each leaf, by key path.

    Args:
      tree: a pytree (a source's :meth:`~umtam_jax.engine.Source.abstract`).

    Returns:
      ``{keystr(path): flattening position}`` of its leaves.
    """
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(kp): i for i, (kp, _) in enumerate(flat)}


def cast_abstract(tree: Any, dtype: np.dtype | None) -> Any:
    """An abstract tree as read in ``dtype``.

    Args:
      tree: a pytree of ``jax.ShapeDtypeStruct``.
      dtype: the read dtype; None: as stored.

    Returns:
      ``tree`` with its floating leaves in ``dtype``, the others as they are.
    """
    if dtype is None:
        return tree

    def cast(x: Any) -> Any:
        if not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype == dtype:
            return x
        return jax.ShapeDtypeStruct(x.shape, dtype)

    return jax.tree.map(cast, tree)


def cast_arrays(
    arrays: dict[int, Any], dtype: np.dtype | None, location: str, leaves: list[Leaf]
) -> dict[int, Any]:
    """A group's arrays, read from one source, in the read dtype.

    Args:
      arrays: ``{leaf index: array}``.
      dtype: the read dtype; None: as stored.
      location: the source's, named in errors.
      leaves: the leaf table (for the tensors' key paths).

    Returns:
      ``arrays`` with their floating arrays in ``dtype``, the others as they are.

    Raises:
      ValueError: a finite value beyond ``dtype``'s range, naming the tensor.
    """
    if dtype is None:
        return arrays
    out = {}
    for j, x in arrays.items():
        if not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype == dtype:
            out[j] = x
            continue
        what = f"{location}'s tensor {jax.tree_util.keystr(leaves[j].keypath)}"
        out[j] = cast_checked(x, dtype, f"{what} (read as {dtype.name})")
    return out


def byte_groups(leaves: list[Leaf], group_bytes: int) -> list[list[int]]:
    """The leaves' indices, in order, cut into groups of consecutive leaves.

    Args:
      leaves: the leaf table.
      group_bytes: the most bytes (of :attr:`Leaf.nbytes`) a group holds, unless one
        leaf alone is more.

    Returns:
      Lists of leaf indices, each non-empty.
    """
    out: list[list[int]] = []
    current: list[int] = []
    size = 0
    for j, leaf in enumerate(leaves):
        if current and size + leaf.nbytes > group_bytes:
            out.append(current)
            current, size = [], 0
        current.append(j)
        size += leaf.nbytes
    if current:
        out.append(current)
    return out


def without_buffers(tree: Any, treedef: Any, passthrough: set[int], per_leaf: bool) -> Any:
    """``tree`` with None at the leaves numbered ``passthrough`` of ``treedef`` (the base's
    structure; with ``per_leaf``, a subtree at each of its leaves); a tree of another
    structure as it is (validation names the difference)."""
    if not passthrough:
        return tree
    try:
        leaves, own = (treedef.flatten_up_to(tree), treedef) if per_leaf else jax.tree.flatten(tree)
    except (ValueError, TypeError):
        return tree
    if own != treedef:
        return tree
    # An empty subtree at a per-leaf tree's buffer: None would read as a missing node.
    empty = () if per_leaf else None
    leaves = [empty if j in passthrough else x for j, x in enumerate(leaves)]
    return jax.tree_util.tree_unflatten(treedef, leaves)
