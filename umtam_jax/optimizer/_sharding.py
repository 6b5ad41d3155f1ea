"""Sharding helpers: UMTAM under ``jax.jit`` on a device mesh (Auto and Explicit axes).

With ``AxisType.Auto`` meshes the compiler (GSPMD/Shardy) propagates shardings by itself
and these helpers do nothing. With ``AxisType.Explicit`` meshes (``jax.make_mesh``'s
default) shardings are part of the types: a contraction over a sharded axis needs an
output sharding, and LAPACK-backed decompositions refuse inputs sharded on a non-batch
axis. The optimizer's m×n work is all matmuls and elementwise passes that shard like the
parameter; only thin (m×k, k×n) or k×k matrices are ever gathered for a decomposition,
never a whole m×n matrix (except by ``svd_method="exact"``, the reference, documented).
The shardings of a whole optimizer state (:func:`state_shardings`) are computed in
:mod:`._state_shardings`.
"""

from __future__ import annotations

import importlib
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

# state_shardings is re-exported: the package and the tests import it from here.
from umtam_jax.optimizer._state_shardings import _canonical, state_shardings  # noqa: F401

#: Where JAX keeps ``shard_alike``: the public module (JAX's source still has it at the
#: v0.11.0 tag; later releases may drop it), else the module under ``jax._src`` that
#: implements it.
SHARD_ALIKE_MODULES = ("jax.experimental.shard_alike", "jax._src.shard_alike")


def find_shard_alike(modules: tuple[str, ...] = SHARD_ALIKE_MODULES) -> Any:
    """JAX's ``shard_alike`` from the first of ``modules`` that has it, or None."""
    for name in modules:
        try:
            return importlib.import_module(name).shard_alike
        except (ImportError, AttributeError):
            continue
    return None


shard_alike = find_shard_alike()


def _explicit_mesh(x: Any):
    sharding = getattr(jax.typeof(x), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or mesh.empty or AxisType.Explicit not in tuple(mesh.axis_types):
        return None
    return mesh


def explicit_spec(x: Any) -> tuple | None:
    """The per-axis partition of ``x`` when it is sharded over Explicit mesh axes, else None."""
    sharding = getattr(jax.typeof(x), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if (
        sharding is None
        or mesh is None
        or mesh.empty
        or AxisType.Explicit not in tuple(mesh.axis_types)
    ):
        return None
    spec = tuple(sharding.spec)
    return spec + (None,) * (x.ndim - len(spec))


def _distinct(spec: list) -> tuple:
    """``spec`` with every mesh axis kept on its first axis only (later uses: None)."""
    out: list[Any] = []
    used: set[str] = set()
    for entry in spec:
        names = entry if isinstance(entry, tuple) else () if entry is None else (entry,)
        if used.intersection(names):
            entry, names = None, ()
        used.update(names)
        out.append(entry)
    return tuple(out)


def _operand_specs(a: jax.Array, b: jax.Array) -> tuple | None:
    """``(mesh, spec_a, spec_b)`` of two operands of which one at least is explicitly
    sharded (an unsharded one gets an all-``None`` spec); None when neither is."""
    sa, sb = explicit_spec(a), explicit_spec(b)
    if sa is None and sb is None:
        return None
    mesh = _explicit_mesh(a if sa is not None else b)
    return mesh, sa or (None,) * a.ndim, sb or (None,) * b.ndim


def matmul(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a @ b`` for 2-D operands or stacks of them; with Explicit sharding the result
    keeps the stack's partition, ``a``'s row and ``b``'s column partition, and a
    contraction over a sharded axis is summed across devices (the thin result, not the
    large operand, is then what moves).
    """
    specs = _operand_specs(a, b)
    if specs is None:
        return a @ b
    mesh, sa, sb = specs
    ndim = max(a.ndim, b.ndim)
    pad_a, pad_b = (None,) * (ndim - a.ndim) + sa, (None,) * (ndim - b.ndim) + sb
    batch = [x if x is not None else y for x, y in zip(pad_a[:-2], pad_b[:-2], strict=True)]
    spec = _distinct([*batch, sa[-2], sb[-1]])
    return jnp.matmul(a, b, out_sharding=NamedSharding(mesh, P(*spec)))


def dot_general(a: jax.Array, b: jax.Array, dimension_numbers) -> jax.Array:
    """``jax.lax.dot_general(a, b, dimension_numbers)``; under Explicit sharding the result
    keeps the partition of the batch axes, of ``a``'s free axes and of ``b``'s free axes (a
    mesh axis that would appear twice stays on the first), and a contraction over sharded
    axes is summed across devices. On Auto meshes (or none) the plain ``dot_general``.
    """
    specs = _operand_specs(a, b)
    if specs is None:
        return jax.lax.dot_general(a, b, dimension_numbers)
    mesh, sa, sb = specs
    (contract_a, contract_b), (batch_a, batch_b) = dimension_numbers
    free_a = [i for i in range(a.ndim) if i not in contract_a and i not in batch_a]
    free_b = [j for j in range(b.ndim) if j not in contract_b and j not in batch_b]
    wanted = [sa[i] if sa[i] is not None else sb[j] for i, j in zip(batch_a, batch_b, strict=True)]
    wanted += [sa[i] for i in free_a] + [sb[j] for j in free_b]
    sharding = NamedSharding(mesh, P(*_distinct(wanted)))
    return jax.lax.dot_general(a, b, dimension_numbers, out_sharding=sharding)


def _reshape_spec(shape: tuple, spec: tuple, new_shape: tuple, mesh) -> tuple:
    """The partition of ``reshape(x, new_shape)`` for ``x`` partitioned by ``spec``.

    The shapes are cut into the smallest aligned groups (equal products); the mesh axes
    sharding a group's input axes go to the first output axis of the group that they
    divide evenly (else that group is replicated).
    """
    out: list[Any] = [None] * len(new_shape)
    i = j = 0
    while i < len(shape) or j < len(new_shape):
        gi, gj = [i], [j]
        a = shape[i] if i < len(shape) else 1
        b = new_shape[j] if j < len(new_shape) else 1
        i, j = i + 1, j + 1
        while a != b:
            if a < b:
                a *= shape[i]
                gi.append(i)
                i += 1
            else:
                b *= new_shape[j]
                gj.append(j)
                j += 1
        axes: list[str] = []
        for k in gi:
            if k < len(spec) and spec[k] is not None:
                axes += list(spec[k]) if isinstance(spec[k], tuple) else [spec[k]]
        if not axes:
            continue
        size = 1
        for name in axes:
            size *= mesh.shape[name]
        for k in gj:
            if k < len(new_shape) and new_shape[k] % size == 0:
                out[k] = axes[0] if len(axes) == 1 else tuple(axes)
                break
    return tuple(out)


def reshape(x: jax.Array, new_shape: tuple) -> jax.Array:
    """``x.reshape(new_shape)``; under Explicit sharding the result's partition is given
    (:func:`_reshape_spec`), also where JAX cannot infer it (a sharded axis merged with a
    major one: ``(2, 8@x) → 16@x``): then the data moves all-to-all, and the whole array
    is never gathered onto every device."""
    new_shape = tuple(new_shape)
    spec = explicit_spec(x)
    if spec is None or x.shape == new_shape:
        return x.reshape(new_shape)
    mesh = _explicit_mesh(x)
    out = _reshape_spec(tuple(x.shape), spec, new_shape, mesh)
    return jax.lax.reshape(x, new_shape, out_sharding=NamedSharding(mesh, P(*out)))


def reshape_like(x: jax.Array, like: jax.Array) -> jax.Array:
    """``x`` reshaped to ``like``'s shape and, under Explicit sharding, partitioned like
    ``like``: :func:`reshape` alone may put a split axis's partition on another one of the
    axes it is split into (``32@x → (4@x, 8)`` where ``like`` is ``(4, 8@x)``)."""
    return reshard_like(reshape(x, like.shape), explicit_spec(like))


def replicate(x: jax.Array) -> jax.Array:
    """Gathers an explicitly sharded (thin or small) array onto every device."""
    spec = explicit_spec(x)
    if spec is None or all(s is None for s in spec):
        return x
    return jax.sharding.reshard(x, NamedSharding(_explicit_mesh(x), P()))


def _resharded(x: Any, spec: tuple, mesh: Any) -> Any:
    """``x`` partitioned as ``spec`` over the Explicit ``mesh`` (a no-op where it is)."""
    if explicit_spec(x) == spec:
        return x
    return jax.sharding.reshard(x, NamedSharding(mesh, P(*spec)))


def reshard_like(x: jax.Array, spec: tuple | None) -> jax.Array:
    """Reshards ``x`` to ``spec`` when it is explicitly sharded (``spec`` from
    :func:`explicit_spec` of the array it should match); a no-op otherwise."""
    if spec is None or explicit_spec(x) is None:
        return x
    return _resharded(x, spec, _explicit_mesh(x))


def batched_like_params(grads: list[Any], params: list[Any], layouts: list[Any]) -> list[Any]:
    """The gradients, each of a leaf with batch axes (a ``Layout`` with ``batch_axes``)
    partitioned as its parameter over Explicit mesh axes, a NumPy gradient included:
    ``vmap`` maps only equally partitioned axes (a replicated gradient of a layer-sharded
    stack was refused), where elsewhere JAX reshards as it goes."""
    out = []
    for g, w, layout in zip(grads, params, layouts, strict=True):
        spec = explicit_spec(w) if layout.batch_axes else None
        out.append(g if spec is None else _resharded(g, spec, _explicit_mesh(w)))
    return out


def keep_like(new: Any, old: Any, which: list[bool] | None = None) -> Any:
    """``new`` (a pytree of arrays) sharded like ``old`` (the same tree, leaf shapes equal),
    under ``jax.jit`` on Auto (or no) mesh axes; the values are not touched. ``which``: per
    top-level entry of ``new`` (a list), whether to keep it (None: all).

    Auto axes are not part of the types, so a tracer does not know its parameter's
    partition, and the compiler's propagation cannot carry a partition through a reshape
    that merges a sharded axis into a more major one (``(2, 8@x, 4) → (16, 4)``: the
    merged axis would be sharded with a stride, which no tiling expresses). Without this the
    update and state of such a leaf came back replicated; ``shard_alike`` puts each output
    in one sharding group with its input, whose partition the compiler then gives both.
    Under Explicit axes (where the types already agree), or outside a trace, a no-op.
    Where a JAX install lacks the public ``jax.experimental.shard_alike``, its
    implementation under ``jax._src`` is used (:func:`find_shard_alike`). Where JAX has
    neither, this is a no-op too and such a leaf on an Auto mesh may come back replicated
    (Explicit mesh axes, whose layouts are part of the types, do not depend on it). Only
    JAX 0.10 is tested here.
    """
    if shard_alike is None:
        return new
    if which is not None:
        return [keep_like(n, o) if w else n for n, o, w in zip(new, old, which, strict=True)]
    new_leaves, treedef = jax.tree.flatten(new)
    try:
        old_leaves = treedef.flatten_up_to(old)  # type: ignore[attr-defined]
    except (ValueError, TypeError):  # not alike: nothing to keep
        return new
    out = []
    for x, y in zip(new_leaves, old_leaves, strict=True):
        if (
            isinstance(x, jax.core.Tracer)
            and isinstance(y, jax.Array)
            and x.shape == y.shape
            and explicit_spec(x) is None
            and explicit_spec(y) is None
        ):
            x, _ = shard_alike(x, y)
        out.append(x)
    return jax.tree.unflatten(treedef, out)


def place_like(x: jax.Array, param: Any, spec: tuple) -> jax.Array:
    """Puts a freshly created state array where ``param`` lives, partitioned by ``spec``
    (a function of ``param``'s own partition): for a concrete parameter with a
    ``NamedSharding`` a ``device_put``, under Explicit sharding a ``reshard``."""
    if isinstance(param, jax.Array) and not isinstance(param, jax.core.Tracer):
        sharding = getattr(param, "sharding", None)
        if isinstance(sharding, NamedSharding):
            pspec = _canonical(sharding.mesh, spec, x.ndim)
            return jax.device_put(x, NamedSharding(sharding.mesh, pspec))
        return x
    mesh = _explicit_mesh(param)
    if mesh is not None:
        return jax.sharding.reshard(x, NamedSharding(mesh, _canonical(mesh, spec, x.ndim)))
    return x


def partition_of(param: Any) -> tuple | None:
    """``param``'s per-axis partition (concrete NamedSharding or Explicit type), else None."""
    spec = explicit_spec(param) if isinstance(param, jax.core.Tracer) else None
    if spec is not None:
        return spec
    sharding = getattr(param, "sharding", None)
    if isinstance(sharding, NamedSharding):
        spec = tuple(sharding.spec)
        return spec + (None,) * (len(param.shape) - len(spec))
    return None


def tracing() -> bool:
    """Whether a JAX transformation (``jit``, ``vmap``, ``grad``, ...) is tracing the
    caller, where the mesh cannot be changed."""
    try:
        from jax._src import core as jax_core

        return not jax_core.trace_state_clean()
    except (ImportError, AttributeError):  # a JAX without it: jit's tracing at least
        return isinstance(jnp.zeros(()), jax.core.Tracer)


def explicit_concrete_mesh(tree: Any) -> Any:
    """The mesh of the first concrete array of ``tree`` sharded over Explicit mesh axes,
    or None. Tracers are passed over unasked: a tracer's ``.sharding`` raises an error
    whose message walks everything traced so far (quadratic over a model's leaves)."""
    for x in jax.tree.leaves(tree):
        concrete = isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer)
        sharding = getattr(x, "sharding", None) if concrete else None
        mesh = getattr(sharding, "mesh", None)
        if isinstance(mesh, jax.sharding.Mesh) and AxisType.Explicit in mesh.axis_types:
            return mesh
    return None


def with_axis_types(mesh: jax.sharding.Mesh, axis_type: AxisType) -> jax.sharding.Mesh:
    """``mesh`` (its devices and axis names) with every axis of ``axis_type``."""
    return jax.sharding.Mesh(
        mesh.devices, mesh.axis_names, axis_types=(axis_type,) * len(mesh.axis_names)
    )


def moved_to(tree: Any, source: jax.sharding.Mesh, target: jax.sharding.Mesh) -> Any:
    """``tree`` with each array sharded on ``source`` given the same partition on
    ``target`` (a mesh of the same devices: the shards stay where they are)."""

    def move(x: Any) -> Any:
        sharding = getattr(x, "sharding", None) if isinstance(x, jax.Array) else None
        if not isinstance(sharding, NamedSharding) or sharding.mesh != source:
            return x
        return jax.device_put(x, NamedSharding(target, sharding.spec))

    return jax.tree.map(move, tree)


def placed_like(tree: Any, like: Any) -> Any:
    """``tree`` with each array put where the array of ``like`` at its place (the same
    structure) is, where that one is a concrete array of the same shape."""

    def place(x: Any, ref: Any) -> Any:
        if isinstance(x, jax.Array) and isinstance(ref, jax.Array) and x.shape == ref.shape:
            return jax.device_put(x, ref.sharding)
        return x

    if jax.tree.structure(tree) != jax.tree.structure(like):  # type: ignore[operator]
        return tree
    return jax.tree.map(place, tree, like)
