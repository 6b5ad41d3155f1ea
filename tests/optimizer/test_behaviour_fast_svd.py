"""UMTAM's fast SVD (``svd_method="subspace"``) against the exact one: along a training
trajectory, on a flat tail spectrum, from a good warm start, and with oversampling draws of
their own (the optimizer's other behaviour: ``test_behaviour_*.py`` beside this module)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import umtam_jax
from umtam_jax.optimizer._lowrank import exact_svd, subspace_svd


def _trajectory(m=256, n=192, signal_rank=16, decay=0.85, steps=60, seed=0):
    """Gradients with a decaying low-rank signal whose coefficients fluctuate, plus noise."""
    rng = np.random.default_rng(seed)
    left, _ = np.linalg.qr(rng.normal(size=(m, signal_rank)))
    right, _ = np.linalg.qr(rng.normal(size=(n, signal_rank)))
    spectrum = decay ** np.arange(signal_rank)
    for _ in range(steps):
        coefficients = spectrum * (1 + 0.3 * rng.normal(size=signal_rank))
        noise = 0.05 * rng.normal(size=(m, n)) / np.sqrt(n)
        yield (left * coefficients) @ right.T + noise


def _updates_and_momenta(method, grads, rank=16):
    params = {"w": jnp.full(grads[0].shape, 0.02)}
    opt = umtam_jax.umtam(1.0, rank=rank, svd_method=method)
    state = opt.init(params)
    update = jax.jit(opt.update)
    updates, momenta = [], []
    for g in grads:
        u, state = update({"w": jnp.asarray(g, jnp.float32)}, state, params)
        updates.append(np.asarray(u["w"], np.float64))
        momenta.append(np.asarray(umtam_jax.momentum(state)["w"], np.float64))
    return updates, momenta


def test_subspace_method_tracks_exact_svd_along_a_training_trajectory():
    grads = list(_trajectory())
    fast_updates, fast_momenta = _updates_and_momenta("subspace", grads)
    exact_updates, exact_momenta = _updates_and_momenta("exact", grads)
    for t in range(10, len(grads)):  # after a short warm-up of the warm start
        captured_fast = np.linalg.norm(fast_momenta[t]) ** 2
        captured_exact = np.linalg.norm(exact_momenta[t]) ** 2
        assert abs(captured_fast / captured_exact - 1) < 0.01, t
        error = np.linalg.norm(fast_updates[t] - exact_updates[t])
        assert error / np.linalg.norm(exact_updates[t]) <= 1e-2, t


def test_subspace_method_on_a_flat_tail_spectrum_keeps_captured_energy():
    # No spectral gap at rank 16: single directions are ambiguous, captured energy is not.
    grads = list(_trajectory(signal_rank=64, steps=40))
    fast_updates, fast_momenta = _updates_and_momenta("subspace", grads)
    exact_updates, exact_momenta = _updates_and_momenta("exact", grads)
    ratios = [
        np.linalg.norm(f) ** 2 / np.linalg.norm(e) ** 2
        for f, e in zip(fast_momenta, exact_momenta, strict=True)
    ]
    assert min(ratios[10:]) > 0.99
    errors = [
        np.linalg.norm(f - e) / np.linalg.norm(e)
        for f, e in zip(fast_updates, exact_updates, strict=True)
    ]
    assert np.median(errors[10:]) <= 1e-2


def test_subspace_svd_with_a_good_warm_start_matches_exact_truncation():
    rng = np.random.default_rng(0)
    left, _ = np.linalg.qr(rng.normal(size=(120, 40)))
    right, _ = np.linalg.qr(rng.normal(size=(90, 40)))
    matrix = jnp.asarray((left * 0.7 ** np.arange(40)) @ right.T, jnp.float32)
    warm = jnp.asarray(right[:, :8] + 0.05 * rng.normal(size=(90, 8)), jnp.float32)
    fast = subspace_svd(matrix, warm, 8, power_iterations=1)
    exact = exact_svd(matrix, 8)
    fast, exact = (jax.tree.map(lambda x: np.asarray(x, np.float64), d) for d in (fast, exact))
    np.testing.assert_allclose(fast.s, exact.s, rtol=1e-3)
    reconstruct = lambda d: (d.u * d.s) @ d.v.T  # noqa: E731
    err = np.linalg.norm(reconstruct(fast) - reconstruct(exact)) / np.linalg.norm(
        reconstruct(exact)
    )
    assert err < 1e-3
    # Orthonormal factors, as the fixed-basis projection of svd_every > 1 assumes.
    np.testing.assert_allclose(fast.u.T @ fast.u, np.eye(8), atol=1e-5)
    np.testing.assert_allclose(fast.v.T @ fast.v, np.eye(8), atol=1e-5)


def test_oversampling_draws_never_reuse_the_keys_of_the_initial_bases():
    """``split(k)[1]`` equals ``fold_in(k, 1)``: step 1's oversampling columns, drawn with
    ``fold_in(leaf key, t)``, were V0 itself (a rank-deficient sketch). The update's stream
    is now a key of its own."""
    from umtam_jax.optimizer._transform import _update_stream

    base = jax.random.key(0)
    data = jax.random.key_data
    for index in range(3):
        leaf_key = jax.random.fold_in(base, index)
        init_keys = [np.asarray(data(k)) for k in jax.random.split(leaf_key)]
        for t in range(1, 4):
            drawn = np.asarray(data(jax.random.fold_in(_update_stream(base, index), t)))
            assert not any(np.array_equal(drawn, k) for k in init_keys), (index, t)
    # The collision the stream avoids, so this test keeps meaning what it says.
    leaf_key = jax.random.fold_in(base, 0)
    assert np.array_equal(
        data(jax.random.split(leaf_key)[1]), data(jax.random.fold_in(leaf_key, 1))
    )
