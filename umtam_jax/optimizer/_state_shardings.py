"""The shardings of an optimizer's state: every UMTAM state array laid out like its parameter.

:func:`state_shardings` gives the ``NamedSharding`` of each array of
``optimizer.init(params)`` for parameters sharded on a mesh; :func:`_canonical` is the
partition spec a jitted step gives a state array, with which
:func:`._sharding.place_like` also places each fresh state array. :mod:`._sharding`
re-exports :func:`state_shardings`.
"""

from __future__ import annotations

from typing import Any

import jax
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from umtam_jax import _pytrees
from umtam_jax.optimizer._axis_order import is_keepdims
from umtam_jax.optimizer._state import DenseLeafState, FactoredLeafState, ScaleByUmtamState


def _canonical(mesh: Any, spec: tuple, ndim: int) -> P:
    """The ``PartitionSpec`` a jitted step gives an output partitioned by ``spec``: one
    entry per axis on Explicit meshes, no trailing ``None`` on Auto ones. A state placed
    this way and the same state coming out of a jitted step then share one executable."""
    spec = tuple(spec) + (None,) * (ndim - len(spec))
    if AxisType.Explicit in tuple(mesh.axis_types):
        return P(*spec)
    while spec and spec[-1] is None:
        spec = spec[:-1]
    return P(*spec)


def _leaf_state_shardings(leaf: Any, sharding: NamedSharding, shape: tuple[int, ...]) -> Any:
    ndim = len(shape)
    spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))

    # Every spec below has one entry per axis of its state array. The result is typed Any:
    # a sharding stands in for its state array, in the state's own NamedTuple (a pytree of
    # the same structure), whose fields are annotated as arrays.
    def named(*s: Any) -> Any:
        return NamedSharding(sharding.mesh, _canonical(sharding.mesh, s, len(s)))

    full = named(*spec)
    if isinstance(leaf, DenseLeafState):
        return DenseLeafState(
            mu=full,
            nu=full,
            saliency=None if leaf.saliency is None else full,
            initial=None if leaf.initial is None else full,
        )
    if is_keepdims(leaf):
        # Keepdims form (_axis_order): every array has the parameter's axes, size 1 where
        # it lacks one, then its own trailing axes.
        def like(x: Any) -> NamedSharding:
            kept = tuple(a if x.shape[i] == shape[i] else None for i, a in enumerate(spec))
            return named(*kept, *(None,) * (x.ndim - ndim))

        return jax.tree.map(like, leaf)
    nb = leaf.sigma.ndim - 2  # batch axes: one (r, r) core per matrix
    k = leaf.u.ndim - 1  # u has shape batch + rows + (r,)
    cols = spec[:nb] + spec[k:]
    return FactoredLeafState(
        u=named(*spec[:k], None),
        sigma=named(*spec[:nb], None, None),
        v=named(*cols, None),
        dense_momentum=None if leaf.dense_momentum is None else full,
        row=named(*spec[:k]),
        col=named(*cols),
        saliency=None if leaf.saliency is None else full,
        initial=None if leaf.initial is None else full,
        rank=None if leaf.rank is None else named(*spec[:nb]),
    )


def state_shardings(optimizer: optax.GradientTransformation, params: Any) -> Any:
    """Shardings of ``optimizer.init(params)`` for sharded ``params``.

    Every UMTAM state array is sharded like the parameter it belongs to: ``u`` like the
    rows of the parameter's 2-D view, ``v`` like its columns, ``dense_momentum``, ``saliency`` and
    ``initial`` like the parameter, ``row``/``col`` like the matching axes; the r×r cores
    (and adaptive ranks) like the batch axes of a stack of matrices, else replicated, as
    the step counter. Parameter-shaped states of other transforms (e.g. Adam
    moments in a chain) follow the parameters; everything else is replicated. Where a
    wrapper leaves a parameter out (``optax.masked``, ``optax.partition``) its state holds
    ``optax.MaskedNode()``, and so do the shardings.

    Args:
      optimizer: any Optax transformation containing UMTAM (``umtam_jax.umtam(...)``,
        possibly wrapped).
      params: arrays or ``jax.ShapeDtypeStruct`` whose ``.sharding`` is a
        ``NamedSharding`` (all on one mesh).

    Returns:
      A pytree of ``NamedSharding`` matching ``optimizer.init(params)``: pass it as
      ``jax.jit(optimizer.init, out_shardings=...)``, as the update's ``out_shardings``, or
      to an Orbax restore target.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jax.sharding import NamedSharding, PartitionSpec as P
      >>> from umtam_jax import state_shardings, umtam
      >>> mesh = jax.make_mesh((1,), ("model",))
      >>> w = jax.ShapeDtypeStruct((256, 128), jnp.float32,
      ...                          sharding=NamedSharding(mesh, P(None, "model")))
      >>> shardings = state_shardings(umtam(1e-3), {"w": w})
    """
    # A flax.nnx Variable stands for its array (nnx.as_pure's layout); its own metadata
    # (e.g. mesh=None from nnx.with_partitioning) is not the array's sharding.
    params = jax.tree.map(_pytrees.unwrap, params, is_leaf=_pytrees.is_variable)
    for path, p in jax.tree_util.tree_flatten_with_path(params)[0]:
        if not isinstance(getattr(p, "sharding", None), NamedSharding):
            raise ValueError(
                "state_shardings needs parameters whose .sharding is a NamedSharding; "
                f"{jax.tree_util.keystr(path) or 'the root'} has {getattr(p, 'sharding', None)!r}"
            )
    shardings = jax.tree.map(lambda p: p.sharding, params)
    if not jax.tree.leaves(shardings):
        raise ValueError("state_shardings needs at least one parameter")
    mesh = jax.tree.leaves(shardings)[0].mesh
    abstract = jax.eval_shape(optimizer.init, params)
    params_def = jax.tree.structure(params)
    # Any: it also stands in for the step counter in ScaleByUmtamState (see named above).
    replicated: Any = NamedSharding(mesh, P())

    # optax.masked / optax.partition leave an optax.MaskedNode where a parameter is not theirs.
    is_masked = lambda n: isinstance(n, optax.MaskedNode)  # noqa: E731

    shapes = [tuple(p.shape) for p in jax.tree.leaves(params)]

    def _is_params_like(n: Any) -> bool:
        """A subtree of the parameters' structure and shapes (Adam's ``mu``): with one
        array for parameters, the step counter has their structure too."""
        if not jax.tree.leaves(n):
            return False
        if jax.tree.structure(n, is_leaf=is_masked) != params_def:  # type: ignore[operator]
            return False
        leaves = jax.tree.leaves(n, is_leaf=is_masked)
        return all(
            is_masked(a) or tuple(a.shape) == shape for a, shape in zip(leaves, shapes, strict=True)
        )

    def is_node(n: Any) -> bool:
        return isinstance(n, ScaleByUmtamState) or _is_params_like(n)

    def convert(node: Any) -> Any:
        if isinstance(node, ScaleByUmtamState):
            leaves = jax.tree.map(
                lambda leaf, s, p: (
                    leaf if is_masked(leaf) else _leaf_state_shardings(leaf, s, tuple(p.shape))
                ),
                node.leaves,
                shardings,
                params,
                is_leaf=lambda n: isinstance(n, FactoredLeafState | DenseLeafState) or is_masked(n),
            )
            return ScaleByUmtamState(count=replicated, leaves=leaves)
        if _is_params_like(node):
            return jax.tree.map(
                lambda n, s: n if is_masked(n) else s, node, shardings, is_leaf=is_masked
            )
        return replicated

    return jax.tree.map(convert, abstract, is_leaf=is_node)
