"""The shared steps every merging method is a configuration of, and the merge that runs them.

Every merge runs the same pipeline, one leaf at a time:

1. **validate** the options (each :class:`._registry.Param` knows its kind and allowed
   values) and the inputs (structures, shapes, dtypes, finite values; :mod:`._validation`):
   :func:`plan`, defined in :mod:`._plan`;
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

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import AxisType

from umtam_jax.merging import _validation as V

# Step 1; check_options and options_of are re-exported (the engine calls them here).
from umtam_jax.merging._plan import Call, check_options, options_of, plan  # noqa: F401
from umtam_jax.merging._registry import Method, get
from umtam_jax.merging._select import (
    global_masks,
    keep_count,
    sliced_mask,
    stack_slices,
    unstack_slices,
)
from umtam_jax.optimizer import _sharding
from umtam_jax.optimizer._attention import attention_rows, is_attention_bias
from umtam_jax.optimizer._layout import matrix_view, scanned


def leaf_importances(call: Call, j: int) -> list[jax.Array] | None:
    """Step 2 on leaf ``j``: each expert's importance (None for methods that rank nothing)."""
    if call.method.importance is None:
        return None
    return [expert_importance(call, j, t) for t in range(len(call.prepared.experts))]


def expert_importance(call: Call, j: int, t: int) -> jax.Array:
    """Step 2 on leaf ``j`` for expert ``t`` alone (a method with an importance)."""
    m, p, extras = call.method, call.prepared, call.extras
    assert m.importance is not None  # asked only of a method that ranks entries
    extra = None if extras is None else extras[t][j]
    return m.importance(call.options, p.base[j], p.experts[t][j], extra)


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
    ``scope`` slices its kernel; on an attention projection's matrix or vector for a
    method that decomposes matrices)."""
    m, p, extras = call.method, call.prepared, call.extras
    base, ws = p.base[j], [w[j] for w in p.experts]
    extra = None if extras is None else [x[j] for x in extras]
    batch = leaf_batch_axes(call.options, p.key_paths[j], base.shape) if m.sliced_kernel else ()

    def kernel(b: jax.Array, xs: list, ex: list | None) -> jax.Array:
        if batch:  # kernels that slice read no masks or scores
            return m.kernel(call.options, b, xs, None, None, ex)
        return m.kernel(call.options, b, xs, keep, scores, ex)

    if m.matrices:
        shape = tuple(n for i, n in enumerate(base.shape) if i not in batch)
        view = _attention_view(p.key_paths[j], shape)
        if view is not None:
            kernel = in_view(kernel, shape, view)
    if batch:
        return _per_slice(kernel, batch, base, ws, extra)
    return kernel(base, ws, extra)


def _attention_view(path: tuple[Any, ...], shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """The shape a Flax attention projection's leaf is merged as by a method that
    decomposes matrices, as PyTorch stores it: a 3-axis kernel as one matrix
    (:func:`~umtam_jax.optimizer._attention.attention_rows`), a ``(heads, head_dim)``
    query/key/value bias as one vector; None for other leaves."""
    rows = attention_rows(path, shape)
    if rows is not None:
        return matrix_of(shape, rows)
    return (math.prod(shape),) if is_attention_bias(path, shape) else None


def matrix_of(shape: tuple[int, ...], rows: int) -> tuple[int, int]:
    """The matrix a tensor of ``shape`` stands for: its first ``rows`` axes by the others."""
    return (math.prod(shape[:rows]), math.prod(shape[rows:]))


def in_view(kernel: Any, shape: tuple[int, ...], view: tuple[int, ...]) -> Any:
    """``kernel(b, xs, extra)`` on tensors of ``shape`` given in the shape ``view`` (their
    ``extra`` inputs, PRNG keys or Grams, as they are), its result back in ``shape``."""

    def on_view(b: jax.Array, xs: list, ex: list | None) -> jax.Array:
        return kernel(b.reshape(view), [x.reshape(view) for x in xs], ex).reshape(shape)

    return on_view


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
    explicit = _sharding.explicit_concrete_mesh((base, experts, extra))
    if explicit is not None and not _sharding.tracing():
        # Selections flatten and gather entries across a leaf, which Explicit mesh axes
        # refuse without a partition for every step: the merge runs on the same devices
        # with Auto axes (the compiler places the data), the result is sharded as the
        # base (or the first expert) on the Explicit mesh.
        # (Under a transformation, which cannot change the mesh, they stay as they are.)
        auto = _sharding.with_axis_types(explicit, AxisType.Auto)
        inputs, options = _sharding.moved_to(((base, experts, extra), kwargs), explicit, auto)
        with jax.set_mesh(auto):
            merged = merge(method, *inputs, **options)
        like = base if base is not None else experts if method.single_expert else experts[0]
        return _sharding.placed_like(_sharding.moved_to(merged, auto, explicit), like)
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
