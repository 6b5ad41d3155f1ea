"""Step 1 of every merge: the call validated and flattened into a :class:`Call`.

:func:`plan` checks the method's options (:func:`check_options`) before touching an input,
then the inputs themselves (:mod:`._validation`): base and experts, and the method's
per-expert input (statistics, curvatures, Fishers, Gram matrices or scores), flattened and
aligned with the base's leaves. :mod:`._pipeline` runs the other steps on the call and
re-exports the names its users reach through it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from umtam_jax import _pytrees
from umtam_jax.merging import _validation as V
from umtam_jax.merging._registry import PER_EXPERT_KINDS, REQUIRED, Method
from umtam_jax.merging._statistics_validation import arrays_or_statistics, statistics_leaves
from umtam_jax.optimizer._layout import check_scope_names
from umtam_jax.optimizer._statistics import curvature as _curvature


@dataclasses.dataclass
class Call:
    """A validated merge: the flattened inputs and the checked options.

    Attributes:
      method: the method.
      prepared: base and experts, flattened and checked.
      options: every parameter by name, validated (densities and weights per expert).
      extras: the per-expert input, one list of leaves (or statistics nodes) per expert,
        aligned with the base's leaves; None when the method takes none.
    """

    method: Method
    prepared: V.Prepared
    options: dict[str, Any]
    extras: list[list[Any]] | None


def options_of(method: Method, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """``kwargs`` completed with the defaults; unknown or missing parameters raise
    TypeError as a call of the public function would."""
    unknown = sorted(set(kwargs) - {p.name for p in method.params})
    if unknown:
        raise TypeError(
            f"method {method.name!r} got unexpected parameters {unknown}; it takes "
            + ", ".join(p.name for p in method.params)
        )
    options = {**method.defaults(), **kwargs}
    missing = [n for n, v in options.items() if v is REQUIRED]
    if missing:
        raise TypeError(f"method {method.name!r} requires the parameter {missing[0]!r}")
    return options


def check_options(method: Method, kwargs: Mapping[str, Any], k: int | None = None) -> dict:
    """``kwargs`` completed with the defaults and checked; the per-expert parameters
    (which need the number of experts) only when ``k`` is given."""
    options = options_of(method, kwargs)
    for p in method.params:
        if p.kind not in PER_EXPERT_KINDS:
            options[p.name] = p.check(options[p.name], 0)
        elif k is not None:
            options[p.name] = p.check(options[p.name], k)
    return options


def plan(
    method: Method,
    base: Any,
    experts: Any,
    extra: Any,
    kwargs: Mapping[str, Any],
    *,
    checked: bool = False,
) -> Call:
    """Validates a call of ``method``: options first, then the inputs.

    ``experts`` is the single expert for a ``single_expert`` method. ``checked=True``
    takes ``kwargs`` as the result of :func:`check_options` with the number of experts
    (an engine checks them once per merge, then plans every leaf). Raises ValueError or
    TypeError naming the option, the tree or the leaf path.

    Inside a traced function (``jax.jit``), inputs it closes over are concrete: their
    value checks run at trace time (``jax.ensure_compile_time_eval`` in each check);
    traced inputs are only checked for shape and dtype.
    """
    # Scalar options are checked first: no input is touched for a typo.
    options = dict(kwargs) if checked else check_options(method, kwargs)
    if method.single_expert:
        _check_single(method, base, experts)
        prepared = V.prepare(base, [experts], what="expert", method=method.name)
    elif base is None and method.base_optional:
        experts = V.check_sequence(experts, "experts")
        prepared = V.prepare(jax.tree.map(jnp.zeros_like, experts[0]), experts, ref="experts[0]")
    else:
        prepared = V.prepare(base, experts, method=method.name)
    k = len(prepared.experts)
    method.check_expert_count(k)
    extras = _extras(method, extra, prepared, options)
    if not checked:  # the whole tree (an engine plans one group of leaves at a time)
        check_scope_names(options.get("scope"), prepared.key_paths)
        for p in method.params:
            if p.kind in PER_EXPERT_KINDS:
                options[p.name] = p.check(options[p.name], k)
    call = Call(method, prepared, options, extras)
    if method.check is not None:
        method.check(call)
    return _behind_barrier(call)


def _behind_barrier(call: Call) -> Call:
    """Inside ``jax.jit``, the call with its concrete input arrays (models closed over by
    the traced function) passed through one ``lax.optimization_barrier``, after every
    value check has read them: as constants, XLA would fold the selections over them at
    compile time (3 experts of four 8×8 leaves: TIES compiled in 10 s instead of 0.5 s).
    Eagerly (and under a bare ``grad``/``vmap``) the call is returned as it is."""
    if not isinstance(jnp.zeros(()), jax.core.Tracer):  # not staged: no compile to spare
        return call
    trees = (call.prepared.base, call.prepared.experts, call.extras)
    leaves, treedef = jax.tree.flatten(trees)

    def constant(x: Any) -> bool:
        return (
            isinstance(x, jax.Array | np.ndarray)
            and not isinstance(x, jax.core.Tracer)
            and not jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
        )

    where = [i for i, x in enumerate(leaves) if constant(x)]
    if not where:
        return call
    hidden = jax.lax.optimization_barrier([leaves[i] for i in where])
    for i, x in zip(where, hidden, strict=True):
        leaves[i] = x
    base, experts, extras = jax.tree.unflatten(treedef, leaves)
    prepared = call.prepared._replace(base=base, experts=experts)
    return dataclasses.replace(call, prepared=prepared, extras=extras)


def _check_single(method: Method, base: Any, expert: Any) -> None:
    """A method of one expert given a list of experts: say so (its structure error would
    name a missing leaf of trees that are alike)."""
    if base is None or not isinstance(expert, list | tuple) or not expert:
        return
    structure = jax.tree.structure(base, is_leaf=_pytrees.is_variable)
    item = jax.tree.structure(expert[0], is_leaf=_pytrees.is_variable)
    whole = jax.tree.structure(expert, is_leaf=_pytrees.is_variable)
    if whole != structure and item == structure:  # type: ignore[operator]
        raise TypeError(
            f"method {method.name!r} merges one expert with the base: pass the expert's "
            f"pytree, not a list of {len(expert)}"
        )


_EXTRA_NAMES = {
    "statistics": "statistics pytrees",
    "curvatures": "curvature pytrees",
    "fishers": "Fisher pytrees",
    "grams": "Gram pytrees",
}


def _extras(method: Method, extra: Any, prepared: V.Prepared, options: dict) -> Any:
    kind = method.extra
    if kind is None:
        if extra is not None:  # refused, not ignored: it may be meant for another method
            items = enumerate(extra) if isinstance(extra, list | tuple) else []
            keys = [
                f"extra[{i}]{jax.tree_util.keystr(path)}"
                for i, x in items
                for path, _ in jax.tree_util.tree_leaves_with_path(x)
            ]
            raise TypeError(
                f"method {method.name!r} takes no per-expert input besides the experts, but "
                f"got {keys[0] if keys else f'extra (a {type(extra).__name__})'}: pass extra=None"
            )
        return None
    if kind == "scores":  # one expert's scores: arrays, statistics or None (magnitude)
        if extra is None:
            return None
        _, leaves = arrays_or_statistics(extra, prepared, "scores")
        return [leaves]
    k = len(prepared.experts)
    items = V.check_sequence(extra, kind)
    V.check_count(items, k, _EXTRA_NAMES[kind])
    if kind == "statistics":
        return [statistics_leaves(s, prepared, f"statistics[{i}]") for i, s in enumerate(items)]
    if kind == "fishers":
        return [V.leaves_like(f, prepared, f"fishers[{i}]") for i, f in enumerate(items)]
    if kind == "grams":  # Gram matrices at some leaves, None elsewhere
        from umtam_jax.merging._regmean import gram_leaves  # it imports us, via _pipeline

        return [gram_leaves(g, prepared, f"grams[{i}]") for i, g in enumerate(items)]
    out = []
    for i, c in enumerate(items):  # arrays, or statistics whose curvature Ŝ is used
        what, leaves = arrays_or_statistics(c, prepared, f"curvatures[{i}]")
        out.append(leaves if what == "arrays" else [_curvature(n) for n in leaves])
    return out
