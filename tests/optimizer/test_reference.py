"""UMTAM updates and statistics equal an independent float64 NumPy reference.

The reference (``reference.py``) implements docs/algorithm.md §2–§3.

The caller passes the same gradients and the same ``params`` to both at every step (no
trajectory coupling), and every update is compared, for ≥ 20 steps.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import umtam_jax
from tests.optimizer.platforms import take_default_branches
from tests.optimizer.reference import DenseReference, FactoredReference, Hyper

STEPS = 24
SHAPES = {
    "kernel": (12, 10),  # factored
    "conv": (3, 4, 10),  # ndim 3, default view (12, 10), factored
    "bias": (10,),  # dense
    "small": (2, 9),  # matrix below min_dim_size_to_factor: dense
}


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


def _optimizer(hp: Hyper, **extra):
    return umtam_jax.umtam(
        1.0,
        rank=hp.rank,
        b1=hp.b1,
        b2=hp.b2,
        eps=hp.eps,
        error_decay=hp.error_decay,
        clip_threshold=hp.clip_threshold,
        saliency_decay=hp.saliency_decay,
        svd_method="exact",
        svd_every=hp.svd_every,
        min_dim_size_to_factor=4,
        bias_correction=hp.bias_correction,
        adaptive_rank=hp.adaptive_rank,
        max_rank=hp.max_rank,
        min_rank=hp.min_rank,
        rank_step=hp.rank_step,
        rank_update_every=hp.rank_update_every,
        rank_grow_threshold=hp.rank_grow_threshold,
        rank_shrink_threshold=hp.rank_shrink_threshold,
        **extra,
    )


def _references(params, state, hp):
    refs = {}
    for name, w0 in params.items():
        leaf = state[0].leaves[name]
        if isinstance(leaf, umtam_jax.FactoredLeafState):
            u0 = np.asarray(leaf.u).reshape(-1, leaf.u.shape[-1])
            v0 = np.asarray(leaf.v).reshape(-1, leaf.v.shape[-1])
            refs[name] = FactoredReference(u0, v0, np.asarray(w0), hp)
        else:
            refs[name] = DenseReference(np.asarray(w0), hp)
    return refs


def _relative_error(actual, expected):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-300)


def run_against_reference(hp: Hyper, *, grad_scale=1.0, seed=0, tol=1e-8):
    rng = np.random.default_rng(seed)
    params = {k: jnp.asarray(rng.normal(size=s)) for k, s in SHAPES.items()}
    opt = _optimizer(hp)
    state = opt.init(params)
    assert isinstance(state[0].leaves["kernel"], umtam_jax.FactoredLeafState)
    assert isinstance(state[0].leaves["conv"], umtam_jax.FactoredLeafState)
    assert isinstance(state[0].leaves["small"], umtam_jax.DenseLeafState)
    refs = _references(params, state, hp)
    step = jax.jit(opt.update)
    for _ in range(STEPS):
        grads = {k: jnp.asarray(grad_scale * rng.normal(size=s)) for k, s in SHAPES.items()}
        current = {k: jnp.asarray(rng.normal(size=s)) for k, s in SHAPES.items()}
        updates, state = step(grads, state, current)
        for name, ref in refs.items():
            expected = -ref.step(np.asarray(grads[name]), np.asarray(current[name]))
            assert updates[name].dtype == jnp.float64
            assert _relative_error(updates[name], expected) < tol, name
    checks = {
        "saliency": umtam_jax.saliency(state),
        "curvature": umtam_jax.curvature(state),
        "momentum": umtam_jax.momentum(state),
    }
    for quantity, tree in checks.items():
        for name, ref in refs.items():
            err = _relative_error(tree[name], getattr(ref, quantity))
            assert err < tol, (quantity, name, err)
    return state, refs


def test_default_hyper_parameters_match_reference():
    run_against_reference(Hyper())


def test_without_error_feedback_matches_reference_and_allocates_no_error():
    state, _ = run_against_reference(Hyper(error_decay=0.0))
    assert state[0].leaves["kernel"].dense_momentum is None


@pytest.mark.parametrize("svd_every", [1, 4])
def test_error_decay_unlike_b1_matches_reference(svd_every):
    # b1 ≠ γ: the next momentum γ M̃ + (b1 − γ) U Σ Vᵀ + (1 − b1) G needs the low-rank term.
    run_against_reference(Hyper(b1=0.8, error_decay=0.5, svd_every=svd_every))


def test_state_keeps_the_momentum_whose_compression_error_is_e():
    state, refs = run_against_reference(Hyper())
    leaf = state[0].leaves["conv"]
    r = leaf.sigma.shape[0]
    low = (np.asarray(leaf.u).reshape(-1, r) @ np.asarray(leaf.sigma)) @ np.asarray(leaf.v).reshape(
        -1, r
    ).T
    error = np.asarray(leaf.dense_momentum).reshape(low.shape) - low
    assert _relative_error(error, refs["conv"].error) < 1e-8


def test_clipping_active_matches_reference():
    # gradient norms ≈ 10 ≫ τ = 0.5: every step clips.
    run_against_reference(Hyper(clip_threshold=0.5), grad_scale=1.0)


def test_clipping_inactive_matches_reference():
    run_against_reference(Hyper(clip_threshold=None), grad_scale=3.0)
    run_against_reference(Hyper(clip_threshold=1e6), grad_scale=3.0)


@pytest.mark.parametrize("clip_threshold", [1.0, 0.5, None])
def test_gpu_tpu_code_paths_match_reference(clip_threshold, monkeypatch):
    """Off CPU every norm and sum of squares is taken in one overflow-safe pass (no
    conditional): forced on this CPU, updates and statistics still equal the reference."""
    take_default_branches(monkeypatch)
    run_against_reference(Hyper(clip_threshold=clip_threshold), grad_scale=3.0)


def test_svd_every_projects_the_core_between_refreshes():
    run_against_reference(Hyper(svd_every=4))


def test_bias_correction_matches_reference():
    run_against_reference(Hyper(bias_correction=True))


def test_adaptive_rank_matches_reference_and_changes_the_rank():
    # Random gradients have a flat spectrum (stable rank ≈ 5 ≫ rank 2): the rank must grow.
    hp = Hyper(rank=2, adaptive_rank=True, max_rank=6, rank_update_every=3)
    state, refs = run_against_reference(hp)
    rank = int(state[0].leaves["kernel"].rank)
    assert rank == refs["kernel"].active
    assert rank > 2


def test_adaptive_rank_between_refreshes_uses_the_top_singular_value_of_the_momentum():
    """Eq. 16 on a fixed-basis step (svd_every > 1): the stable rank of M̃ itself, not of
    its projection on the old bases (whose norm is ≤ σ₁(M̃): a larger ratio, other ranks)."""
    hp = Hyper(
        rank=2, adaptive_rank=True, max_rank=4, rank_step=1, rank_update_every=2,
        rank_grow_threshold=1.2, rank_shrink_threshold=0.8, svd_every=3,
    )  # fmt: skip
    state, refs = run_against_reference(hp)
    ranks = {int(state[0].leaves["kernel"].rank), refs["kernel"].active}
    assert len(ranks) == 1


def test_adaptive_rank_initial_core_is_zero_beyond_the_active_rank():
    hp = Hyper(rank=2, adaptive_rank=True, max_rank=5)
    params = {"kernel": jnp.ones((12, 10))}
    stats = umtam_jax.statistics(_optimizer(hp).init(params))["kernel"]
    np.testing.assert_array_equal(np.diag(np.asarray(stats.sigma)), [hp.eps] * 2 + [0.0] * 3)
    u, v = np.asarray(stats.u, np.float64), np.asarray(stats.v, np.float64)
    want = (u[:, :2] * hp.eps) @ v[:, :2].T
    np.testing.assert_allclose(umtam_jax.momentum({"kernel": stats})["kernel"], want, rtol=1e-5)


def test_adaptive_rank_shrinks_on_a_rank_one_signal():
    hp = Hyper(rank=4, adaptive_rank=True, max_rank=6, rank_update_every=2, clip_threshold=None)
    opt = _optimizer(hp)
    params = {"kernel": jnp.ones((12, 10))}
    state = opt.init(params)
    a, b = np.arange(1.0, 13.0), np.arange(1.0, 11.0)
    ranks = []
    for _ in range(8):
        _, state = opt.update({"kernel": jnp.asarray(np.outer(a, b))}, state, params)
        ranks.append(int(state[0].leaves["kernel"].rank))
    # Eq. 16 shrinks while the stable rank (here 1: a rank-one momentum) is below r / 2:
    # 4 → 3 → 2 at the decision steps 2 and 4, then never below 2 (1 < 2 / 2 is false).
    assert ranks == [4, 3, 3, 2, 2, 2, 2, 2]


def test_zero_initialised_weight_uses_ratio_one():
    hp = Hyper()
    opt = _optimizer(hp)
    params = {"kernel": jnp.zeros((12, 10)), "bias": jnp.zeros(10)}
    state = opt.init(params)
    refs = _references(params, state, hp)
    rng = np.random.default_rng(1)
    for _ in range(3):
        grads = {k: jnp.asarray(rng.normal(size=v.shape)) for k, v in params.items()}
        updates, state = opt.update(grads, state, params)
        for name, ref in refs.items():
            expected = -ref.step(np.asarray(grads[name]), np.asarray(params[name]))
            assert np.all(np.isfinite(updates[name]))
            assert _relative_error(updates[name], expected) < 1e-8


def test_override_of_the_two_dimensional_view():
    # View a (3, 4, 10) leaf as (3, 40) instead of the default (12, 10).
    hp = Hyper()
    opt = _optimizer(hp, row_axes=lambda path, shape: 1)
    params = {"conv": jnp.asarray(np.random.default_rng(2).normal(size=(3, 4, 10)))}
    with pytest.raises(AssertionError):
        # min side 3 < min_dim_size_to_factor=4: the override makes it dense.
        assert isinstance(opt.init(params)[0].leaves["conv"], umtam_jax.FactoredLeafState)
    opt = umtam_jax.umtam(
        1.0, rank=3, svd_method="exact", min_dim_size_to_factor=3, row_axes=lambda p, s: 1
    )
    state = opt.init(params)
    leaf = state[0].leaves["conv"]
    assert leaf.u.shape == (3, 3) and leaf.v.shape == (4, 10, 3)
    ref = FactoredReference(
        np.asarray(leaf.u),
        np.asarray(leaf.v).reshape(40, 3),
        np.asarray(params["conv"]),
        dataclasses.replace(hp, rank=3),
    )
    rng = np.random.default_rng(3)
    for _ in range(5):
        g = jnp.asarray(rng.normal(size=(3, 4, 10)))
        updates, state = opt.update({"conv": g}, state, params)
        expected = -ref.step(np.asarray(g), np.asarray(params["conv"]))
        assert _relative_error(updates["conv"], expected) < 1e-8


def test_rank_is_clipped_to_the_matrix_size():
    opt = umtam_jax.umtam(1.0, rank=64, min_dim_size_to_factor=4)
    leaf = opt.init({"w": jnp.ones((12, 5))})[0].leaves["w"]
    assert leaf.u.shape == (12, 5) and leaf.sigma.shape == (5, 5)
