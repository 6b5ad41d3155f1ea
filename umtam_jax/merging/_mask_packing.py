"""Task masks stored at one bit per entry (TALL masks, EMR's masks)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def pack_mask(mask: Any) -> Any:
    """A boolean mask pytree as 1 bit per entry: each leaf ``jnp.packbits`` of its
    flattened entries (``uint8``, ``ceil(N / 8)`` bytes); :func:`unpack_mask` inverts it.

    Args:
      mask: a pytree of boolean (or 0/1) arrays, e.g. :func:`tall_masks`' per-task masks.

    Returns:
      The pytree of packed ``uint8`` vectors, 8× smaller than boolean arrays.

    Example:
      >>> import jax.numpy as jnp
      >>> from umtam_jax import merging
      >>> packed = merging.pack_mask({"w": jnp.array([True, False, True])})
      >>> packed["w"].tolist()
      [160]
      >>> merging.unpack_mask(packed, {"w": jnp.zeros(3)})["w"].tolist()
      [True, False, True]
    """
    return jax.tree.map(lambda m: jnp.packbits(jnp.ravel(jnp.asarray(m, bool))), mask)


def unpack_mask(packed: Any, like: Any) -> Any:
    """The boolean mask :func:`pack_mask` packed, with the shapes of ``like``'s leaves.

    Args:
      packed: :func:`pack_mask`'s output.
      like: a pytree with the mask's structure and shapes (the base, for example).

    Returns:
      The boolean mask pytree.

    Example:
      >>> import jax.numpy as jnp
      >>> from umtam_jax import merging
      >>> like = {"w": jnp.zeros((2, 2))}
      >>> packed = merging.pack_mask({"w": jnp.array([[True, False], [False, True]])})
      >>> merging.unpack_mask(packed, like)["w"].tolist()
      [[True, False], [False, True]]
    """
    return jax.tree.map(
        lambda p, x: jnp.unpackbits(p, count=x.size).astype(bool).reshape(x.shape), packed, like
    )
