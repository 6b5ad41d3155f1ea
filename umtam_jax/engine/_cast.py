"""Casting merged and read arrays to a narrower dtype without silent overflow."""

from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp
import numpy as np


def cast_checked(x: Any, dtype: np.dtype, what: str) -> Any:
    """``x`` (a NumPy or JAX array) in ``dtype``, refusing a cast that overflows.

    Narrowing a floating array (float32 to float16, say) turns every value beyond the
    target's range into ±inf; that is an error naming ``what``, never a silent inf.

    Args:
      x: the array.
      dtype: the dtype to cast to.
      what: the array's name in the error (a leaf path, a file).

    Returns:
      ``x.astype(dtype)``.

    Raises:
      ValueError: a finite value of ``x`` is out of ``dtype``'s range.

    Example:
      >>> import numpy as np
      >>> from umtam_jax.engine._cast import cast_checked
      >>> cast_checked(np.array([1.0, 7e4], "f4"), np.dtype("f2"), "['w']")  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      ValueError: ['w'] holds 70000, beyond float16's largest finite value 65504: ...
    """
    with np.errstate(over="ignore"):  # an overflow is reported below, by name
        out = x.astype(dtype)
    dtype = np.dtype(dtype)
    if not (jnp.issubdtype(dtype, jnp.floating) and jnp.issubdtype(x.dtype, jnp.floating)):
        return out
    largest = float(jnp.finfo(dtype).max)
    if largest >= float(jnp.finfo(x.dtype).max) or x.size == 0:
        return out
    xp = np if isinstance(x, np.ndarray) else jnp
    peak = float(xp.max(xp.abs(x)))
    if math.isfinite(peak) and not math.isfinite(float(xp.max(xp.abs(out)))):
        raise ValueError(
            f"{what} holds {peak:.6g}, beyond {dtype.name}'s largest finite value "
            f"{largest:.6g}: use a wider dtype (bfloat16 or float32)"
        )
    return out
