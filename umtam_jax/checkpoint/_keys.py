"""Typed PRNG key leaves (``jax.random.key``) in checkpoints.

Orbax and NumPy store numbers, and a typed key array's dtype (``key<fry>``) is none: a key
is stored as its key data (``jax.random.key_data``, a ``uint32`` array with the
implementation's trailing dimensions) and its structure record names the implementation
(``{"t": "key", "impl": "threefry2x32", "leaf": <the data's array record>}``), the name
``jax.random.wrap_key_data(data, impl=...)`` rebuilds it from. Checksums, shapes and
shardings then apply to the stored data like to any other array. Raw ``uint32`` keys
(``jax.random.PRNGKey``) are plain arrays and stay so.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def is_key(x: Any) -> bool:
    """Whether ``x`` (an array or ``jax.ShapeDtypeStruct``) is a typed PRNG key array."""
    dtype = getattr(x, "dtype", None)
    try:
        return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
    except TypeError:  # a dtype JAX cannot interpret is no key; the caller refuses it
        return False


def split(x: Any, what: str) -> tuple[str, Any]:
    """A typed key array → (its implementation's name, its key data).

    Args:
      x: a typed key array, or a ``jax.ShapeDtypeStruct`` of a key dtype (a target).
      what: names the leaf in the error message.

    Returns:
      The registered implementation name (``"threefry2x32"``, ``"rbg"``, ...) and the key
      data: a ``uint32`` ``jax.Array`` for an array, a ``jax.ShapeDtypeStruct`` with the
      key's sharding for an abstract key.

    Raises:
      TypeError: the key's implementation is not registered with JAX by name, so it could
        not be rebuilt from a name on restore.
    """
    if isinstance(x, jax.ShapeDtypeStruct):
        names: list[Any] = []

        def probe(key: jax.Array) -> jax.Array:
            names.append(jax.random.key_impl(key))  # a Python value, read while tracing
            return jax.random.key_data(key)

        # Shape and dtype only: the sharding, which may not fit (the restore reports that
        # naming the leaf), would be checked here, and would come back abstract.
        abstract = jax.eval_shape(probe, jax.ShapeDtypeStruct(x.shape, x.dtype))
        # The key's own sharding fits its data: a NamedSharding's spec covers the leading
        # (key) dimensions and leaves the trailing data dimensions replicated.
        data: Any = jax.ShapeDtypeStruct(abstract.shape, abstract.dtype, sharding=x.sharding)
        impl = names[0]
    else:
        impl, data = jax.random.key_impl(x), jax.random.key_data(x)
    if not isinstance(impl, str):  # a PRNGSpec: an implementation not registered by name
        raise TypeError(
            f"{what} uses an unregistered PRNG implementation ({impl}); only keys whose "
            "implementation JAX knows by name (jax.random.key(seed, impl=name)) are stored"
        )
    return impl, data


def check_impl(impl: str, what: str) -> None:
    """Raises ValueError when this JAX cannot rebuild keys of implementation ``impl``.

    Args:
      impl: the implementation name from a structure record.
      what: names the checkpoint's leaf in the error message.
    """
    try:
        jax.random.key_dtype(impl)
    except (ValueError, TypeError) as err:
        raise ValueError(
            f"{what} is a PRNG key of implementation {impl!r}, which this JAX "
            f"({jax.__version__}) cannot rebuild ({err})"
        ) from None


def wrap(data: Any, impl: str) -> Any:
    """Rebuilds a key array from its restored key data.

    A ``jax.ShapeDtypeStruct`` becomes an abstract key (no sharding); anything that is not
    an array (the placeholders of a structure-only decode, a missing entry) is returned as
    it is.
    """
    if isinstance(data, jax.ShapeDtypeStruct):
        return jax.eval_shape(functools.partial(jax.random.wrap_key_data, impl=impl), data)
    if isinstance(data, jax.Array | np.ndarray):  # NumPy data: onto the default device
        return jax.random.wrap_key_data(jnp.asarray(data), impl=impl)
    return data
