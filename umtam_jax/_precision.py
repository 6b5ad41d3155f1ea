"""Full float32 matrix products, whatever the platform's default precision."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp


def full_precision(fn):
    """Runs ``fn``'s matmuls in full float32: on GPU/TPU the default precision (TF32/bf16
    passes) leaves the Gram-based bases ~1e-4 away from orthonormal (measured on an H100),
    and the products of SVD factors carry ~1e-3 relative error.

    Example:
      >>> import jax.numpy as jnp
      >>> from umtam_jax._precision import full_precision
      >>> full_precision(jnp.matmul)(jnp.eye(2), jnp.ones((2, 1))).tolist()
      [[1.0], [1.0]]
    """

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with jax.default_matmul_precision("highest"):
            return fn(*args, **kwargs)

    return wrapped


def at_least_float32(dtype: Any) -> Any:
    """The dtype to compute in for arrays of ``dtype``: float32 for narrower floats (8-
    and 16-bit: JAX promotes no 8-bit float implicitly, so it is done here), else
    ``jnp.promote_types(dtype, float32)``.

    Example:
      >>> import jax.numpy as jnp
      >>> from umtam_jax._precision import at_least_float32
      >>> [at_least_float32(d).name for d in (jnp.float8_e4m3fn, jnp.bfloat16, jnp.float32)]
      ['float32', 'float32', 'float32']
    """
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize < 4:
        return jnp.dtype(jnp.float32)
    return jnp.promote_types(dtype, jnp.float32)
