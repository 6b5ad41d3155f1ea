"""Casting merged, read and restored arrays to a narrower dtype without silent overflow."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np


def cast_checked(
    x: Any, dtype: np.dtype, what: str, fix: str = "use a wider dtype (bfloat16 or float32)"
) -> Any:
    """``x`` (a NumPy or JAX array) in ``dtype``, refusing a cast that overflows.

    Narrowing a floating array (float32 to float16, say) turns every value beyond the
    target's range into ±inf, and narrowing an integer array (int64 to int32) wraps them
    around; either is an error naming ``what``, never a silent inf or a wrong integer.

    Args:
      x: the array.
      dtype: the dtype to cast to.
      what: the array's name in the error (a leaf path, a file).
      fix: what the error suggests.

    Returns:
      ``x.astype(dtype)``; ``x`` itself where it has that dtype already (no copy: a merged
      embedding is hundreds of MB).

    Raises:
      ValueError: a finite value of ``x`` is out of ``dtype``'s range.

    Example:
      >>> import numpy as np
      >>> from umtam_jax._cast import cast_checked
      >>> cast_checked(np.array([1.0, 7e4], "f4"), np.dtype("f2"), "['w']")  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      ValueError: ['w'] holds 70000, beyond float16's largest finite value 65504: ...
      >>> cast_checked(np.array([2**40], "i8"), np.dtype("i4"), "['n']")  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      ValueError: ['n'] holds 1099511627776, beyond int32's range [-2147483648, 2147483647]: ...
    """
    if np.dtype(x.dtype) == np.dtype(dtype):
        return x
    with np.errstate(over="ignore"):  # an overflow is reported below, by name
        out = x.astype(dtype)
    dtype = np.dtype(dtype)
    xp = np if isinstance(x, np.ndarray) else jnp
    if jnp.issubdtype(dtype, jnp.integer) and jnp.issubdtype(x.dtype, jnp.integer):
        info = np.iinfo(dtype)
        if x.size == 0 or np.iinfo(x.dtype).min >= info.min and np.iinfo(x.dtype).max <= info.max:
            return out
        low, high = int(xp.min(x)), int(xp.max(x))
        if low < info.min or high > info.max:
            value = high if high > info.max else low
            raise ValueError(
                f"{what} holds {value}, beyond {dtype.name}'s range [{info.min}, {info.max}]: {fix}"
            )
        return out
    if not jnp.issubdtype(dtype, jnp.floating):
        return out
    largest = float(jnp.finfo(dtype).max)
    if jnp.issubdtype(x.dtype, jnp.integer):  # an int beyond a narrow float's range: ±inf
        source_largest = float(np.iinfo(x.dtype).max)
    elif jnp.issubdtype(x.dtype, jnp.floating):
        source_largest = float(jnp.finfo(x.dtype).max)
    else:
        return out
    if largest >= source_largest or x.size == 0:
        return out
    overflowed = xp.isfinite(x) & ~xp.isfinite(out)  # entry by entry: x may hold inf, NaN
    if bool(xp.any(overflowed)):
        wide = np.float64 if xp is np else jnp.promote_types(x.dtype, jnp.float32)
        magnitude = xp.abs(x.astype(wide))  # abs of an int's minimum would wrap around
        peak = float(xp.max(xp.where(overflowed, magnitude, 0)))
        raise ValueError(
            f"{what} holds {peak:.6g}, beyond {dtype.name}'s largest finite value "
            f"{largest:.6g}: {fix}"
        )
    return out
