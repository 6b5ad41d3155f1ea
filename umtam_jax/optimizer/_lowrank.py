"""Rank-r decompositions of the momentum matrix (SPEC §2.2 step 3 and §2.5).

Performance note (CPU). jaxlib runs LAPACK through SciPy's OpenBLAS, whose own threads
compete with XLA's thread pool: on a loaded 2-core machine a thin Householder QR of a
3072×32 matrix, or an SVD of a 32×3072 one, was measured at 40 ms to 1.3 s, against
~0.2 ms for the matmuls that replace it here. The fast path of :func:`subspace_svd`
therefore touches LAPACK only for r×r matrices (symmetric eigendecompositions and one SVD,
which OpenBLAS runs single-threaded) and does the m×r / n×r work with XLA matmuls; a
Householder QR remains as a fallback for (near) rank-deficient sketches, taken through
``lax.cond`` only when the fast orthonormalisation reports it is not accurate.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from umtam_jax.optimizer import _sharding

SVD_METHODS = ("exact", "subspace")


class Decomposition(NamedTuple):
    """``M ≈ u diag(s) vᵀ`` with orthonormal columns in ``u`` (m×r) and ``v`` (n×r)."""

    u: jax.Array
    s: jax.Array
    v: jax.Array


def _tn(q: jax.Array, a: jax.Array) -> jax.Array:
    """``qᵀ a`` for a thin ``q`` (m×k) and a large ``a`` (m×n).

    ``qᵀ`` is materialised first (k×m, tiny), so XLA:CPU runs a plain row-major product
    instead of contracting both operands over their leading axis: ~20% less CPU time for
    the GPT-2 shapes of ``benchmarks/step_time.py``.
    """
    return _sharding.matmul(jax.lax.optimization_barrier(q.T), a)


class LowRankPlusDense(NamedTuple):
    """The matrix ``scale · dense + left @ rightᵀ`` without materialising it.

    UMTAM's ``M̃ = b1 U Σ Vᵀ + (1 − b1) G`` (no error buffer) has this form: products with
    it cost one m×n×k matmul with ``dense`` plus thin ones, instead of an extra m×n×r
    matmul and two m×n passes to build ``M̃`` first.
    """

    dense: jax.Array
    scale: jax.Array | float
    left: jax.Array
    right: jax.Array

    @property
    def shape(self) -> tuple[int, int]:
        return self.dense.shape

    @property
    def dtype(self):
        return self.dense.dtype

    def matmul(self, w: jax.Array) -> jax.Array:
        """``M @ w``."""
        # The scale goes on the thin operand: ``dense`` may be an unclipped gradient whose
        # products would overflow, while ``scale · dense`` is the clipped one.
        mm = _sharding.matmul
        return mm(self.dense, self.scale * w) + self.left @ mm(self.right.T, w)

    def rmatmul(self, q: jax.Array) -> jax.Array:
        """``qᵀ @ M``."""
        mm = _sharding.matmul
        return _tn(self.scale * q, self.dense) + mm(q.T, self.left) @ self.right.T


def _matmul(matrix, w):
    if isinstance(matrix, LowRankPlusDense):
        return matrix.matmul(w)
    return _sharding.matmul(matrix, w)


def _rmatmul(matrix, q):
    if isinstance(matrix, LowRankPlusDense):
        return matrix.rmatmul(q)
    return _tn(q, matrix)


def _householder(y: jax.Array) -> jax.Array:
    # LAPACK needs the thin y whole: gather it (m×k, never m×n) and shard q back like y.
    q, _ = jnp.linalg.qr(_sharding.replicate(y))
    return _sharding.reshard_like(q, _sharding.explicit_spec(y))


def _gram_pass(y: jax.Array, floor_factor: float) -> tuple[jax.Array, jax.Array]:
    """``y G^{-1/2}`` with ``G = yᵀy`` (eigenvalues floored at ``floor_factor · max``)."""
    lam, w = jnp.linalg.eigh(_sharding.matmul(y.T, y))
    top = lam[-1]
    floor = jnp.maximum(top * floor_factor, jnp.finfo(y.dtype).tiny)
    return y @ (w * jax.lax.rsqrt(jnp.maximum(lam, floor))), lam


def orthonormalize(y: jax.Array) -> jax.Array:
    """An orthonormal basis of the column space of a tall ``y`` (k ≤ m columns).

    Two passes of Gram-matrix (Löwdin) orthogonalisation, ``Q = Y W Λ^{-1/2}`` from the
    k×k eigendecomposition ``YᵀY = W Λ Wᵀ`` (the eigenvalue analogue of CholeskyQR2): four
    thin matmuls and two k×k ``eigh``. The second pass restores orthogonality to rounding
    level whenever the first one left a well-conditioned basis, which it reports through
    the eigenvalues of its Gram matrix; otherwise (cond(y) beyond ~10³–10⁴ in float32,
    rank deficiency, non-finite input) the Householder QR of ``y`` is used instead. Either
    way the result spans the same space, so decompositions built on it agree with the
    Householder-based ones up to rounding.
    """
    if y.shape[1] > y.shape[0]:
        return _householder(y)
    eps = float(jnp.finfo(y.dtype).eps)
    q1, lam1 = _gram_pass(y, eps)
    q2, lam2 = _gram_pass(q1, eps)
    ok = jnp.all(jnp.isfinite(q2)) & (lam1[-1] > 0) & (lam2[0] > 0.05) & (lam2[-1] < 20.0)
    return jax.lax.cond(ok, lambda: q2, lambda: _householder(y))


def exact_svd(matrix: jax.Array, rank: int) -> Decomposition:
    """Truncated SVD from a full (thin) SVD of ``matrix``: the reference method."""
    # Under Explicit sharding this gathers the whole m×n matrix: the reference method only.
    u, s, vt = jnp.linalg.svd(_sharding.replicate(matrix), full_matrices=False)
    return Decomposition(u[:, :rank], s[:rank], vt[:rank].T)


def _small_svd(b: jax.Array, rank: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """SVD of a wide k×n ``b`` (k ≤ n): ``b = L Qᵀ`` with ``Q = orth(bᵀ)``, then the k×k
    SVD of ``L``. Returns ``(ub, s, v)`` with ``b ≈ ub diag(s) vᵀ`` truncated to ``rank``."""
    if b.shape[0] > b.shape[1]:
        ub, s, vt = jnp.linalg.svd(_sharding.replicate(b), full_matrices=False)
        return ub[:, :rank], s[:rank], vt[:rank].T
    q = orthonormalize(b.T)
    ul, s, vlt = jnp.linalg.svd(_sharding.matmul(b, q), full_matrices=False)
    return ul[:, :rank], s[:rank], q @ vlt[:rank].T


def subspace_svd(
    matrix: jax.Array | LowRankPlusDense,
    warm_start: jax.Array,
    rank: int,
    *,
    oversampling: int = 0,
    power_iterations: int = 0,
    key: jax.Array | None = None,
    cold_start: tuple[jax.Array, int] | None = None,
) -> Decomposition:
    """Warm-started randomized range finder (Halko et al., 2011, Alg. 4.4 + 5.1).

    The sketch ``matrix @ Ω`` uses ``Ω = [warm_start, g]``: the previous right basis ``V``
    (n×r) and ``oversampling`` fresh Gaussian columns ``g``. Because the momentum moves
    slowly, reusing ``V`` makes every step one more subspace iteration, so a single pass
    (two m×n×r matmuls and a small SVD) tracks the top-r subspace closely.

    Args:
      matrix: the (m, n) matrix to decompose, an array or a :class:`LowRankPlusDense`.
      warm_start: (n, r) previous right factor.
      rank: number of components returned (≤ r + oversampling).
      oversampling: extra random sketch columns.
      power_iterations: extra ``(M Mᵀ)`` passes for a sharper subspace (2 matmuls each).
      cold_start: ``(flag, n)``: ``n`` more power iterations where the traced boolean
        ``flag`` holds (a random warm start), in a ``lax.cond`` around those iterations
        only: a conditional around the whole decomposition was measured 10–15 ms slower per
        step on the 28M-parameter benchmark (XLA:CPU runs a conditional's body as one
        nested, serialised unit).
      key: PRNG key for the oversampling columns (required when ``oversampling > 0``).

    Returns:
      The rank-``rank`` :class:`Decomposition` (orthonormal ``u`` and ``v``).

    References:
      Halko, Martinsson, Tropp, "Finding structure with randomness", SIAM Review 2011.
    """
    omega = warm_start.astype(matrix.dtype)
    if oversampling:
        extra = jax.random.normal(key, (matrix.shape[1], oversampling), matrix.dtype)
        omega = jnp.concatenate([omega, extra], axis=1)
    q = orthonormalize(_matmul(matrix, omega))

    def power_iteration(_, q):
        return orthonormalize(_matmul(matrix, orthonormalize(_rmatmul(matrix, q).T)))

    for i in range(power_iterations):
        q = power_iteration(i, q)
    if cold_start is not None:

        def cold(q):
            for i in range(cold_start[1]):
                q = power_iteration(i, q)
            return q

        q = jax.lax.cond(cold_start[0], cold, lambda q: q, q)
    ub, s, v = _small_svd(_rmatmul(matrix, q), rank)
    return Decomposition(q @ ub, s, v)
