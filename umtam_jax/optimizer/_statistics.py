"""Extraction of the merging statistics from an UMTAM optimizer state (docs/algorithm.md §3)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from umtam_jax.optimizer._axis_order import canonical_statistics, from_canonical
from umtam_jax.optimizer._clipping import shares
from umtam_jax.optimizer._config import compute_dtype
from umtam_jax.optimizer._sharding import reshape
from umtam_jax.optimizer._state import (
    DenseLeafState,
    DenseStatistics,
    FactoredLeafState,
    FactoredStatistics,
    ScaleByUmtamState,
    as_leaf_state,
    is_leaf_state,
    is_leaf_statistics,
    is_mapping_leaf_state,
)


class NoUmtamStateError(ValueError):
    """:func:`statistics` found no UMTAM optimizer state in what it was given."""


def _is_placeholder(x: Any) -> bool:
    return x is None or isinstance(x, optax.MaskedNode)


def _is_stat_node(x: Any) -> bool:
    return is_leaf_statistics(x) or _is_placeholder(x)


def _to_statistics(leaf: Any) -> Any:
    leaf = as_leaf_state(leaf)
    if isinstance(leaf, FactoredLeafState):
        return FactoredStatistics(
            u=leaf.u, sigma=leaf.sigma, v=leaf.v, row=leaf.row, col=leaf.col, saliency=leaf.saliency
        )
    if isinstance(leaf, DenseLeafState):
        return DenseStatistics(mu=leaf.mu, nu=leaf.nu, saliency=leaf.saliency)
    return leaf


def _combine(trees: list[Any]) -> Any:
    """Overlays several params-shaped trees whose missing leaves are MaskedNode/None."""

    def pick(*nodes: Any) -> Any:
        found = [n for n in nodes if not _is_placeholder(n)]
        if len(found) > 1:
            raise ValueError("two UMTAM states hold statistics for the same parameter")
        return found[0] if found else nodes[0]

    return jax.tree.map(pick, *trees, is_leaf=_is_state_node)


def _unwrap_variables(x: Any) -> Any:
    """Plain arrays from a ``flax.nnx.Optimizer.opt_state`` (its leaves are nnx Variables)."""
    from flax import nnx

    is_variable = lambda n: isinstance(n, nnx.Variable | nnx.State)  # noqa: E731
    if not any(is_variable(n) for n in jax.tree.leaves(x, is_leaf=is_variable)):
        return x
    # nnx.State flattens nested mappings in one go: turn each into nested plain dicts.
    return jax.tree.map(
        lambda n: nnx.to_pure_dict(n) if isinstance(n, nnx.State) else n,
        nnx.as_pure(x),
        is_leaf=lambda n: isinstance(n, nnx.State),
    )


def _is_mapping_umtam_state(x: Any) -> bool:
    """The mapping form of a :class:`ScaleByUmtamState` (``nnx.state(optimizer)``, or its
    ``nnx.to_pure_dict``): keys ``count`` and ``leaves``, every node under ``leaves`` a leaf
    state in mapping form (or a placeholder of a wrapper)."""
    if not isinstance(x, Mapping) or set(x) != {"count", "leaves"}:
        return False
    nodes = jax.tree.leaves(x["leaves"], is_leaf=_is_state_node)
    return bool(nodes) and all(is_mapping_leaf_state(n) or _is_placeholder(n) for n in nodes)


def _is_state_node(x: Any) -> bool:
    return is_leaf_state(x) or _is_placeholder(x) or is_mapping_leaf_state(x)


def _is_mapping_statistics(x: Any) -> bool:
    """A params-shaped tree of statistics (or leaf states) in mapping form: every node a
    mapping of a leaf's fields or a placeholder, at least one of them a mapping."""
    nodes = jax.tree.leaves(x, is_leaf=_is_state_node)
    mappings = [n for n in nodes if is_mapping_leaf_state(n)]
    return bool(mappings) and len(mappings) + sum(map(_is_placeholder, nodes)) == len(nodes)


def _contains_statistics(x: Any) -> bool:
    nodes = jax.tree.leaves(x, is_leaf=is_leaf_statistics)
    return bool(nodes) and all(is_leaf_statistics(n) for n in nodes)


def statistics(x: Any) -> Any:
    """Returns the per-parameter merging statistics held by an optimizer state.

    Works on the state of :func:`umtam_jax.umtam` / :func:`umtam_jax.scale_by_umtam` and on
    any Optax wrapper around it (``optax.chain``, ``optax.inject_hyperparams``,
    ``optax.MultiSteps``, ``optax.masked``, ``optax.partition``, ``optax.apply_if_finite``);
    also on a ``flax.nnx.Optimizer``, its ``opt_state``, ``nnx.state`` of either (as Orbax
    restores it) and their ``nnx.to_pure_dict``.

    Args:
      x: an optimizer state, or a statistics pytree (returned unchanged), also with its
        nodes as mappings of their fields (``{"u": ..., "row": ..., ...}``, as a
        ``umtam_statistics`` safetensors folder read with ``tree_from_names`` holds them).

    Returns:
      A pytree shaped like the parameters whose leaves are :class:`FactoredStatistics`
      (``u, sigma, v, row, col, saliency``) or :class:`DenseStatistics` (``mu, nu,
      saliency``); parameters the optimizer did not see (``optax.masked``) hold
      ``optax.MaskedNode()``. Statistics are the raw (not bias-corrected) accumulators.

    Raises:
      NoUmtamStateError: ``x`` holds no UMTAM state (a ``ValueError``).
      ValueError: two UMTAM states hold statistics for one parameter.

    Example:
      >>> import jax.numpy as jnp, umtam_jax
      >>> params = {"w": jnp.ones((4, 3))}
      >>> opt = umtam_jax.umtam(1e-2)
      >>> stats = umtam_jax.statistics(opt.init(params))
      >>> stats["w"].nu.shape
      (4, 3)

    References:
      UMTAM, arXiv:2512.17109 (the statistics Algorithm 2 merges with).
    """
    if _contains_statistics(x):
        return x
    x = _unwrap_variables(x)
    x = jax.tree.map(
        lambda n: ScaleByUmtamState(**n) if _is_mapping_umtam_state(n) else n,
        x,
        is_leaf=_is_mapping_umtam_state,
    )
    states = [
        s
        for s in jax.tree.leaves(x, is_leaf=lambda n: isinstance(n, ScaleByUmtamState))
        if isinstance(s, ScaleByUmtamState)
    ]
    if not states:
        if _is_mapping_statistics(x):  # as read from a checkpoint or safetensors folder
            return jax.tree.map(_to_statistics, x, is_leaf=_is_state_node)
        raise NoUmtamStateError(
            "no UMTAM optimizer state found: pass the state of umtam_jax.umtam(...) "
            "(possibly wrapped by optax), or a statistics pytree"
        )
    leaves = _combine([s.leaves for s in states]) if len(states) > 1 else states[0].leaves
    return jax.tree.map(_to_statistics, leaves, is_leaf=_is_state_node)


def _map_statistics(fn, x: Any) -> Any:
    return jax.tree.map(
        lambda s: s if _is_placeholder(s) else fn(s), statistics(x), is_leaf=_is_stat_node
    )


def _batch_axes(s: FactoredStatistics) -> int:
    """Leading batch axes of a factored leaf (one ``(r, r)`` core per matrix)."""
    return s.sigma.ndim - 2


def _outer(s: FactoredStatistics, row: jax.Array, col: jax.Array) -> jax.Array:
    """``row ⊗ col`` of every matrix, laid out as the parameter ``batch + rows + cols``."""
    nb = _batch_axes(s)
    col_axes, row_axes = col.ndim - nb, row.ndim - nb
    return row.reshape(row.shape + (1,) * col_axes) * col.reshape(
        col.shape[:nb] + (1,) * row_axes + col.shape[nb:]
    )


def _in_parameter_order(fn):
    """``fn`` of factored statistics, computed in canonical order (batch, rows, cols) and
    returned in the parameter's axis order (see :mod:`._axis_order`)."""

    def wrapped(s: FactoredStatistics) -> jax.Array:
        canonical, perm = canonical_statistics(s)
        return from_canonical(fn(canonical), perm)

    return wrapped


@_in_parameter_order
def _factored_curvature(s: FactoredStatistics) -> jax.Array:
    # Ŝ = R Cᵀ / sum(R) per matrix; R Cᵀ itself may overflow.
    return _outer(s, shares(s.row, tuple(range(_batch_axes(s), s.row.ndim))), s.col)


@_in_parameter_order
def _factored_momentum(s: FactoredStatistics) -> jax.Array:
    nb = _batch_axes(s)
    batch, rows, cols = s.sigma.shape[:nb], s.row.shape[nb:], s.col.shape[nb:]
    # Sizes, not -1: a stack of no matrices has no size to infer them from.
    # Reshaped as the update does: under Explicit sharding a sharded inner axis merged
    # into the rows (or columns) needs its partition given.
    u = reshape(s.u, batch + (math.prod(rows), s.u.shape[-1]))
    v = reshape(s.v, batch + (math.prod(cols), s.v.shape[-1]))
    return reshape((u @ s.sigma) @ v.mT, batch + rows + cols)


@_in_parameter_order
def _factored_root_curvature(s: FactoredStatistics) -> jax.Array:
    return _outer(s, jnp.sqrt(s.row), jnp.sqrt(s.col))  # R Cᵀ itself may overflow


def _leaf_curvature(s: Any) -> jax.Array:
    return _factored_curvature(s) if isinstance(s, FactoredStatistics) else s.nu


def _leaf_momentum(s: Any) -> jax.Array:
    return _factored_momentum(s) if isinstance(s, FactoredStatistics) else s.mu


def _leaf_root_curvature(s: Any) -> jax.Array:
    """``sqrt(R_i C_j)`` (factored) or ``sqrt(v)`` (dense): the saliency's curvature factor."""
    return _factored_root_curvature(s) if isinstance(s, FactoredStatistics) else jnp.sqrt(s.nu)


def curvature(x: Any) -> Any:
    """Dense curvature estimates with the parameters' shapes.

    Factored leaves: ``Ŝ = R Cᵀ / sum(R)`` (Adafactor's ``v_row v_colᵀ / mean(v_row)``);
    dense leaves: the second moment ``v``.

    Args:
      x: an optimizer state (possibly wrapped) or a statistics pytree.

    Returns:
      A pytree of arrays shaped like the parameters.

    Raises:
      NoUmtamStateError: ``x`` holds no UMTAM state (as :func:`statistics`).

    Example:
      >>> import jax.numpy as jnp, umtam_jax
      >>> params = {"w": jnp.ones((4, 3))}
      >>> opt = umtam_jax.umtam(1e-2, min_dim_size_to_factor=2)
      >>> _, state = opt.update({"w": jnp.full((4, 3), 0.1)}, opt.init(params), params)
      >>> curv = umtam_jax.curvature(state)["w"]  # (1 − β2) g² after one step
      >>> curv.shape, round(float(curv[0, 0]), 7)
      ((4, 3), 1e-05)

    References:
      UMTAM, arXiv:2512.17109 (Algorithm 1); Shazeer & Stern, "Adafactor",
      arXiv:1804.04235.
    """
    return _map_statistics(_leaf_curvature, x)


def momentum(x: Any) -> Any:
    """Dense momenta with the parameters' shapes: ``U Σ Vᵀ`` (factored) or ``m`` (dense).

    Args:
      x: an optimizer state (possibly wrapped) or a statistics pytree.

    Returns:
      A pytree of arrays shaped like the parameters.

    Raises:
      NoUmtamStateError: ``x`` holds no UMTAM state (as :func:`statistics`).

    Example:
      >>> import jax.numpy as jnp, umtam_jax
      >>> params = {"w": jnp.ones((4, 3))}
      >>> opt = umtam_jax.umtam(1e-2, min_dim_size_to_factor=2)
      >>> _, state = opt.update({"w": jnp.full((4, 3), 0.1)}, opt.init(params), params)
      >>> mom = umtam_jax.momentum(state)["w"]  # (1 − β1) g after one step
      >>> mom.shape, round(float(mom[0, 0]), 6)
      ((4, 3), 0.01)

    References:
      UMTAM, arXiv:2512.17109 (Algorithm 1).
    """
    return _map_statistics(_leaf_momentum, x)


def saliency(x: Any, params: Any = None, initial_params: Any = None) -> Any:
    """Per-parameter saliency ``S`` with the parameters' shapes.

    With tracked saliency (the default ``saliency="tracked"``) this is the running
    ``S ← α S + (1 − α)(W − W0)² ⊙ sqrt(R_i C_j)`` of docs/algorithm.md §2.2 step 9. When
    the optimizer ran with ``saliency="final"`` no ``S`` is stored; pass ``params`` and
    ``initial_params`` and it is computed once as ``(W − W0)² ⊙ sqrt(R_i C_j)`` (dense
    leaves: ``⊙ sqrt(v)``).

    Args:
      x: an optimizer state (possibly wrapped) or a statistics pytree.
      params: final parameters (arrays, or a ``flax.nnx`` State), needed only for leaves
        without tracked saliency.
      initial_params: initial parameters ``W0``, likewise.

    Returns:
      A pytree of arrays shaped like the parameters.

    Raises:
      NoUmtamStateError: ``x`` holds no UMTAM state (as :func:`statistics`).
      ValueError: if a leaf has no tracked saliency and ``params``/``initial_params`` are
        missing.

    Example:
      >>> import jax.numpy as jnp, optax, umtam_jax
      >>> params = {"w": jnp.ones((4, 3))}
      >>> opt = umtam_jax.umtam(1e-2, min_dim_size_to_factor=2, saliency="final")
      >>> grads = {"w": jnp.full((4, 3), 0.1)}
      >>> updates, state = opt.update(grads, opt.init(params), params)
      >>> trained = optax.apply_updates(params, updates)
      >>> sal = umtam_jax.saliency(state, trained, params)["w"]  # (W − W0)² ⊙ sqrt(R C)
      >>> sal.shape, bool((sal > 0).all())
      ((4, 3), True)

    References:
      UMTAM, arXiv:2512.17109 (Algorithm 1, saliency accumulation).
    """
    stats = statistics(x)
    if params is None or initial_params is None:

        def tracked(path, s):
            if _is_placeholder(s):
                return s
            if s.saliency is None:
                raise ValueError(
                    f"no tracked saliency at {jax.tree_util.keystr(path)} (the optimizer ran "
                    "with saliency='final'): pass params and initial_params"
                )
            return s.saliency

        return jax.tree_util.tree_map_with_path(tracked, stats, is_leaf=_is_stat_node)

    def final(s, w, w0):
        if _is_placeholder(s):
            return s
        if s.saliency is not None:
            return s.saliency
        w, w0 = jnp.asarray(w), jnp.asarray(w0)
        dtype = compute_dtype(jnp.result_type(w, w0))  # as tracked: at least float32
        delta = w.astype(dtype) - w0.astype(dtype)
        return jnp.square(delta) * _leaf_root_curvature(s)

    # nnx.State parameters become nested dicts of arrays, as the state's statistics do.
    params, initial_params = _unwrap_variables(params), _unwrap_variables(initial_params)
    return jax.tree.map(final, stats, params, initial_params, is_leaf=_is_stat_node)
