"""The optimizer's fast decompositions compute the same thing as the plain ones (the
update's other fast paths: ``test_fast_paths_*.py`` beside this module).

- ``orthonormalize`` returns an orthonormal basis of the same column space as a
  Householder QR, also for ill-conditioned, rank-deficient, zero, tiny, huge and wide
  inputs, on both of its paths: CPU's (two Gram/eigh passes, the three through a
  conditional where those are not accurate) and GPU/TPU's (three passes, no conditional).
- ``LowRankPlusDense`` products equal those of the materialised matrix, and
  ``subspace_svd`` gives the same decomposition from either form.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from umtam_jax.optimizer._lowrank import LowRankPlusDense, exact_svd, subspace_svd
from umtam_jax.optimizer._orthonormalize import orthonormalize, orthonormalize_many


def _with_spectrum(rng, m, k, spectrum):
    left, _ = np.linalg.qr(rng.normal(size=(m, k)))
    right, _ = np.linalg.qr(rng.normal(size=(k, k)))
    return (left * spectrum) @ right.T


def _gram(q):
    """``qᵀq`` in float64 NumPy (a jnp product would run as TF32 on a GPU)."""
    q = np.asarray(q, np.float64)
    return q.T @ q


def _same_span(q, y):
    """‖(I − q qᵀ) y‖ / ‖y‖: y lies in span(q)."""
    q, y = np.asarray(q, np.float64), np.asarray(y, np.float64)
    return np.linalg.norm(y - q @ (q.T @ y)) / max(np.linalg.norm(y), 1e-300)


@pytest.mark.usefixtures("code_path")
@pytest.mark.parametrize("condition", [1.0, 1e2, 1e3, 1e5, 1e8, 1e12])
def test_orthonormalize_is_orthonormal_and_spans_the_input(condition):
    rng = np.random.default_rng(0)
    y = _with_spectrum(rng, 600, 24, np.geomspace(1.0, 1.0 / condition, 24))
    q = orthonormalize(jnp.asarray(y, jnp.float32))
    assert q.shape == (600, 24)
    np.testing.assert_allclose(_gram(q), np.eye(24), atol=2e-5)
    assert _same_span(q, y) < 1e-5


@pytest.mark.usefixtures("code_path")
def test_orthonormalize_rank_deficient_zero_and_wide_inputs():
    rng = np.random.default_rng(1)
    rank3 = rng.normal(size=(200, 3)) @ rng.normal(size=(3, 16))
    rank1 = np.outer(rng.normal(size=400), rng.normal(size=20))
    square = rng.normal(size=(32, 5)) @ rng.normal(size=(5, 32))  # Householder QR (< 2k rows)
    two_rows_per_column = rng.normal(size=(64, 3)) @ rng.normal(size=(3, 32))
    repeated = np.repeat(rng.normal(size=(300, 6)), 2, axis=1)
    graded_and_null = np.concatenate(
        [_with_spectrum(rng, 700, 10, np.geomspace(1.0, 1e-6, 10)), np.zeros((700, 6))], axis=1
    )
    cases = (rank3, rank1, square, two_rows_per_column, repeated, graded_and_null)
    for y in (*cases, np.zeros((200, 16))):
        q = orthonormalize(jnp.asarray(y, jnp.float32))
        k = y.shape[1]
        np.testing.assert_allclose(_gram(q), np.eye(k), atol=2e-5)
        assert _same_span(q, y) < 1e-5
    wide = orthonormalize(jnp.asarray(rng.normal(size=(5, 9)), jnp.float32))
    np.testing.assert_allclose(_gram(wide), np.eye(5), atol=1e-5)
    bad = orthonormalize(jnp.full((50, 4), jnp.nan, jnp.float32))
    assert bad.shape == (50, 4)


@pytest.mark.usefixtures("code_path")
@pytest.mark.parametrize("scale", [1e-30, 1e30])
def test_orthonormalize_tiny_and_huge_inputs(scale):
    """Gram matrices of these would underflow or overflow float32: the input is first
    scaled to a unit peak."""
    y = np.random.default_rng(6).normal(size=(300, 12)) * scale
    q = orthonormalize(jnp.asarray(y, jnp.float32))
    np.testing.assert_allclose(_gram(q), np.eye(12), atol=2e-5)
    assert _same_span(q, y) < 1e-5


@pytest.mark.usefixtures("code_path")
def test_orthonormalize_under_jit_matches_householder_span():
    rng = np.random.default_rng(2)
    y = jnp.asarray(rng.normal(size=(300, 12)), jnp.float32)
    q = jax.jit(lambda y: orthonormalize(y))(y)
    householder, _ = jnp.linalg.qr(y)
    q, householder = np.asarray(q, np.float64), np.asarray(householder, np.float64)
    # Same column space: the projectors agree.
    np.testing.assert_allclose(q @ q.T, householder @ householder.T, atol=1e-5)


@pytest.mark.usefixtures("code_path")
def test_a_rank_deficient_member_of_a_group_leaves_the_others_unchanged():
    """One matrix of a width group is rank-deficient: it gets a completed basis, and the
    well-conditioned stack beside it keeps the bases it gets alone."""
    rng = np.random.default_rng(4)
    good = rng.normal(size=(2, 120, 8))
    deficient = rng.normal(size=(120, 2)) @ rng.normal(size=(2, 8))
    ys = [jnp.asarray(good, jnp.float32), jnp.asarray(deficient, jnp.float32)]
    together = jax.jit(lambda ys: orthonormalize_many(ys))(ys)
    alone = jax.jit(lambda ys: orthonormalize_many(ys))(ys[:1])[0]
    np.testing.assert_allclose(np.asarray(together[0]), np.asarray(alone), atol=1e-6)
    for q, y in zip(
        [*np.asarray(together[0]), np.asarray(together[1])], [*good, deficient], strict=True
    ):
        np.testing.assert_allclose(_gram(q), np.eye(8), atol=2e-5)
        assert _same_span(q, y) < 1e-5


@pytest.mark.usefixtures("code_path")
def test_equally_shaped_matrices_get_the_bases_they_get_alone():
    """Off CPU the matrices of one shape are stacked for their products: each, a stack
    among them, gets back its own basis, in order."""
    rng = np.random.default_rng(6)
    shapes = [(96, 8), (64, 8), (96, 8), (3, 96, 8), (64, 8), (40, 8)]
    ys = [jnp.asarray(rng.normal(size=shape), jnp.float32) for shape in shapes]
    together = jax.jit(orthonormalize_many)(ys)
    for y, q in zip(ys, together, strict=True):
        assert q.shape == y.shape
        alone = jax.jit(orthonormalize_many)([y])[0]
        np.testing.assert_allclose(np.asarray(q), np.asarray(alone), atol=1e-6)
        matrices = (np.reshape(x, (-1, *x.shape[-2:])) for x in (q, y))
        for qi, yi in zip(*matrices, strict=True):
            np.testing.assert_allclose(_gram(qi), np.eye(8), atol=2e-5)
            assert _same_span(qi, yi) < 1e-5


def test_low_rank_plus_dense_products_and_decomposition_match_the_dense_matrix():
    with jax.enable_x64(True):
        rng = np.random.default_rng(3)
        dense = jnp.asarray(rng.normal(size=(60, 40)))
        left, right = jnp.asarray(rng.normal(size=(60, 6))), jnp.asarray(rng.normal(size=(40, 6)))
        op = LowRankPlusDense(dense, 0.3, left, right)
        full = 0.3 * dense + left @ right.T
        w, q = jnp.asarray(rng.normal(size=(40, 5))), jnp.asarray(rng.normal(size=(60, 5)))
        np.testing.assert_allclose(op.matmul(w), full @ w, rtol=1e-12)
        np.testing.assert_allclose(op.rmatmul(q), q.T @ full, rtol=1e-12)
        assert op.shape == (60, 40) and op.dtype == jnp.float64
        warm = jnp.asarray(rng.normal(size=(40, 6)))
        for kwargs in ({}, {"power_iterations": 2}, {"oversampling": 3, "key": jax.random.key(0)}):
            a = subspace_svd(op, warm, 6, **kwargs)
            b = subspace_svd(full, warm, 6, **kwargs)
            np.testing.assert_allclose(a.s, b.s, rtol=1e-9)
            np.testing.assert_allclose((a.u * a.s) @ a.v.T, (b.u * b.s) @ b.v.T, atol=1e-9)


def test_subspace_svd_factors_are_orthonormal_on_a_decaying_spectrum():
    rng = np.random.default_rng(4)
    matrix = jnp.asarray(_with_spectrum(rng, 300, 200, 0.93 ** np.arange(200)), jnp.float32)
    warm = jnp.asarray(rng.normal(size=(200, 16)), jnp.float32)
    dec = subspace_svd(matrix, warm, 16, power_iterations=4)
    np.testing.assert_allclose(_gram(dec.u), np.eye(16), atol=2e-5)
    np.testing.assert_allclose(_gram(dec.v), np.eye(16), atol=2e-5)
    # Random start, slow decay: the leading values have converged, the tail not yet.
    exact = exact_svd(matrix, 16)
    np.testing.assert_allclose(dec.s[:10], exact.s[:10], rtol=1e-4)
