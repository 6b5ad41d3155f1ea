"""Rank-r decompositions of the momentum matrix (SPEC §2.2 step 3 and §2.5)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

SVD_METHODS = ("exact", "subspace")


class Decomposition(NamedTuple):
    """``M ≈ u diag(s) vᵀ`` with orthonormal columns in ``u`` (m×r) and ``v`` (n×r)."""

    u: jax.Array
    s: jax.Array
    v: jax.Array


def _orthonormalize(y: jax.Array) -> jax.Array:
    q, _ = jnp.linalg.qr(y)
    return q


def exact_svd(matrix: jax.Array, rank: int) -> Decomposition:
    """Truncated SVD from a full (thin) SVD of ``matrix``: the reference method."""
    u, s, vt = jnp.linalg.svd(matrix, full_matrices=False)
    return Decomposition(u[:, :rank], s[:rank], vt[:rank].T)


def subspace_svd(
    matrix: jax.Array,
    warm_start: jax.Array,
    rank: int,
    *,
    oversampling: int = 0,
    power_iterations: int = 0,
    key: jax.Array | None = None,
) -> Decomposition:
    """Warm-started randomized range finder (Halko et al., 2011, Alg. 4.4 + 5.1).

    The sketch ``matrix @ Ω`` uses ``Ω = [warm_start, g]``: the previous right basis ``V``
    (n×r) and ``oversampling`` fresh Gaussian columns ``g``. Because the momentum moves
    slowly, reusing ``V`` makes every step one more subspace iteration, so a single pass
    (two m×n×r matmuls and an (r+p)×n SVD) tracks the top-r subspace closely.

    Args:
      matrix: the (m, n) matrix to decompose.
      warm_start: (n, r) previous right factor.
      rank: number of components returned (≤ r + oversampling).
      oversampling: extra random sketch columns.
      power_iterations: extra ``(M Mᵀ)`` passes for a sharper subspace (2 matmuls each).
      key: PRNG key for the oversampling columns (required when ``oversampling > 0``).

    Returns:
      The rank-``rank`` :class:`Decomposition`.

    References:
      Halko, Martinsson, Tropp, "Finding structure with randomness", SIAM Review 2011.
    """
    omega = warm_start.astype(matrix.dtype)
    if oversampling:
        extra = jax.random.normal(key, (matrix.shape[1], oversampling), matrix.dtype)
        omega = jnp.concatenate([omega, extra], axis=1)
    q = _orthonormalize(matrix @ omega)
    for _ in range(power_iterations):
        q = _orthonormalize(matrix @ _orthonormalize(matrix.T @ q))
    b = q.T @ matrix
    ub, s, vbt = jnp.linalg.svd(b, full_matrices=False)
    return Decomposition(q @ ub[:, :rank], s[:rank], vbt[:rank].T)
