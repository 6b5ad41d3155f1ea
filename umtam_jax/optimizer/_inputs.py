"""The transform's inputs: converted and checked before any leaf is touched, with errors
that name the argument and the leaf path."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from umtam_jax.optimizer._config import Config, is_wide_float
from umtam_jax.optimizer._state import is_leaf_state


def any_tracer(tree: Any) -> bool:
    """Whether a leaf of ``tree`` is being traced (by jit, grad, vmap, ...)."""
    return any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(tree))


def refuse_params_placeholder(params: Any) -> None:
    """Refuses the placeholder ``optax.tree_utils.tree_map_params`` initialises with: a
    UMTAM state holds no parameter-shaped trees, so it would map every state array."""
    if type(params).__name__ == "_ParamsPlaceholder":
        raise TypeError(
            "optax.tree_utils.tree_map_params cannot map a UMTAM state: it holds one "
            "NamedTuple of factors per parameter leaf, not parameter-shaped trees; use "
            "umtam_jax.state_shardings for its shardings and umtam_jax.statistics, "
            "saliency, curvature or momentum for parameter-shaped views"
        )


def concrete_param(cfg: Config, path: tuple[Any, ...], param: Any) -> jax.Array:
    """The parameter as an array; an abstract one (``jax.ShapeDtypeStruct``) gives zeros of
    its shape, dtype and sharding, which is all ``init`` reads without tracked saliency."""
    if not isinstance(param, jax.ShapeDtypeStruct):
        return jnp.asarray(param)
    if cfg.track_saliency:
        raise ValueError(
            f"init got an abstract parameter (jax.ShapeDtypeStruct) at "
            f"{jax.tree_util.keystr(path) or 'the root'}: tracked saliency keeps the "
            "initial values W0, so pass the parameters themselves, use saliency='final', "
            "or take shapes with jax.eval_shape(opt.init, params) (with flax.nnx: build "
            "the model inside the function given to nnx.eval_shape, not outside it)"
        )
    sharding = param.sharding if isinstance(param.sharding, jax.sharding.Sharding) else None
    return jnp.zeros(param.shape, param.dtype, device=sharding)


def flatten_like(treedef: Any, tree: Any, what: str) -> list[Any]:
    """``treedef.flatten_up_to(tree)``, with an error that says which argument differs."""
    try:
        return treedef.flatten_up_to(tree)
    except (ValueError, TypeError):

        def short(structure: Any) -> str:
            text = str(structure)
            return text if len(text) <= 200 else text[:200] + "…"

        raise ValueError(
            f"{what} does not have the tree structure of the gradients: gradients "
            f"{short(treedef)}, {what} {short(jax.tree.structure(tree, is_leaf=is_leaf_state))}"
        ) from None


def require_float(path, dtype, what: str) -> None:
    """Raises ``TypeError`` unless ``dtype`` (of ``what`` at ``path``) is real floating-point
    of 16 bits or more."""
    if not is_wide_float(dtype):
        raise TypeError(
            f"{what} at {jax.tree_util.keystr(path)} has dtype {dtype}; UMTAM needs real "
            "floating-point leaves of 16 bits or more (freeze the others with optax.masked "
            "/ optax.partition)"
        )


def check_state_options(path: tuple[Any, ...], leaf: Any, built: Any) -> None:
    """Raises ``ValueError`` unless ``leaf`` (a parameter's stored state) has the arrays
    this optimizer's ``init`` builds for that parameter (``built``, abstract): a state of
    an optimizer with other options (rank, row_axes, min_dim_size_to_factor, adaptive
    rank, error_decay, saliency) would otherwise fail deep in the step, or run silently
    with buffers the options do not ask for."""
    where = jax.tree_util.keystr(tuple(path)) or "the root"
    fix = (
        "the state was built by an optimizer with other options (rank, max_rank, "
        "adaptive_rank, row_axes, min_dim_size_to_factor, error_decay, saliency): build it "
        "with this optimizer's init, or use the options it was built with"
    )
    if type(leaf) is not type(built):
        kind = {"FactoredLeafState": "factored", "DenseLeafState": "dense"}
        raise ValueError(
            f"the optimizer state at {where} is {kind.get(type(leaf).__name__, '?')}, but this "
            f"optimizer keeps a {kind[type(built).__name__]} state for that parameter: {fix}"
        )
    for field, got, want in zip(built._fields, leaf, built, strict=True):
        got_shape = None if got is None else tuple(jnp.shape(got))
        want_shape = None if want is None else tuple(want.shape)
        if got_shape != want_shape:

            def text(shape: Any) -> str:
                return "no array" if shape is None else f"shape {shape}"

            raise ValueError(
                f"the optimizer state at {where} has {text(got_shape)} for {field}, but this "
                f"optimizer keeps {text(want_shape)} there: {fix}"
            )
        if got is not None and not _same_kind(jnp.result_type(got), want.dtype):
            raise TypeError(
                f"the optimizer state at {where} has dtype {jnp.result_type(got)} for "
                f"{field}, but this optimizer keeps {want.dtype} there: build the state with "
                "this optimizer's init"
            )


def _same_kind(got: Any, want: Any) -> bool:
    """Whether a stored state array's dtype can stand for ``want`` (the same kind: a
    floating state saved in another float width is still read)."""
    kinds = (jnp.floating, jnp.integer, jnp.bool_, jnp.complexfloating)
    return any(jnp.issubdtype(got, k) and jnp.issubdtype(want, k) for k in kinds)


def param_array(path: tuple[Any, ...], value: Any) -> jax.Array:
    """A parameter leaf as an array, with an error naming its path when it is none."""
    try:
        param = jnp.asarray(value)
    except (TypeError, ValueError):
        raise TypeError(
            f"params at {jax.tree_util.keystr(tuple(path)) or 'the root'} is "
            f"{type(value).__name__}, not an array"
        ) from None
    require_float(path, param.dtype, "parameter")
    return param


def check_state(state: Any) -> None:
    """Raises ``TypeError`` unless ``state`` looks like what ``init`` returned: a step
    counter of integer dtype and per-parameter leaves."""
    if not (hasattr(state, "count") and hasattr(state, "leaves")):
        raise TypeError(
            "state must be what this optimizer's init returned (a ScaleByUmtamState), got "
            f"{type(state).__name__}"
        )
    if not jnp.issubdtype(jnp.result_type(state.count), jnp.integer):
        raise TypeError(
            f"the optimizer state's step counter (count) must be an integer, got dtype "
            f"{jnp.result_type(state.count)}"
        )
