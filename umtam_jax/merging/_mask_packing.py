"""Task masks stored at one bit per entry (TALL masks, EMR's masks)."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from umtam_jax.merging import _validation as V


def check_boolean(mask: Any, path: str, what: str) -> None:
    """A mask leaf must be a boolean array: 0/1 numbers are refused, not rounded (a float
    mask such as ``[0, 0.5, nan]`` would silently read as ``[False, True, True]``)."""
    if not V.is_array(mask) or jnp.dtype(mask.dtype) != jnp.bool_:
        raise TypeError(f"{what}{path} must be a boolean array, got {V.describe(mask)}")


def pack_mask(mask: Any) -> Any:
    """A boolean mask pytree as 1 bit per entry: each leaf ``jnp.packbits`` of its
    flattened entries (``uint8``, ``ceil(N / 8)`` bytes); :func:`unpack_mask` inverts it.

    Args:
      mask: a pytree of boolean arrays, e.g. :func:`tall_masks`' per-task masks.

    Returns:
      The pytree of packed ``uint8`` vectors, 8× smaller than boolean arrays.

    Raises:
      TypeError: a leaf that is not a boolean array; the message names its path.

    Example:
      >>> import jax.numpy as jnp
      >>> from umtam_jax import merging
      >>> packed = merging.pack_mask({"w": jnp.array([True, False, True])})
      >>> packed["w"].tolist()
      [160]
      >>> merging.unpack_mask(packed, {"w": jnp.zeros(3)})["w"].tolist()
      [True, False, True]
    """
    paths, leaves, treedef = V.flatten(mask)
    for path, m in zip(paths, leaves, strict=True):
        check_boolean(m, path, "mask")
    return jax.tree_util.tree_unflatten(treedef, [jnp.packbits(jnp.ravel(m)) for m in leaves])


def unpack_mask(packed: Any, like: Any) -> Any:
    """The boolean mask :func:`pack_mask` packed, with the shapes of ``like``'s leaves.

    The packed form keeps the bytes, not the entry count: each packed leaf must have the
    ``ceil(N / 8)`` bytes of its ``like`` leaf's ``N`` entries, with the bits past the
    ``N``-th 0 (checked when the values are known, not under ``jax.jit``). A mask of
    another shape with as many bytes whose extra bits are all 0 cannot be told apart.

    Args:
      packed: :func:`pack_mask`'s output.
      like: a pytree with the mask's structure and shapes (the base, for example; arrays
        or ``jax.ShapeDtypeStruct``).

    Returns:
      The boolean mask pytree.

    Raises:
      ValueError / TypeError: trees of different structures, a packed leaf that is not a
        1-D ``uint8`` array or not as long as its ``like`` leaf needs; messages name the
        leaf path.

    Example:
      >>> import jax.numpy as jnp
      >>> from umtam_jax import merging
      >>> like = {"w": jnp.zeros((2, 2))}
      >>> packed = merging.pack_mask({"w": jnp.array([[True, False], [False, True]])})
      >>> merging.unpack_mask(packed, like)["w"].tolist()
      [[True, False], [False, True]]
    """
    paths, leaves, treedef = V.flatten(packed)
    like_paths, shapes, _ = V.flatten(like)
    if paths != like_paths:
        raise V.structure_error("packed", like_paths, paths, "like")
    tails = []  # (path, last byte, mask of its bits past the entries)
    for path, p, x in zip(paths, leaves, shapes, strict=True):
        if not V.is_array(p) or jnp.dtype(p.dtype) != jnp.uint8 or len(p.shape) != 1:
            raise TypeError(
                f"packed{path} must be pack_mask's 1-D uint8 array, got {V.describe(p)}"
            )
        if not V.is_array(x):
            raise TypeError(f"like{path} is a {type(x).__name__}, not an array")
        size, shape = math.prod(x.shape), tuple(x.shape)
        if p.shape[0] != -(-size // 8):
            raise ValueError(
                f"packed{path} holds {8 * p.shape[0]} bits (length {p.shape[0]}), but "
                f"like{path} has shape {shape}: its {size} entries need length {-(-size // 8)}"
            )
        if size % 8:  # packbits fills the last byte from its high bit
            tails.append((path, shape, size, p, 0xFF >> (size % 8)))
    arrays = [p for *_, p, _ in tails]
    set_bits = V.read_concrete(arrays, lambda: [p[-1] & pad for *_, p, pad in tails])
    for (path, shape, size, *_), bits in zip(tails, set_bits or [], strict=False):
        if bits:
            raise ValueError(
                f"packed{path} has bits set beyond the {size} entries of like{path} (shape "
                f"{shape}): it was packed from a mask of another shape"
            )
    out = [
        jnp.unpackbits(p, count=math.prod(x.shape)).astype(bool).reshape(x.shape)
        for p, x in zip(leaves, shapes, strict=True)
    ]
    return jax.tree_util.tree_unflatten(treedef, out)
