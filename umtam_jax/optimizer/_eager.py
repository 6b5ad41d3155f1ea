"""The update called eagerly (outside the caller's ``jit``): compiled once per configuration
and input signature, and shared by every transform built with the same options.

Step by step without it, each ``lax.cond`` of the update would be compiled again at every
call (new closures). ``optax.inject_hyperparams`` builds a new transform at every step,
passing its numeric hyper-parameters as arrays: those are arguments of the compiled update,
the other options are part of its key. The most recently used compilations are kept; each
holds an executable, and on XLA:CPU every executable holds memory maps of its machine code
(about a hundred for an update; Linux allows a process 65,530), so an unbounded cache runs
a long process out of them.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from umtam_jax.optimizer._config import Config

CACHE_SIZE = 32
"""How many eager compilations are kept (least recently used ones are dropped)."""

Update = Callable[[Config, Any, Any, Any], tuple[Any, Any]]


class _Option:
    """One static option as part of a compilation's key: equal only for the same type and
    value (``np.float32(0.9) == 0.9``, but they compute differently) or, for a value that
    cannot be hashed (a mutable callable as ``row_axes``), the same object, which the key
    keeps alive (so its identity is never reused while the compilation is kept)."""

    def __init__(self, value: Any):
        self.value = value
        try:
            self._key: Any = (type(value), value)
            self._hash = hash(self._key)
        except TypeError:
            self._key, self._hash = None, id(value)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _Option):
            return NotImplemented
        if self._key is None or other._key is None:
            return self.value is other.value
        return self._key == other._key


def _from_options(update: Update, static: tuple, dynamic: dict[str, Any], *inputs: Any):
    """``update`` of the configuration whose fixed options are ``static`` and whose array
    options are ``dynamic``."""
    fixed = {name: option.value for name, option in static}
    return update(Config(**fixed, **dynamic), *inputs)


@functools.lru_cache(maxsize=CACHE_SIZE)
def compiled(update: Update, static: tuple, signature: tuple) -> Callable[..., Any]:
    """The compiled ``update`` of one configuration (its fixed options ``static``) and one
    input signature: a jit of its own, whose executable goes with it when it is dropped."""
    del signature  # part of the key only: one signature per jit, hence one executable
    return jax.jit(functools.partial(_from_options, update, static))


def _signature(tree: Any) -> tuple:
    """The structure, shapes and dtypes of ``tree`` (hashable)."""
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple((np.shape(x), getattr(x, "dtype", type(x))) for x in leaves)


def eager_update(
    update: Update, cfg: Config, fallback: Callable[..., Any], *inputs: Any
) -> tuple[Any, Any]:
    """``update(cfg, *inputs)`` through the shared compilation of ``cfg`` and the inputs'
    signature; ``fallback`` (the transform's own jit) serves inputs whose structure cannot
    be hashed.

    Args:
      update: the update function of a configuration, ``update(cfg, updates, state,
        params)``; a module-level function (it is part of the key).
      cfg: the transform's configuration.
      fallback: ``update`` of ``cfg``, jit-compiled by the transform.
      *inputs: ``updates, state, params``.

    Returns:
      What ``update`` returns.
    """
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    dynamic = {k: v for k, v in fields.items() if isinstance(v, jax.Array | np.ndarray)}
    static = tuple((k, _Option(v)) for k, v in fields.items() if k not in dynamic)
    try:
        signature = _signature((dynamic, *inputs))
        hash(signature)
    except TypeError:  # a pytree node whose auxiliary data cannot be hashed
        return fallback(*inputs)
    return compiled(update, static, signature)(dynamic, *inputs)
