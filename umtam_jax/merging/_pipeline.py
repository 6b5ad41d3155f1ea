"""The shared steps every merging method is a configuration of, and the merge that runs them.

Every merge runs the same pipeline, one leaf at a time:

1. **validate** the options (each :class:`._registry.Param` knows its kind and allowed
   values) and the inputs (structures, shapes, dtypes, finite values; :mod:`._validation`);
2. **importance**: a score per entry of each task vector (``|w − w0|``, UMTAM's saliency,
   or scores given by the caller);
3. **sparsify**: a keep mask per expert, the top-``density`` entries by importance (exact
   per tensor, or over the whole expert with ``scope="global"``) or a Bernoulli draw;
4. **kernel**: one jitted function per leaf that does the rest (sign consensus, per-entry
   weights, aggregation, rescaling, ``w0 + scaling · Δ``).

The in-memory functions of :mod:`umtam_jax.merging` call :func:`merge`; the out-of-core
engine drives the same steps leaf by leaf (:func:`plan`, :func:`importances`,
:func:`masks`, :func:`combine`), replacing only the global top-k.

Example:
  >>> import jax.numpy as jnp
  >>> from umtam_jax.merging import _pipeline
  >>> base, experts = {"w": jnp.zeros(3)}, [{"w": jnp.array([1.0, -2.0, 3.0])}]
  >>> call = _pipeline.plan(_pipeline.get("ties"), base, experts, None, {"density": 0.4})
  >>> keep = _pipeline.masks(call, _pipeline.importances(call))
  >>> [m.tolist() for m in keep[0]]
  [[False, False, True]]
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
from umtam_jax.merging._registry import PER_EXPERT_KINDS, REQUIRED, Method, get
from umtam_jax.merging._select import (
    global_masks,
    keep_count,
    sliced_mask,
    stack_slices,
    unstack_slices,
)
from umtam_jax.merging._statistics_validation import arrays_or_statistics, statistics_leaves
from umtam_jax.optimizer._layout import check_scope_names, matrix_view, scanned
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
        prepared = V.prepare(base, [experts], what="expert")
    elif base is None and method.base_optional:
        experts = V.check_sequence(experts, "experts")
        prepared = V.prepare(jax.tree.map(jnp.zeros_like, experts[0]), experts, ref="experts[0]")
    else:
        prepared = V.prepare(base, experts)
    k = len(prepared.experts)
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
        from umtam_jax.merging._regmean import gram_leaves  # it imports this module

        return [gram_leaves(g, prepared, f"grams[{i}]") for i, g in enumerate(items)]
    out = []
    for i, c in enumerate(items):  # arrays, or statistics whose curvature Ŝ is used
        what, leaves = arrays_or_statistics(c, prepared, f"curvatures[{i}]")
        out.append(leaves if what == "arrays" else [_curvature(n) for n in leaves])
    return out


def leaf_importances(call: Call, j: int) -> list[jax.Array] | None:
    """Step 2 on leaf ``j``: each expert's importance (None for methods that rank nothing)."""
    m, p = call.method, call.prepared
    if m.importance is None:
        return None
    extras = call.extras
    return [
        m.importance(call.options, p.base[j], ws[j], None if extras is None else extras[t][j])
        for t, ws in enumerate(p.experts)
    ]


def leaf_masks(call: Call, j: int, scores: list[jax.Array] | None) -> list[jax.Array] | None:
    """Step 3 on leaf ``j`` alone (keep counts per tensor, or per slice over the batch
    axes ``scope`` gives the leaf): each expert's keep mask."""
    m, opts, p = call.method, call.options, call.prepared
    if m.sparsify == "topk":
        assert scores is not None  # a top-k Method has an importance (Method checks it)
        batch = leaf_batch_axes(opts, p.key_paths[j], p.base[j].shape)
        return [sliced_mask(s, d, batch) for s, d in zip(scores, opts["density"], strict=True)]
    if m.sparsify == "bernoulli":
        return [
            _bernoulli_mask(opts["key"], t, p.paths[j], p.base[j].shape, d)
            for t, d in enumerate(opts["density"])
        ]
    return None


#: ``scope="layer"``: the first axis of every leaf with three or more axes is its layers.
_FIRST_AXIS_LAYERS = scanned()


def leaf_batch_axes(options: dict[str, Any], path: tuple[Any, ...], shape: tuple) -> tuple:
    """The sorted axes over whose slices a leaf's keep count is exact (``()``: the whole
    leaf), from the ``scope`` option: a layout callable, ``"layer"`` or a string naming
    no slicing (``"tensor"``, and ``"global"``, which is not per leaf)."""
    scope = options.get("scope", "tensor")
    if scope == "layer":
        scope = _FIRST_AXIS_LAYERS
    if not callable(scope) or not shape:
        return ()
    return tuple(sorted(matrix_view(scope, path, tuple(shape), "scope")[0]))


def _bernoulli_mask(key: jax.Array, t: int, path: str, shape: tuple, p_keep: float) -> jax.Array:
    """Expert ``t``'s keep mask on the leaf at ``path``, drawn from
    ``fold_in(fold_in(key, t), crc32(path))``: it depends on the leaf's path only, so merging
    a tree whole or leaf by leaf is the same."""
    if p_keep >= 1.0:  # mergekit returns the tensor unchanged at density >= 1
        return jnp.ones(shape, bool)
    leaf_key = jax.random.fold_in(jax.random.fold_in(key, t), V.leaf_seed(path))
    return jax.random.bernoulli(leaf_key, p_keep, shape)


def leaf_combine(call: Call, j: int, keep: list | None, scores: list | None) -> jax.Array:
    """Step 4: the kernel on leaf ``j`` (on each of its slices for a method whose
    ``scope`` slices its kernel)."""
    m, p, extras = call.method, call.prepared, call.extras
    base, ws = p.base[j], [w[j] for w in p.experts]
    extra = None if extras is None else [x[j] for x in extras]
    batch = leaf_batch_axes(call.options, p.key_paths[j], base.shape) if m.sliced_kernel else ()
    if batch:  # kernels that slice read no masks or scores
        return _per_slice(lambda b, xs, ex: m.kernel(call.options, b, xs, None, None, ex), batch,
                          base, ws, extra)  # fmt: skip
    return m.kernel(call.options, base, ws, keep, scores, extra)


def _per_slice(
    kernel: Any, batch: tuple[int, ...], base: jax.Array, ws: list, keys: list | None
) -> jax.Array:
    """``kernel(base, ws, keys)`` on each slice over the ``batch`` axes, one after the
    other, as on tensors of their own; slice i of a leaf drawn with PRNG key k (DELLA)
    draws with ``fold_in(k, i)``."""
    inputs = [stack_slices(x, batch) for x in (base, *ws)]
    if keys is not None:  # a sliced kernel's only per-expert input: keys, typed or raw
        index = jnp.arange(inputs[0].shape[0])
        inputs += [jax.vmap(jax.random.fold_in, in_axes=(None, 0))(k, index) for k in keys]
    n = len(ws)

    def one(parts: list) -> jax.Array:
        return kernel(parts[0], list(parts[1 : n + 1]), None if keys is None else parts[n + 1 :])

    return unstack_slices(jax.lax.map(one, inputs), base.shape, batch)


def importances(call: Call) -> list[list[jax.Array]] | None:
    """Step 2 on every leaf: one list of importance leaves per expert (or None)."""
    rows = [leaf_importances(call, j) for j in range(len(call.prepared.base))]
    return None if call.method.importance is None else [list(r) for r in zip(*rows, strict=True)]


def masks(call: Call, scores: list[list[jax.Array]] | None) -> list[list[jax.Array]] | None:
    """Step 3 on every leaf: one list of keep masks per expert (or None); with
    ``scope="global"`` the keep count is exact over all the leaves together."""
    m, opts = call.method, call.options
    if m.sparsify == "topk" and opts.get("scope", "tensor") == "global":
        assert scores is not None  # a top-k Method has an importance (Method checks it)
        return [
            global_masks(list(s), keep_count(sum(x.size for x in s), d))
            for s, d in zip(scores, opts["density"], strict=True)
        ]
    if m.sparsify is None:
        return None
    n = len(call.prepared.base)
    rows = [
        leaf_masks(call, j, None if scores is None else [s[j] for s in scores]) for j in range(n)
    ]
    return [list(r) for r in zip(*rows, strict=True)]


def combine(call: Call, keep: list[list[Any]] | None, scores: list[list[Any]] | None) -> list:
    """Step 4: the kernel on every leaf."""

    def column(rows: list[list[Any]] | None, j: int) -> list[Any] | None:
        return None if rows is None else [row[j] for row in rows]

    return [
        leaf_combine(call, j, column(keep, j), column(scores, j))
        for j in range(len(call.prepared.base))
    ]


def merge(method: str | Method, base: Any, experts: Any, extra: Any = None, **kwargs: Any) -> Any:
    """Merges with a registered method by name: validate, importance, sparsify, kernel.

    ``merge("ties", base, experts, density=0.2)`` is ``ties(base, experts, density=0.2)``;
    useful where the method is data (a configuration, a sweep).

    Args:
      method: a name in :data:`METHODS`, or a :class:`Method`.
      base: the base parameters (``None`` only for a method with ``base_optional``).
      experts: the experts' parameters (the one expert of a ``single_expert`` method).
      extra: the method's per-expert input (statistics, curvatures, Fishers, scores).
      **kwargs: the method's parameters.

    Returns:
      The merged parameters, a pytree like ``base``.

    Raises:
      ValueError / TypeError: an unknown method or parameter, invalid values or inputs;
        messages name the option or the leaf path.

    Example:
      >>> import jax.numpy as jnp
      >>> from umtam_jax import merging
      >>> base = {"w": jnp.zeros(2)}
      >>> merging.merge("task_arithmetic", base, [{"w": jnp.ones(2)}], scaling=0.5)["w"].tolist()
      [0.5, 0.5]
    """
    if not isinstance(method, Method):
        method = get(method)
    call = plan(method, base, experts, extra, kwargs)
    explain_fn = method.explain
    explain = None if explain_fn is None else lambda j: explain_fn(call, j)
    if method.sparsify == "topk" and call.options.get("scope", "tensor") == "global":
        scores = importances(call)
        return V.rebuild(call.prepared, combine(call, masks(call, scores), scores), explain)
    out = []  # one leaf at a time: no more than one leaf's scores and masks alive
    for j in range(len(call.prepared.base)):
        leaf_scores = leaf_importances(call, j)
        out.append(leaf_combine(call, j, leaf_masks(call, j, leaf_scores), leaf_scores))
    return V.rebuild(call.prepared, out, explain)


def merge_arguments(method: Method, arguments: Mapping[str, Any]) -> Any:
    """:func:`merge` with a method's public function's arguments (its ``locals()``).

    Args:
      method: the method.
      arguments: ``base``, ``experts`` and the method's parameters by name.

    Returns:
      The merged parameters.
    """
    kwargs = dict(arguments)
    return merge(method, kwargs.pop("base"), kwargs.pop("experts"), None, **kwargs)
