"""UMTAM on extreme and empty input: extreme gradients and parameters, unclipped large
gradients, non-finite gradients (with ``optax.apply_if_finite``) and empty leaves."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import umtam_jax
from tests.optimizer.behaviour_helpers import SMALL, _grads, _params


@pytest.mark.parametrize("method", ["exact", "subspace"])
@pytest.mark.parametrize("grad_scale", [0.0, 1e30, 1e-30])
@pytest.mark.parametrize("param_scale", [0.0, 1.0])
def test_extreme_gradients_and_params_give_finite_updates_and_state(
    method, grad_scale, param_scale
):
    params = jax.tree.map(lambda p: p * param_scale, _params())
    opt = umtam_jax.umtam(0.1, svd_method=method, **SMALL)
    state = opt.init(params)
    for t in range(3):
        grads = jax.tree.map(lambda g: g * grad_scale, _grads(params, t))
        updates, state = opt.update(grads, state, params)
        for leaf in jax.tree.leaves((updates, state)):
            if jnp.issubdtype(leaf.dtype, jnp.floating):
                assert bool(jnp.all(jnp.isfinite(leaf)))
    if grad_scale:
        assert any(float(jnp.abs(u).max()) > 0 for u in jax.tree.leaves(updates))


def test_unclipped_large_gradients_keep_a_finite_saliency_and_curvature():
    """Without clipping, R_i C_j can exceed float32's range (here ~1e42) while R, C, Ŝ and
    S = (1 − α)(W − W0)² √(R_i C_j) do not: they match a float64 reference."""
    initial = _params()
    params = jax.tree.map(lambda p: p + 0.5, initial)
    grads = jax.tree.map(lambda g: g * 3e11, _grads(initial, 0))
    opt = umtam_jax.umtam(0.1, clip_threshold=None, **SMALL)
    _, state = opt.update(grads, opt.init(initial), params)
    g = np.asarray(grads["dense"]["kernel"], np.float64)
    b2, eps, alpha = 0.999, 1e-8, 0.9
    row = b2 * eps + (1 - b2) * np.sum(g * g, axis=1)
    col = b2 * eps + (1 - b2) * np.sum(g * g, axis=0)
    assert np.max(np.outer(row, col)) > 1e40  # beyond float32
    deviation = np.asarray(params["dense"]["kernel"], np.float64) - np.asarray(
        initial["dense"]["kernel"], np.float64
    )
    want_saliency = (1 - alpha) * deviation**2 * np.sqrt(np.outer(row, col))
    want_curvature = np.outer(row, col) / row.sum()
    np.testing.assert_allclose(
        umtam_jax.saliency(state)["dense"]["kernel"], want_saliency, rtol=1e-5
    )
    np.testing.assert_allclose(
        umtam_jax.curvature(state)["dense"]["kernel"], want_curvature, rtol=1e-5
    )


@pytest.mark.usefixtures("code_path")
def test_non_finite_gradients_are_not_absorbed_and_apply_if_finite_skips_them():
    params = _params()
    grads = _grads(params, 0)
    grads["dense"]["kernel"] = grads["dense"]["kernel"].at[0, 0].set(jnp.nan)
    grads["bias"] = grads["bias"].at[1].set(jnp.inf)
    opt = umtam_jax.umtam(0.1, **SMALL)
    updates, _ = opt.update(grads, opt.init(params), params)
    assert not bool(jnp.all(jnp.isfinite(updates["dense"]["kernel"])))
    assert not bool(jnp.all(jnp.isfinite(updates["bias"])))

    safe = optax.apply_if_finite(umtam_jax.umtam(0.1, **SMALL), max_consecutive_errors=3)
    state = safe.init(params)
    updates, state = safe.update(grads, state, params)
    assert all(float(jnp.abs(u).max()) == 0 for u in jax.tree.leaves(updates))
    assert int(state.notfinite_count) == 1
    assert bool(jnp.all(umtam_jax.saliency(state)["dense"]["kernel"] == 0))


def test_empty_leaves_get_empty_updates_and_leave_the_others_unchanged():
    params = _params()
    with_empty = {**params, "empty": jnp.zeros((0, 16)), "no_cols": jnp.zeros((16, 0))}
    opt = umtam_jax.umtam(0.1, **SMALL)
    update = jax.jit(opt.update)
    state, state_e = opt.init(params), opt.init(with_empty)
    for t in range(3):
        grads = _grads(params, t)
        grads_e = {**grads, "empty": jnp.zeros((0, 16)), "no_cols": jnp.zeros((16, 0))}
        updates, state = update(grads, state, params)
        updates_e, state_e = update(grads_e, state_e, with_empty)
        assert updates_e["empty"].shape == (0, 16) and updates_e["no_cols"].shape == (16, 0)
        for name in params:
            chex.assert_trees_all_equal(updates[name], updates_e[name])
        params = optax.apply_updates(params, updates)
        with_empty = optax.apply_updates(with_empty, updates_e)
