"""Which leaves are updated together, and how one update function is mapped over them:
the leading batch axes of one leaf (a stack of matrices), or a stack of equally shaped
leaves (``group_leaves=True``), both with ``jax.vmap``."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from umtam_jax.optimizer import _sharding
from umtam_jax.optimizer._config import Config
from umtam_jax.optimizer._layout import Layout


def merge_batch(layout: Layout, x: jax.Array) -> jax.Array:
    """A batched leaf's array with its leading batch axes merged into one."""
    return _sharding.reshape(
        x, (math.prod(x.shape[: layout.batch_axes]),) + x.shape[layout.batch_axes :]
    )


def on_batch(layout: Layout, fn: Callable[..., Any], args: tuple, count: jax.Array) -> Any:
    """``fn(g, w, state, count)`` mapped over the leading batch axes of a leaf."""
    batch = args[1].shape[: layout.batch_axes]
    flat = jax.tree.map(functools.partial(merge_batch, layout), args)
    out = jax.vmap(fn, in_axes=(0, 0, 0, None))(*flat, count)
    return jax.tree.map(lambda x: _sharding.reshape(x, batch + x.shape[1:]), out)


def _stackable(cfg: Config, layout: Layout, g: jax.Array, w: jax.Array) -> bool:
    """Whether a leaf may join a stack of equally shaped leaves: not under Explicit
    sharding (stacks would need their own partition), not a leaf that is already a stack
    of matrices (batch axes), and factored leaves only with the subspace method (the
    exact SVD is the per-matrix reference)."""
    if _sharding.explicit_spec(g) is not None or _sharding.explicit_spec(w) is not None:
        return False
    if layout.batch_axes:
        return False
    return layout.row_axes is None or cfg.svd_method == "subspace"


def _stack_key(layout: Layout, g: jax.Array, w: jax.Array, leaf_state: Any) -> tuple:
    """Leaves with equal keys are updated as one stack (see ``group_leaves``)."""
    arrays = tuple((x.shape, jnp.dtype(x.dtype)) for x in jax.tree.leaves(leaf_state))
    shapes = (g.shape, jnp.dtype(g.dtype), jnp.dtype(w.dtype))
    return (layout, shapes, jax.tree.structure(leaf_state), arrays)


def leaf_groups(
    cfg: Config,
    layouts: list[Layout],
    grads: list[jax.Array],
    params: list[jax.Array],
    leaf_states: list[Any],
) -> list[list[int]]:
    """The indices of the leaves updated together, groups in order of their first leaf:
    each leaf on its own, or with ``cfg.group_leaves`` the stackable leaves of equal
    shapes and state layout in one group."""
    groups: dict[Any, list[int]] = {}
    for index, (layout, g, w, leaf_state) in enumerate(
        zip(layouts, grads, params, leaf_states, strict=True)
    ):
        group = (index,)
        if cfg.group_leaves and _stackable(cfg, layout, g, w):
            group = _stack_key(layout, g, w, leaf_state)
        groups.setdefault(group, []).append(index)
    return list(groups.values())


def on_stack(fn: Callable[..., Any], args: list[tuple]) -> Any:
    """``fn(*args[0])`` for one leaf; for several, ``fn`` mapped over their stack (each
    argument stacked along a new leading axis, results stacked likewise). Arguments that
    are the same object for every leaf (the step count) are passed unstacked."""
    if len(args) == 1:
        return fn(*args[0])
    shared = [all(a[j] is args[0][j] for a in args) for j in range(len(args[0]))]
    stacked = [
        args[0][j] if shared[j] else jax.tree.map(lambda *xs: jnp.stack(xs), *(a[j] for a in args))
        for j in range(len(args[0]))
    ]
    in_axes = [None if s else 0 for s in shared]
    return jax.vmap(fn, in_axes=in_axes)(*stacked)


def unstacked(out: Any, size: int) -> list[Any]:
    """The per-leaf results of :func:`on_stack` (``out`` itself for a single leaf)."""
    if size == 1:
        return [out]
    # Materialise the stack first: otherwise XLA fuses the whole stacked computation into
    # each member's slice and recomputes it per member (seen on an H100: 0.5 ms per m×n).
    out = jax.lax.optimization_barrier(out)
    return [jax.tree.map(lambda x, i=i: x[i], out) for i in range(size)]
