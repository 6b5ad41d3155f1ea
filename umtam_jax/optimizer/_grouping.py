"""Which leaves are updated together, and how one update function is mapped over them:
the leading batch axes of one leaf (a stack of matrices), or a stack of equally shaped
leaves (``group_leaves=True``), both with ``jax.vmap``."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from umtam_jax.optimizer import _sharding
from umtam_jax.optimizer._config import Config
from umtam_jax.optimizer._layout import Layout


def batch_view(layout: Layout, x: jax.Array) -> Layout:
    """The layout an update maps over for a leaf ``x``: ``layout`` itself, or one merged
    batch axis (:func:`merge_batch`) for several batch axes under Explicit sharding, where
    the small linear algebra of step 3 needs its stacks with one batch axis."""
    if layout.batch_axes > 1 and _sharding.explicit_spec(x) is not None:
        return dataclasses.replace(layout, batch_axes=1)
    return layout


def merge_batch(layout: Layout, x: Any) -> Any:
    """A batched leaf's arrays (a pytree) with their leading batch axes merged into one;
    under Explicit sharding the data moves all-to-all (:func:`._sharding.reshape`)."""

    def merge(a: jax.Array) -> jax.Array:
        batch = a.shape[: layout.batch_axes]
        return _sharding.reshape(a, (math.prod(batch),) + a.shape[layout.batch_axes :])

    return jax.tree.map(merge, x)


def split_batch(batch: tuple[int, ...], x: Any) -> Any:
    """The inverse of :func:`merge_batch` for arrays (a pytree) with the batch ``batch``."""
    return jax.tree.map(lambda a: _sharding.reshape(a, batch + a.shape[1:]), x)


def map_batch(layout: Layout, fn: Callable[..., Any], in_axes: tuple) -> Callable[..., Any]:
    """``fn`` mapped over the leading batch axes of a leaf, one ``jax.vmap`` per axis.

    The batch axes are not merged into one (except as :func:`batch_view` says): that
    reshape would merge a sharded batch axis into a more major one, which an Auto mesh can
    only do by gathering the whole leaf.
    Arguments with ``in_axes`` None are passed unmapped; results carry the batch axes.
    """
    for _ in range(layout.batch_axes):
        fn = jax.vmap(fn, in_axes=in_axes)
    return fn


def batch_keys(layout: Layout, key: jax.Array, like: jax.Array) -> jax.Array:
    """One PRNG key per matrix of a batched leaf ``like``, shaped like its batch axes and,
    under Explicit sharding, partitioned like them (``jax.vmap`` needs its mapped axes
    sharded alike)."""
    batch = like.shape[: layout.batch_axes]
    keys = jax.random.split(key, math.prod(batch))
    if len(batch) > 1:
        keys = keys.reshape(batch)
    spec = _sharding.explicit_spec(like)
    if spec is not None:
        keys = _sharding.reshard_like(keys, spec[: layout.batch_axes])
    return keys


def on_batch(layout: Layout, fn: Callable[..., Any], args: tuple, count: jax.Array) -> Any:
    """``fn(g, w, state, count)`` mapped over the leading batch axes of a leaf."""
    view = batch_view(layout, args[1])
    if view is layout:
        return map_batch(layout, fn, (0, 0, 0, None))(*args, count)
    out = map_batch(view, fn, (0, 0, 0, None))(*merge_batch(layout, args), count)
    return split_batch(args[1].shape[: layout.batch_axes], out)


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
    """Leaves with equal keys are updated as one stack (see ``group_leaves``). The
    arguments are in canonical order, so a leaf stored in another axis order stacks with
    leaves of its canonical shape (the permutation is left out of the key)."""
    arrays = tuple((x.shape, jnp.dtype(x.dtype)) for x in jax.tree.leaves(leaf_state))
    shapes = (g.shape, jnp.dtype(g.dtype), jnp.dtype(w.dtype))
    canonical = dataclasses.replace(layout, perm=None)
    return (canonical, shapes, jax.tree.structure(leaf_state), arrays)


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
