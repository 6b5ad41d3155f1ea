"""``group_leaves``: equally shaped parameters updated as one stack give the per-leaf update.

The per-leaf update is checked against the float64 NumPy reference in
``test_reference.py``; here the stacked update (``jax.vmap`` over the stack, with the small
linear algebra of all stacks in one batched call) must equal it to float32 rounding. Only
quantities that do not depend on the arbitrary signs of singular vectors are compared:
parameters, the momentum ``U Σ Vᵀ``, ``R``, ``C``, ``M̃`` and ``S``.
"""

from __future__ import annotations

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import umtam_jax
from tests import trees
from umtam_jax.optimizer._state import DenseLeafState, FactoredLeafState

STEPS = 3


def _params():
    rng = np.random.default_rng(0)

    def normal(*shape):
        return jnp.asarray(rng.normal(size=shape), jnp.float32)

    # Two blocks with equal shapes (stacks of 2), plus one matrix and one bias of their own.
    params = {f"block{i}": {"w": normal(48, 32), "bias": normal(32)} for i in range(2)}
    params["head"] = normal(40, 24)
    params["scale"] = normal(7)
    return params


def _gradients(params, step):
    return jax.tree.map(lambda p: jnp.sin(3.0 * p + step) + 0.1 * step * p, params)


def _train(group_leaves: bool, **options):
    opt = umtam_jax.umtam(
        1e-2, rank=8, min_dim_size_to_factor=16, group_leaves=group_leaves, **options
    )
    params = _params()
    state = opt.init(params)
    update = jax.jit(opt.update)
    for step in range(STEPS):
        updates, state = update(_gradients(params, step), state, params)
        params = optax.apply_updates(params, updates)
    return params, state


def _invariants(result):
    params, state = result

    def of_leaf(leaf):
        if isinstance(leaf, FactoredLeafState):
            arrays = [leaf.u @ leaf.sigma @ leaf.v.T, leaf.row, leaf.col]
            arrays += [leaf.dense_momentum, leaf.saliency]
        else:
            arrays = [leaf.mu, leaf.nu, leaf.saliency]
        return [a.astype(jnp.float32) for a in arrays if a is not None]

    leaves = jax.tree.map(
        of_leaf,
        state[0].leaves,
        is_leaf=lambda n: isinstance(n, FactoredLeafState | DenseLeafState),
    )
    return {"params": params, "state": leaves}


@pytest.mark.parametrize(
    "options, rtol",
    [
        ({}, 1e-5),
        ({"error_decay": 0.0, "saliency": "final"}, 1e-5),
        (
            {"oversampling": 4, "power_iterations": 1, "svd_every": 2, "bias_correction": True},
            1e-4,
        ),
        # bfloat16 M̃ and S: one bfloat16 rounding step apart at most.
        ({"adaptive_rank": True, "rank_update_every": 2, "buffer_dtype": "bfloat16"}, 1e-2),
    ],
    ids=["default", "lean", "oversampled-svd-every-bias-corrected", "adaptive-rank-bf16"],
)
def test_stacked_update_equals_the_per_leaf_update(options, rtol):
    grouped = _invariants(_train(True, **options))
    per_leaf = _invariants(_train(False, **options))
    trees.assert_trees_close_to_scale(grouped, per_leaf, rtol=rtol)


def test_a_gradient_array_shared_by_two_leaves_is_stacked_like_two_copies():
    params = {"a": jnp.ones((32, 24)), "b": 2.0 * jnp.ones((32, 24))}
    shared = jnp.asarray(np.random.default_rng(1).normal(size=(32, 24)), jnp.float32)
    results = []
    for group_leaves in (True, False):
        opt = umtam_jax.umtam(1e-2, rank=4, min_dim_size_to_factor=16, group_leaves=group_leaves)
        update = jax.jit(opt.update)
        updates, _ = update({"a": shared, "b": shared}, opt.init(params), params)
        results.append(updates)
    trees.assert_trees_close_to_scale(results[0], results[1], rtol=1e-5)


def test_stacks_only_leaves_of_equal_layout():
    # Same shape, different 2-D views: two stacks of one, so the results are unchanged.
    params = {"a": jnp.ones((4, 8, 24)), "b": jnp.ones((4, 8, 24))}
    grads = jax.tree.map(lambda p: jnp.cos(p * jnp.arange(p.size).reshape(p.shape)), params)

    def row_axes(path, shape):
        return 1 if path[0].key == "a" else 2

    results = []
    for group_leaves in (True, False):
        opt = umtam_jax.umtam(
            1e-2, rank=4, min_dim_size_to_factor=4, row_axes=row_axes, group_leaves=group_leaves
        )
        state = opt.init(params)
        assert state[0].leaves["a"].u.shape == (4, 4)
        assert state[0].leaves["b"].u.shape == (4, 8, 4)
        results.append(jax.jit(opt.update)(grads, state, params)[0])
    trees.assert_trees_close_to_scale(results[0], results[1], rtol=1e-5)


@pytest.mark.parametrize("value", ["yes", 1, 0.0, None])
def test_group_leaves_must_be_true_or_false(value):
    with pytest.raises(TypeError, match="group_leaves must be True or False"):
        umtam_jax.umtam(1e-3, group_leaves=value)


def test_a_leaf_viewed_transposed_stacks_with_its_canonical_shape():
    # "b" is the columns-first view of a (32, 48) leaf: canonically (48, 32), like "a".
    rng = np.random.default_rng(3)
    params = {"a": jnp.asarray(rng.normal(size=(48, 32)), jnp.float32)}
    params["b"] = jnp.asarray(rng.normal(size=(32, 48)), jnp.float32)
    grads = jax.tree.map(lambda p: jnp.sin(3.0 * p), params)

    def row_axes(path, shape):
        return umtam_jax.MatrixAxes((), (1,)) if path[0].key == "b" else 1

    results = []
    for group_leaves in (True, False):
        opt = umtam_jax.umtam(
            1e-2, rank=4, min_dim_size_to_factor=16, row_axes=row_axes, group_leaves=group_leaves
        )
        state = opt.init(params)
        assert state[0].leaves["b"].u.shape == (1, 48, 4)  # keepdims: rows are axis 1
        results.append(jax.jit(opt.update)(grads, state, params)[0])
    trees.assert_trees_close_to_scale(results[0], results[1], rtol=1e-5)
    # The view of "b" is that of its transpose under the default view.
    opt = umtam_jax.umtam(1e-2, rank=4, min_dim_size_to_factor=16)
    flipped = {"a": params["a"], "b": params["b"].T}
    want, _ = jax.jit(opt.update)({"a": grads["a"], "b": grads["b"].T}, opt.init(flipped), flipped)
    trees.assert_trees_close_to_scale(results[0]["b"], want["b"].T, rtol=1e-5)


def _stacked_state_fields():
    """The fields of the factored blocks' state that the grouped update stacks: traced
    from every ``stack``/``concatenate`` of its jaxpr back through reshapes to the state's
    inputs."""
    opt = umtam_jax.umtam(1e-2, rank=4, min_dim_size_to_factor=16, group_leaves=True)
    params = {f"block{i}": jnp.ones((48, 32)) for i in range(2)}
    state = opt.init(params)
    closed = jax.make_jaxpr(opt.update)(params, state, params)
    n_grads = len(jax.tree.leaves(params))
    state_paths = jax.tree_util.tree_flatten_with_path(state)[0]
    field_of = {
        var: path[-1].name
        for var, (path, _) in zip(closed.jaxpr.invars[n_grads:], state_paths, strict=False)
        if isinstance(path[-1], jax.tree_util.GetAttrKey)
    }
    # Each output of these primitives is its input of the same position, reshaped.
    transparent = ("reshape", "broadcast_in_dim", "convert_element_type", "shard_alike")
    producer = {
        out: (eqn, position)
        for eqn in closed.jaxpr.eqns
        for position, out in enumerate(eqn.outvars)
    }

    def source(var):
        while var in producer and producer[var][0].primitive.name in transparent:
            eqn, position = producer[var]
            var = eqn.invars[position if len(eqn.invars) == len(eqn.outvars) else 0]
        return var

    return {
        field_of[source(x)]
        for eqn in closed.jaxpr.eqns
        if eqn.primitive.name in ("stack", "concatenate")
        for x in eqn.invars
        if isinstance(x, jax.extend.core.Var) and source(x) in field_of
    }


def test_the_stack_leaves_out_the_saliency_and_initial_parameters():
    # S and W0 are parameter-sized and read only by the elementwise step 9, which runs
    # per leaf after the stack: stacking them would copy twice their bytes every step.
    stacked = _stacked_state_fields()
    assert "dense_momentum" in stacked and "u" in stacked  # the trace sees the stack
    assert not stacked & {"saliency", "initial"}
