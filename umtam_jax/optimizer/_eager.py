"""The update called eagerly (outside the caller's ``jit``): compiled once per configuration
and input signature, and shared by every transform built with the same options.

Step by step without it, each ``lax.cond`` of the update would be compiled again at every
call (new closures). ``optax.inject_hyperparams`` builds a new transform at every step,
passing its numeric hyper-parameters as JAX arrays: those are arguments of the compiled
update, the other options are part of its key. The most recently used compilations are
kept, one executable each (the signature holds what a jit would compile again for: each
leaf's shape, dtype, weak type and placement); on XLA:CPU every executable holds memory
maps of its machine code (about a hundred for an update; Linux allows a process 65,530),
so an unbounded cache runs a long process out of them.
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
    """One fixed option as part of a compilation's key: equal only for the same type and
    value (``np.float64(0.5) == 0.5``, yet under x64 the first makes the state float64), a
    NumPy array by its dtype, shape and bytes, and a value that cannot be hashed (a
    mutable callable as ``row_axes``) by identity, kept alive by the key so that its
    identity is never reused while the compilation is kept."""

    def __init__(self, value: Any):
        self.value = value
        if isinstance(value, np.ndarray):
            self._key: Any = (np.ndarray, value.dtype.str, value.shape, value.tobytes())
        else:
            self._key = (type(value), value)
        try:
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

    def __repr__(self) -> str:
        return repr(self.value)


@functools.lru_cache(maxsize=CACHE_SIZE)
def compiled(update: Update, static: tuple, signature: tuple) -> Callable[..., Any]:
    """The compiled ``update`` of one configuration (its fixed options ``static``) and one
    input signature: a jit of its own, whose executable goes with it when it is dropped."""
    del signature  # part of the key only: one signature per jit, hence one executable
    fixed = {name: option.value for name, option in static}

    def scale_by_umtam_update(options, updates, state, params):
        return update(Config(**fixed, **options), updates, state, params)

    return jax.jit(scale_by_umtam_update)


def _signature(tree: Any) -> tuple:
    """What a jit's executable depends on in ``tree``: its structure and each leaf's type
    (shape, dtype, weak type) and placement."""
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple((jax.typeof(x), getattr(x, "sharding", None)) for x in leaves)


def eager_update(update: Update, cfg: Config, *inputs: Any) -> tuple[Any, Any]:
    """``update(cfg, *inputs)`` through the shared compilation of ``cfg`` and the inputs'
    signature.

    Args:
      update: the update function of a configuration, ``update(cfg, updates, state,
        params)``; a module-level function (it is part of the key).
      cfg: the transform's configuration.
      *inputs: ``updates, state, params``.

    Returns:
      What ``update`` returns.
    """
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    # optax.inject_hyperparams passes its numeric hyper-parameters as JAX arrays.
    options = {k: v for k, v in fields.items() if isinstance(v, jax.Array)}
    static = tuple((k, _Option(v)) for k, v in fields.items() if k not in options)
    signature = _signature((options, *inputs))
    return compiled(update, static, signature)(options, *inputs)
