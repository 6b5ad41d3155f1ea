"""The performance paths of the whole update compute the same thing as the plain ones.

- Without error buffer (γ = 0) UMTAM keeps M̃ factored; its updates and state equal those of
  the materialised path (forced here by a negligible γ), with and without ``svd_every``.
- Donating both params and optimizer state to a jitted step works (W0 is its own buffer).
- Where JAX has no ``shard_alike`` the sharding hint is skipped and the update is the same.
- The update is differentiable with respect to the params, on CPU's and GPU/TPU's paths.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import umtam_jax


def _run(opt, params, steps, seed=0):
    state = opt.init(params)
    update = jax.jit(opt.update)
    rng = np.random.default_rng(seed)
    outs = []
    for _ in range(steps):
        grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
        updates, state = update(grads, state, params)
        outs.append(updates)
    return outs, state


@pytest.mark.parametrize("svd_every", [1, 3])
def test_factored_momentum_path_equals_the_materialised_one(svd_every, monkeypatch):
    """γ = 0 keeps M̃ = b1 U Σ Vᵀ + (1 − b1) G̃ factored; a negligible γ forces the
    materialised path, and both must agree (float64, so only the algorithm is compared).
    Both run the first step's extra power iterations (by default only γ = 0 has them)."""
    from umtam_jax.optimizer import _decomposition

    monkeypatch.setattr(
        _decomposition,
        "cold_start_iterations",
        lambda cfg: _decomposition.COLD_START_POWER_ITERATIONS,
    )
    with jax.enable_x64(True):
        rng = np.random.default_rng(5)
        params = {
            "w": jnp.asarray(rng.normal(size=(40, 24))),
            "conv": jnp.asarray(rng.normal(size=(3, 8, 24))),
            "b": jnp.asarray(rng.normal(size=(24,))),
        }
        common = dict(rank=5, min_dim_size_to_factor=8, svd_every=svd_every, saliency="final")
        lean, lean_state = _run(umtam_jax.umtam(1.0, error_decay=0.0, **common), params, 9)
        full, full_state = _run(umtam_jax.umtam(1.0, error_decay=1e-300, **common), params, 9)
        assert lean_state[0].leaves["w"].dense_momentum is None
        assert full_state[0].leaves["w"].dense_momentum is not None
        chex.assert_trees_all_close(lean, full, rtol=1e-9, atol=1e-12)
        for quantity in (umtam_jax.momentum, umtam_jax.curvature):
            chex.assert_trees_all_close(
                quantity(lean_state), quantity(full_state), rtol=1e-9, atol=1e-12
            )


def test_params_and_state_can_both_be_donated():
    params = {"w": jnp.ones((16, 12)), "b": jnp.zeros(12)}
    opt = umtam_jax.umtam(1e-2, rank=2, min_dim_size_to_factor=8)
    state = opt.init(params)

    @jax.jit
    def step(params, state, grads):
        updates, state = opt.update(grads, state, params)
        return jax.tree.map(jnp.add, params, updates), state

    step = jax.jit(step, donate_argnums=(0, 1))
    grads = jax.tree.map(jnp.ones_like, params)
    for _ in range(3):
        params, state = step(params, state, grads)
    assert np.all(np.isfinite(params["w"]))
    np.testing.assert_array_equal(umtam_jax.statistics(state)["w"].row.shape, (16,))


def test_shard_alike_is_found_where_jax_keeps_it(monkeypatch):
    """Without the public module the one under ``jax._src`` stands in; with neither
    module, None (keep_like is then a no-op, below)."""
    import sys

    from jax._src import shard_alike as private

    from umtam_jax.optimizer import _sharding

    assert _sharding.shard_alike is not None
    monkeypatch.setitem(sys.modules, "jax.experimental.shard_alike", None)  # import fails
    assert _sharding.find_shard_alike() is private.shard_alike
    monkeypatch.setitem(sys.modules, "jax._src.shard_alike", None)
    assert _sharding.find_shard_alike() is None
    assert _sharding.find_shard_alike(("umtam_jax",)) is None  # a module without it


def test_without_shard_alike_the_update_is_unchanged(monkeypatch):
    """Where JAX has no ``shard_alike``, the sharding hint is skipped and a
    single-device update is the same, a 3-D leaf (reshaped internally) included."""
    from umtam_jax.optimizer import _sharding

    rng = np.random.default_rng(5)
    params = {"w": jnp.asarray(rng.normal(size=(2, 8, 4)), jnp.float32)}
    grads = {"w": jnp.asarray(rng.normal(size=(2, 8, 4)), jnp.float32)}
    opt = umtam_jax.umtam(1e-2, rank=2, min_dim_size_to_factor=1)
    state = opt.init(params)
    want, _ = jax.jit(opt.update)(grads, state, params)
    monkeypatch.setattr(_sharding, "shard_alike", None)
    tree = {"a": jnp.ones(3)}
    assert _sharding.keep_like(tree, tree) is tree
    got, _ = jax.jit(lambda g, s, p: opt.update(g, s, p))(grads, state, params)  # traced anew
    np.testing.assert_array_equal(np.asarray(got["w"]), np.asarray(want["w"]))


@pytest.mark.usefixtures("code_path")
@pytest.mark.parametrize("svd_method", ["exact", "subspace"])
@pytest.mark.parametrize("clip_threshold", [1.0, None])
def test_the_update_is_differentiable_with_respect_to_the_params(svd_method, clip_threshold):
    """Meta-learning through a step: the derivative of the update with respect to the
    parameters (which also give the gradient) matches central finite differences. Rank 1:
    at higher ranks the orthonormalisation's eigh has repeated eigenvalues, where its
    derivative is undefined (docs/algorithm.md §2.8)."""
    rng = np.random.default_rng(1)
    w = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)
    probe = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)
    direction = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)
    opt = umtam_jax.scale_by_umtam(rank=1, min_dim_size_to_factor=1, svd_method=svd_method,
                                   clip_threshold=clip_threshold)  # fmt: skip

    def loss(p):
        params = {"w": p}
        g = {"w": jnp.sin(3 * p) + 0.2}
        updates, _ = opt.update(g, opt.init(params), params)
        return jnp.sum(updates["w"] * probe)

    grad = jax.jit(jax.grad(loss))(w)
    assert np.all(np.isfinite(grad))
    h = 1e-2
    fd = (loss(w + h * direction) - loss(w - h * direction)) / (2 * h)
    np.testing.assert_allclose(float(jnp.sum(grad * direction)), float(fd), rtol=3e-2)
