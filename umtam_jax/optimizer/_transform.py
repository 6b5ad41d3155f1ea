"""The UMTAM gradient transformation :func:`scale_by_umtam`: validates the options once,
then initialises and updates every leaf of the parameter tree.

Its update checks the gradients against the parameters and the state (:mod:`._inputs`),
chooses each leaf's layout and group (:mod:`._grouping`), runs dense leaves
(:mod:`._dense`) and steps 1–2 of factored ones (:mod:`._factored`), decomposes all
factored momenta together (:mod:`._decomposition`), then finishes the factored leaves.
"""

from __future__ import annotations

import functools
from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax

from umtam_jax import _pytrees
from umtam_jax._precision import full_precision
from umtam_jax.optimizer import _sharding
from umtam_jax.optimizer._axis_order import (
    canonical_state,
    check_state_shape,
    from_canonical,
    stored_state,
    to_canonical,
)
from umtam_jax.optimizer._config import Config, as_dtype, compute_dtype, in_dtype, validate
from umtam_jax.optimizer._decomposition import new_factors
from umtam_jax.optimizer._dense import init_dense, update_dense
from umtam_jax.optimizer._eager import eager_update
from umtam_jax.optimizer._factored import (
    factored_finish,
    factored_request,
    init_factored,
    operand_row_axes,
    with_saliency,
    without_saliency,
)
from umtam_jax.optimizer._grouping import (
    batch_keys,
    batch_view,
    leaf_groups,
    map_batch,
    merge_batch,
    on_batch,
    on_stack,
    split_batch,
    unstacked,
)
from umtam_jax.optimizer._inputs import (
    any_tracer,
    check_state,
    check_state_options,
    concrete_param,
    flatten_like,
    param_array,
    refuse_params_placeholder,
    require_float,
)
from umtam_jax.optimizer._layout import (
    Layout,
    RowAxesFn,
    default_row_axes,
    layout,
    warn_unstacked,
)
from umtam_jax.optimizer._state import LeafState, ScaleByUmtamState, as_leaf_state


def _leaf_layout(cfg: Config, path: tuple[Any, ...], shape: tuple[int, ...]) -> Layout:
    """The layout of one leaf; with adaptive rank the buffers hold ``max_rank`` components."""
    max_rank = cfg.max_rank if cfg.adaptive_rank else cfg.rank
    return layout(cfg.row_axes, cfg.min_dim_size_to_factor, max_rank, path, shape)


def _leaf_key(base_key: jax.Array, index: int) -> jax.Array:
    """Leaf ``index``'s key, which ``init`` splits into U0's and V0's keys."""
    return jax.random.fold_in(base_key, index)


def _update_stream(base_key: jax.Array, index: int) -> jax.Array:
    """The key of leaf ``index``'s oversampling draws, folded with t at each step.

    ``split(k)[1]`` can be ``fold_in(k, 1)``: folding t into the leaf's key itself would
    draw step 1's columns with V0's key, making them V0 (a rank-deficient sketch). The
    update's stream is a third key split from the leaf's key.
    """
    return jax.random.split(_leaf_key(base_key, index), 3)[2]


def scale_by_umtam(
    *,
    rank: int = 32,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    error_decay: float = 0.9,
    clip_threshold: float | None = 1.0,
    saliency_decay: float = 0.9,
    svd_method: Literal["exact", "subspace"] = "subspace",
    svd_every: int = 1,
    oversampling: int = 0,
    power_iterations: int = 0,
    min_dim_size_to_factor: int = 128,
    row_axes: RowAxesFn | None = None,
    bias_correction: bool = False,
    saliency: Literal["tracked", "final"] = "tracked",
    buffer_dtype: Any = None,
    adaptive_rank: bool = False,
    max_rank: int | None = None,
    min_rank: int = 1,
    rank_step: int = 4,
    rank_update_every: int = 100,
    rank_grow_threshold: float = 1.5,
    rank_shrink_threshold: float = 0.5,
    seed: int = 0,
    group_leaves: bool = False,
) -> optax.GradientTransformation:
    """Rescales gradients by UMTAM's low-rank, error-fed, factored-preconditioned momentum.

    For each matrix-like parameter (see ``row_axes``/``min_dim_size_to_factor``) and step t
    (docs/algorithm.md §2.2), with the clipped gradient G:

    1. ``M̃ = b1 U Σ Vᵀ + (1 − b1) G + γ E``; ``(U, Σ, V) = TruncatedSVD_r(M̃)``;
       ``E = M̃ − U Σ Vᵀ``.
    2. ``R ← b2 R + (1 − b2) rowsum(G²)``, ``C ← b2 C + (1 − b2) colsum(G²)``,
       ``Ŝ = R Cᵀ / sum(R)``, ``ε_t = eps · max(1, ‖G‖_F / ‖W‖_F)``.
    3. Output ``D = (U Σ Vᵀ) ⊙ (Ŝ + ε_t)^(−1/2)``.
    4. Saliency ``S ← α S + (1 − α)(W − W0)² ⊙ sqrt(R_i C_j)``.

    Other parameters (biases, norms, small matrices) use an Adam-like rule with the same
    hyper-parameters (docs/algorithm.md §2.4); ``bias_correction`` applies to both kinds.
    ``update`` needs ``params``.

    Args:
      rank: rank r of the momentum (clipped to ``min(m, n)`` per parameter).
      b1: momentum decay β1 in [0, 1).
      b2: second-moment decay β2 in [0, 1).
      eps: ε > 0, scaled per step into the adaptive ε_t.
      error_decay: error-feedback weight γ; ``0`` allocates no m×n momentum buffer at all
        (with γ > 0 the state keeps M̃, from which ``E = M̃ − U Σ Vᵀ``).
      clip_threshold: per-parameter Frobenius-norm clipping threshold τ (``None``: off).
      saliency_decay: saliency EMA decay α in [0, 1).
      svd_method: ``"exact"`` (full SVD, the reference) or ``"subspace"`` (warm-started
        randomized range finder reusing the previous V, two m×n×r matmuls).
      svd_every: a fresh decomposition every ``svd_every`` steps; in between the bases are
        kept and only the r×r core is re-projected (docs/algorithm.md §2.5).
      oversampling: extra random sketch columns for ``"subspace"``.
      power_iterations: extra power iterations for ``"subspace"``.
      min_dim_size_to_factor: factor a parameter only if both sides of its 2-D view are at
        least this large (as in ``optax.adafactor``).
      row_axes: ``(key_path, shape) -> k | MatrixAxes`` choosing the matrix view per
        parameter: ``k`` gives one ``(prod(shape[:k]), prod(shape[k:]))`` matrix;
        ``MatrixAxes(batch, rows)`` makes the leading ``batch`` axes a stack of
        independent matrices (layer-stacked models; see :func:`umtam_jax.scanned`), each
        with its own factors, second moments, clipping norm, ε_t, saliency and rank;
        ``MatrixAxes(batch=(1,), rows=(0,))`` names the axes by position (a
        ``[d_in, L, d_out]`` stack), the columns being the others.
        Default :func:`default_row_axes` (fan-in × fan-out). Rows or columns of size 0
        make a parameter dense.
      bias_correction: divide the momentum by ``1 − b1^t`` and Ŝ (dense: v) by ``1 − b2^t``.
        The second moments start at ``eps``, so the corrected ones hold
        ``eps · b2^t / (1 − b2^t)`` of it (1e-5 at t = 1 with the defaults, 1e-7 at t = 100).
      saliency: ``"tracked"`` keeps W0 and S in the state; ``"final"`` keeps neither (merge
        code computes S once from the expert, the base and R, C).
      buffer_dtype: dtype of the m×n buffers (the momentum M̃ kept for error feedback, and
        S; default: the compute dtype).
      adaptive_rank: adapt the rank with Eq. 16 (buffers sized ``max_rank``).
      max_rank: buffer rank with adaptive rank (default ``2 * rank``; refused without it).
      min_rank: lower bound of the adaptive rank (refused without it).
      rank_step: Δr of Eq. 16.
      rank_update_every: T_adapt of Algorithm 1.
      rank_grow_threshold: α > 1 of Eq. 16.
      rank_shrink_threshold: β < 1 of Eq. 16.
      seed: seed of the random initial factors and of the oversampling columns.
      group_leaves: update parameters of equal shape (and equal state layout) as one
        stack, mapped with ``jax.vmap``: one kernel per operation for all of them instead
        of one per parameter, at the price of copying them into the stack and back.
        Results equal the per-parameter ones up to rounding. An H100 ran the update alone
        1.16–1.53× faster on GPT-2-shaped models (older code, whose stacks also held ``S``
        and ``W0``), but a whole training step on an H200 was no faster; on CPUs the copies
        cost more than they save (docs/performance.md). Off by default because the copies
        need memory: XLA plans 2–2.2× the parameter bytes more temporary memory for the
        update (GPT-2 shapes, lean and default settings; per parameter ~1×); a matrix's
        saliency ``S`` and ``W0`` are not stacked (the saliency step runs per parameter).
        Parameters under Explicit sharding, parameters with batch axes (layer-stacked
        leaves: ``MatrixAxes`` with ``batch``, ``scanned``), and factored ones with
        ``svd_method="exact"``, are always updated one by one.

    Returns:
      An ``optax.GradientTransformation`` whose state is a :class:`ScaleByUmtamState`.

    Example:
      >>> import jax.numpy as jnp, optax, umtam_jax
      >>> params = {"w": jnp.ones((256, 128)), "b": jnp.zeros(128)}
      >>> tx = umtam_jax.scale_by_umtam(rank=8)
      >>> state = tx.init(params)
      >>> grads = {"w": jnp.full((256, 128), 0.1), "b": jnp.ones(128)}
      >>> updates, state = tx.update(grads, state, params)

    References:
      UMTAM, arXiv:2512.17109, Algorithm 1; Adafactor, arXiv:1804.04235.
    """
    if saliency not in ("tracked", "final"):
        raise ValueError(f"saliency must be 'tracked' or 'final', got {saliency!r}")
    cfg = Config(
        rank=rank,
        b1=b1,
        b2=b2,
        eps=eps,
        error_decay=error_decay,
        clip_threshold=clip_threshold,
        saliency_decay=saliency_decay,
        svd_method=svd_method,
        svd_every=svd_every,
        oversampling=oversampling,
        power_iterations=power_iterations,
        min_dim_size_to_factor=min_dim_size_to_factor,
        row_axes=default_row_axes if row_axes is None else row_axes,
        bias_correction=bias_correction,
        track_saliency=saliency == "tracked",
        buffer_dtype=as_dtype(buffer_dtype),
        adaptive_rank=adaptive_rank,
        max_rank=max_rank if max_rank is not None else 2 * rank,
        min_rank=min_rank,
        rank_step=rank_step,
        rank_update_every=rank_update_every,
        rank_grow_threshold=rank_grow_threshold,
        rank_shrink_threshold=rank_shrink_threshold,
        seed=seed,
        group_leaves=group_leaves,
    )
    validate(cfg)

    def init_fn(params):
        refuse_params_placeholder(params)
        # A flax.nnx Variable counts as the array it holds: its leaf state takes its place
        # (not inside it), so nnx.Optimizer keeps one structure from step to step.
        paths_and_leaves, treedef = _pytrees.flatten_with_variables(params)
        warn_unstacked(cfg.row_axes, paths_and_leaves)
        leaves = []
        for index, (path, param) in enumerate(paths_and_leaves):
            param = concrete_param(cfg, path, _pytrees.unwrap(param))
            require_float(path, param.dtype, "parameter")
            leaves.append(_init_leaf(cfg, index, path, param))
        return ScaleByUmtamState(
            count=jnp.zeros([], jnp.int32), leaves=jax.tree_util.tree_unflatten(treedef, leaves)
        )

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("scale_by_umtam needs params: call update(grads, state, params)")
        check_state(state)
        if any_tracer((updates, state, params)):  # inside the caller's jit, grad or vmap
            return _update(cfg, updates, state, params)
        # Called eagerly: one compilation per configuration and input signature, shared
        # by transforms built again with the same options (see _eager).
        return eager_update(_update, cfg, updates, state, params)

    return optax.GradientTransformation(init_fn, update_fn)


def _init_leaf(cfg: Config, index: int, path: tuple[Any, ...], param: jax.Array) -> Any:
    """Leaf ``index``'s initial state, in the parameter's axis order."""
    cfg = in_dtype(cfg, compute_dtype(param.dtype))
    leaf_layout = _leaf_layout(cfg, path, param.shape)
    canonical = to_canonical(param, leaf_layout.perm)
    leaf: LeafState
    if leaf_layout.row_axes is None:
        leaf = init_dense(cfg, canonical)
    else:
        base_key = jax.random.key(cfg.seed)
        leaf = init_factored(cfg, leaf_layout, canonical, _leaf_key(base_key, index))
    return stored_state(leaf, leaf_layout, param.ndim)


# Full float32 products: the default on GPU/TPU would run them as TF32/bf16 passes,
# whose ~1e-3 rounding breaks the orthonormality of U and V (measured on an H100).
@full_precision
def _update(cfg: Config, updates: Any, state: Any, params: Any) -> tuple[Any, Any]:
    """One step of every leaf (traced in the caller's transformation or :mod:`._eager`)."""
    base_key = jax.random.key(cfg.seed)
    count = optax.safe_increment(state.count)
    # Updates keep the gradients' structure (Variables included); the state's leaves
    # sit where the gradients' arrays or Variables are (see init_fn).
    treedef = jax.tree.structure(updates)
    grads_with_path, leaves_def = _pytrees.flatten_with_variables(updates)
    # Python scalar leaves become 0-d arrays, as optax's own transforms treat them.
    grads_with_path = [(path, jnp.asarray(_pytrees.unwrap(g))) for path, g in grads_with_path]
    param_leaves = [
        param_array(path, _pytrees.unwrap(w))
        for (path, _), w in zip(
            grads_with_path, flatten_like(leaves_def, params, "params"), strict=True
        )
    ]
    state_leaves = flatten_like(leaves_def, state.leaves, "the optimizer state (from init)")
    leaf_states = [as_leaf_state(_pytrees.unwrap(x)) for x in state_leaves]
    layouts, built = [], {}
    for (path, g), w, x in zip(grads_with_path, param_leaves, leaf_states, strict=True):
        require_float(path, g.dtype, "gradient")
        if g.shape != w.shape:
            raise ValueError(
                f"gradient shape {g.shape} differs from parameter shape {w.shape} at "
                f"{jax.tree_util.keystr(path)}"
            )
        check_state_shape(path, x, w.shape)  # static shapes: no cost per step
        leaf_layout = _leaf_layout(cfg, path, w.shape)
        # What init builds for this leaf (abstract; one trace per layout and dtype).
        like = (leaf_layout, w.shape, w.dtype)
        if like not in built:
            built[like] = jax.eval_shape(functools.partial(_init_leaf, cfg, 0, path), w)
        check_state_options(path, x, built[like])
        layouts.append(leaf_layout)
    # Every leaf is updated in canonical order (batch, rows, cols): see _axis_order.
    stored_states = leaf_states
    grads = [
        to_canonical(g, lay.perm) for (_, g), lay in zip(grads_with_path, layouts, strict=True)
    ]
    params_in_order = param_leaves
    param_leaves = [to_canonical(w, lay.perm) for w, lay in zip(param_leaves, layouts, strict=True)]
    grads = _sharding.batched_like_params(grads, param_leaves, layouts)
    leaf_states = [
        canonical_state(x, lay, w.ndim)
        for x, lay, w in zip(leaf_states, layouts, param_leaves, strict=True)
    ]
    directions: list[Any] = [None] * len(grads)
    new_states: list[Any] = [None] * len(grads)
    pending, requests = [], []  # factored leaves wait for step 3, done for all at once
    for members in leaf_groups(cfg, layouts, grads, param_leaves, leaf_states):
        leaf_layout = layouts[members[0]]
        # The options in the group's compute dtype (injected float64 ones cast).
        group_cfg = in_dtype(cfg, compute_dtype(param_leaves[members[0]].dtype))
        args: list[tuple[Any, ...]] = [(grads[i], param_leaves[i], leaf_states[i]) for i in members]
        if leaf_layout.row_axes is None:
            dense = functools.partial(update_dense, group_cfg)
            if leaf_layout.batch_axes:  # one clipping norm and ε_t per slice
                out = on_batch(leaf_layout, dense, args[0], count)
                directions[members[0]] = out[0].astype(grads[members[0]].dtype)
                new_states[members[0]] = out[1]
                continue
            out = on_stack(dense, [(*a, count) for a in args])
            for i, (d, new) in zip(members, unstacked(out, len(members)), strict=True):
                directions[i], new_states[i] = d.astype(grads[i].dtype), new
            continue
        keys = [jax.random.fold_in(_update_stream(base_key, i), count) for i in members]
        request_fn = functools.partial(factored_request, group_cfg, leaf_layout)
        if leaf_layout.batch_axes:  # a stack of matrices in one leaf: mapped over its batch
            ((g, w, leaf_state),) = args
            view = batch_view(leaf_layout, w)
            if view is not leaf_layout:
                g, w, leaf_state = merge_batch(leaf_layout, (g, w, leaf_state))
            stacked_keys = batch_keys(view, keys[0], w)
            mapped = map_batch(view, request_fn, (0, 0, 0, None, 0))
            request, carry = mapped(g, w, leaf_state, count, stacked_keys)
            leaf_layout = view  # what finishing the leaf maps over
        else:
            if len(members) > 1:  # S and W0 stay per leaf: see factored_saliency
                args = [(g, w, without_saliency(x)) for g, w, x in args]
            args = [(*a, count, key) for a, key in zip(args, keys, strict=True)]
            request, carry = on_stack(request_fn, args)
        pending.append((members, leaf_layout, carry, group_cfg))
        row_axes = operand_row_axes(layouts[members[0]], param_leaves[members[0]].ndim)
        requests.append(request._replace(rank=leaf_layout.buffer_rank, row_axes=row_axes))
    for (members, leaf_layout, carry, group_cfg), factors in zip(
        pending, new_factors(cfg, requests, count), strict=True
    ):
        finish = functools.partial(factored_finish, group_cfg, leaf_layout, count=count)
        if leaf_layout.batch_axes:
            out = map_batch(leaf_layout, finish, (0, 0))(carry, factors)
            original = layouts[members[0]]
            if leaf_layout is not original:  # batch axes merged (batch_view)
                out = split_batch(param_leaves[members[0]].shape[: original.batch_axes], out)
            outs = [out]
        elif len(members) == 1:
            outs = [finish(carry, factors)]
        else:
            outs = unstacked(jax.vmap(finish)(carry, factors), len(members))
            outs = [
                (d, with_saliency(group_cfg, new, param_leaves[i], leaf_states[i]))
                for i, (d, new) in zip(members, outs, strict=True)
            ]
        for i, (d, new) in zip(members, outs, strict=True):
            directions[i], new_states[i] = d.astype(grads[i].dtype), new
    directions = [from_canonical(d, lay.perm) for d, lay in zip(directions, layouts, strict=True)]
    new_states = [
        stored_state(x, lay, w.ndim)
        for x, lay, w in zip(new_states, layouts, param_leaves, strict=True)
    ]
    # Updates keep the parameters' sharding and states their own (Optax's convention),
    # where an Auto mesh would lose it through a factored leaf's reshapes (keep_like);
    # dense leaves are not tied (a stacked bias took the stacked kernel's partition).
    factored = [lay.row_axes is not None for lay in layouts]
    directions = _sharding.keep_like(directions, params_in_order, factored)
    new_states = _sharding.keep_like(new_states, stored_states, factored)
    return (
        jax.tree_util.tree_unflatten(treedef, directions),
        ScaleByUmtamState(count=count, leaves=jax.tree_util.tree_unflatten(leaves_def, new_states)),
    )
