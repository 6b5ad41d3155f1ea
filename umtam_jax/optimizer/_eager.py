"""The update called eagerly (outside the caller's ``jit``): compiled once per configuration
and input signature, and shared by every transform built with the same options.

Step by step without it, each ``lax.cond`` of the update would be compiled again at every
call (new closures). ``optax.inject_hyperparams`` builds a new transform at every step,
passing its numeric hyper-parameters as JAX arrays: those are arguments of the compiled
update, the other options are part of its key. Each configuration gets a ``jax.jit`` of its
own, whose C++ dispatch checks the inputs' signature (structure, shape, dtype, weak type,
placement); the most recently used configurations are kept, within a bound on the
executables they hold together. On XLA:CPU every executable holds memory maps of its
machine code (about a hundred for an update; Linux allows a process 65,530), so an
unbounded cache runs a long process out of them.
"""

from __future__ import annotations

import dataclasses
import threading
import warnings
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from umtam_jax._callers import user_stacklevel
from umtam_jax.optimizer._config import Config

CACHE_SIZE = 16
"""How many configurations' compiled updates are kept (least recently used ones are
dropped, with their executables)."""

MAX_EXECUTABLES = 64
"""How many executables (one per configuration and input signature) the kept updates may
hold together: past that, the least recently used configurations are dropped."""

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


class _Key:
    """A kept update's key: the update function and its fixed options, hashed once."""

    def __init__(self, update: Update, static: tuple):
        self.update, self.static = update, static
        self._hash = hash((update, static))

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _Key):
            return NotImplemented
        return self._hash == other._hash and (self.update, self.static) == (
            other.update,
            other.static,
        )


# Insertion-ordered: a used key is moved to the end, the first is the least recently used.
_kept: dict[_Key, Any] = {}
_kept_lock = threading.Lock()


def compile_update(update: Update, static: tuple) -> Callable[..., Any]:
    """A new jit of ``update`` for one configuration (its fixed options ``static``):
    a closure of its own, so that its executables go with it when it is dropped."""
    fixed = {name: option.value for name, option in static}

    def scale_by_umtam_update(options, updates, state, params):
        return update(Config(**fixed, **options), updates, state, params)

    return jax.jit(scale_by_umtam_update)


def _kept_update(key: _Key) -> Callable[..., Any]:
    """The kept compiled update of ``key`` (made if missing), now the most recently used."""
    with _kept_lock:
        compiled = _kept.pop(key, None)
        if compiled is None:
            compiled = compile_update(key.update, key.static)
        _kept[key] = compiled
        while len(_kept) > CACHE_SIZE:
            del _kept[next(iter(_kept))]
    return compiled


def _bound_executables() -> None:
    """Drops the least recently used configurations while the kept updates hold more than
    :data:`MAX_EXECUTABLES` executables (the last used one too, if it alone does)."""
    alone = False  # the last used configuration alone holds too many
    with _kept_lock:
        total = _executables()
        while total > MAX_EXECUTABLES:
            alone = alone or len(_kept) == 1
            total -= _kept.pop(next(iter(_kept)))._cache_size()
    if alone:  # outside the lock: a warning turned into an error leaves the cache whole
        warnings.warn(
            f"UMTAM's eager update of one configuration has compiled more than "
            f"{MAX_EXECUTABLES} input signatures (the shapes, dtypes or placements of its "
            "inputs change between calls): its compilations are dropped, so each new "
            "signature compiles again. Call the update inside your own jax.jit, or keep "
            "its inputs' signatures fixed.",
            RuntimeWarning,
            stacklevel=user_stacklevel(),
        )


def _executables() -> int:
    """The executables the kept updates hold (call with the lock held)."""
    return sum(compiled._cache_size() for compiled in _kept.values())


def kept_executables() -> int:
    """How many compiled executables the eager updates keep (all configurations)."""
    with _kept_lock:
        return _executables()


def clear() -> None:
    """Drops every kept compiled update (their executables go with them)."""
    with _kept_lock:
        _kept.clear()


def eager_update(update: Update, cfg: Config, *inputs: Any) -> tuple[Any, Any]:
    """``update(cfg, *inputs)`` through the shared compilation of ``cfg``.

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
    key = _Key(update, tuple((k, _Option(v)) for k, v in fields.items() if k not in options))
    result = _kept_update(key)(options, *inputs)
    _bound_executables()
    return result
