"""Rank-r decompositions of the momentum matrix (docs/algorithm.md §2.2 step 3 and §2.5).

The fast method, :func:`subspace_svd`, is a warm-started randomized range finder whose
m×r / n×r work is XLA matmuls and whose orthonormalisations and small SVDs are batched
k×k LAPACK calls (:mod:`._orthonormalize`); :func:`exact_svd` is the reference.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from umtam_jax._precision import full_precision
from umtam_jax.optimizer import _nd, _sharding
from umtam_jax.optimizer._orthonormalize import (
    flat_stack,
    group_by_width,
    orthonormalize_many,
    unstack,
)

SVD_METHODS = ("exact", "subspace")


class Decomposition(NamedTuple):
    """``M ≈ u diag(s) vᵀ`` with orthonormal columns in ``u`` (m×r) and ``v`` (n×r).

    Every function of this module also takes stacks of matrices (leading batch axes, as
    for the optimizer's groups of equally shaped parameters); the fields then carry the
    same leading axes.
    """

    u: jax.Array
    s: jax.Array
    v: jax.Array


def _tn(q: jax.Array, a: jax.Array) -> jax.Array:
    """``qᵀ a`` for a thin ``q`` (m×k) and a large ``a`` (m×n).

    ``qᵀ`` is materialised first (k×m, tiny), so XLA:CPU runs a plain row-major product
    instead of contracting both operands over their leading axis: ~20% less CPU time for
    the GPT-2 shapes of ``benchmarks/step_time.py``.
    """
    return _sharding.matmul(jax.lax.optimization_barrier(q.mT), a)


def _dense_matmul(a: jax.Array, w: jax.Array, row_axes: int | None) -> jax.Array:
    """``a @ w`` for a 2-D ``a`` (``row_axes`` None) or an N-D one (:func:`._nd.matmul`)."""
    if row_axes is None:
        return _sharding.matmul(a, w)
    return _nd.matmul(a, w, row_axes)


def _dense_rmatmul(q: jax.Array, a: jax.Array, row_axes: int | None) -> jax.Array:
    """``qᵀ a`` for a 2-D ``a`` (``row_axes`` None) or an N-D one (:func:`._nd.rmatmul`)."""
    if row_axes is None:
        return _tn(q, a)
    return _nd.rmatmul(q, a, row_axes)


def _per_matrix(scale: jax.Array | float) -> jax.Array:
    """A scalar, or one scalar per matrix of a stack, broadcastable against the stack."""
    return jnp.asarray(scale)[..., None, None]


class LowRankPlusDense(NamedTuple):
    """The matrix ``scale · scale_out · dense + left @ rightᵀ`` without materialising it.

    UMTAM's ``M̃ = b1 U Σ Vᵀ + (1 − b1) G`` (no error feedback) has this form: products with
    it cost one m×n×k matmul with ``dense`` plus thin ones, instead of an extra m×n×r
    matmul and two m×n passes to build ``M̃`` first. ``scale`` multiplies the thin operand
    of a product with ``dense`` and ``scale_out`` its thin result, so a factor too small for
    the dtype (a clip factor of a gradient with ‖G‖ ≳ 1e38) is applied in two halves.

    ``dense`` may keep an N-D layout ``rows + cols`` (see :mod:`._nd`): the products then
    take its number of row axes, ``row_axes``; ``left`` and ``right`` are always 2-D.
    """

    dense: jax.Array
    scale: jax.Array | float
    left: jax.Array
    right: jax.Array
    scale_out: jax.Array | float = 1.0

    @property
    def shape(self) -> tuple[int, ...]:
        return self.dense.shape

    @property
    def dtype(self):
        return self.dense.dtype

    def matmul(self, w: jax.Array, row_axes: int | None = None) -> jax.Array:
        """``M @ w``."""
        # The scales go on the thin operand and the thin result: ``dense`` may be an
        # unclipped gradient whose products would overflow, while ``scale · scale_out ·
        # dense`` is the clipped one.
        scaled = _per_matrix(self.scale) * w
        dense = _dense_matmul(self.dense, scaled, row_axes) * _per_matrix(self.scale_out)
        return dense + self.left @ _sharding.matmul(self.right.mT, w)

    def rmatmul(self, q: jax.Array, row_axes: int | None = None) -> jax.Array:
        """``qᵀ @ M``."""
        scaled = _per_matrix(self.scale) * q
        dense = _dense_rmatmul(scaled, self.dense, row_axes) * _per_matrix(self.scale_out)
        return dense + _sharding.matmul(q.mT, self.left) @ self.right.mT


def matmul_any(
    matrix: jax.Array | LowRankPlusDense, w: jax.Array, row_axes: int | None = None
) -> jax.Array:
    """``matrix @ w`` for an array or a :class:`LowRankPlusDense`; ``row_axes`` for a
    matrix kept in an N-D layout ``rows + cols`` (see :mod:`._nd`), None for a 2-D one."""
    if isinstance(matrix, LowRankPlusDense):
        return matrix.matmul(w, row_axes)
    return _dense_matmul(matrix, w, row_axes)


def rmatmul_any(
    matrix: jax.Array | LowRankPlusDense, q: jax.Array, row_axes: int | None = None
) -> jax.Array:
    """``qᵀ @ matrix`` for an array or a :class:`LowRankPlusDense` (``row_axes`` as in
    :func:`matmul_any`)."""
    if isinstance(matrix, LowRankPlusDense):
        return matrix.rmatmul(q, row_axes)
    return _dense_rmatmul(q, matrix, row_axes)


@full_precision
def exact_svd(matrix: jax.Array, rank: int) -> Decomposition:
    """Truncated SVD from a full (thin) SVD of ``matrix``: the reference method."""
    # Under Explicit sharding this gathers the whole m×n matrix: the reference method only.
    u, s, vt = jnp.linalg.svd(_sharding.replicate(matrix), full_matrices=False)
    return Decomposition(u[..., :rank], s[..., :rank], vt[..., :rank, :].mT)


def _small_svd_many(bs: list[jax.Array], rank: list[int]):
    """SVD of wide k×n matrices ``b`` (k ≤ n): ``b = L Qᵀ`` with ``Q = orth(bᵀ)``, then the
    k×k SVD of ``L`` (batched across matrices of the same k). Returns ``(ub, s, v)`` per
    matrix with ``b ≈ ub diag(s) vᵀ`` truncated to its ``rank``."""
    out: list[tuple | None] = [None] * len(bs)
    wide = []
    for i, b in enumerate(bs):
        if b.shape[-2] <= b.shape[-1]:
            wide.append(i)
        else:
            ub, s, vt = jnp.linalg.svd(_sharding.replicate(b), full_matrices=False)
            r = rank[i]
            out[i] = ub[..., :r], s[..., :r], vt[..., :r, :].mT
    qs = orthonormalize_many([bs[i].mT for i in wide])
    for index in group_by_width(qs).values():
        members = [wide[j] for j in index]
        cores = [_sharding.matmul(bs[i], qs[j]) for i, j in zip(members, index, strict=True)]
        ul, s, vlt = jnp.linalg.svd(flat_stack(cores), full_matrices=False)
        parts = zip(
            members,
            index,
            unstack(ul, cores),
            unstack(s, cores),
            unstack(vlt, cores),
            strict=True,
        )
        for i, j, ul_i, s_i, vlt_i in parts:
            r = rank[i]
            out[i] = ul_i[..., :r], s_i[..., :r], qs[j] @ vlt_i[..., :r, :].mT
    return out


@full_precision
def subspace_svd_many(
    matrices: list[jax.Array | LowRankPlusDense],
    warm_starts: list[jax.Array],
    rank: list[int],
    *,
    oversampling: int = 0,
    power_iterations: int = 0,
    keys: list[jax.Array] | None = None,
    cold_start: tuple[jax.Array, int] | None = None,
    row_axes: list[int | None] | None = None,
) -> list[Decomposition]:
    """:func:`subspace_svd` of several matrices in lockstep.

    Each step (sketch, orthonormalisation, projection, small SVD) runs for every matrix
    before the next begins, so that the small k×k linear algebra of all matrices of the
    same sketch width is one batched call (see :func:`orthonormalize_many`) and the cold
    start's extra power iterations sit in one ``lax.cond``. Results are those of
    :func:`subspace_svd` applied to each matrix. ``row_axes`` gives, per matrix kept in an
    N-D layout ``rows + cols``, the length of ``rows`` (None for a 2-D matrix; see
    :mod:`._nd`): every product with it contracts its axes in place, and only the thin
    matrices are reshaped.
    """
    splits = row_axes or [None] * len(matrices)
    omegas = []
    for i, (matrix, warm) in enumerate(zip(matrices, warm_starts, strict=True)):
        omega = warm.astype(matrix.dtype)
        # At most min(m, n) columns in all: a wider sketch would lose columns to the QR
        # (its basis has min(m, n)), and the sketch's width would change between steps.
        stack, k = warm.ndim - 2, splits[i]  # stacked matrices; N-D layout's row axes
        m = matrix.shape[-2] if k is None else math.prod(matrix.shape[stack : stack + k])
        extra = max(0, min(oversampling, min(m, warm.shape[-2]) - warm.shape[-1]))
        if oversampling and keys is None:
            raise ValueError("oversampling > 0 needs PRNG keys for the fresh sketch columns")
        if extra and keys is not None:  # keys are given whenever oversampling is
            shape, dtype = (warm.shape[-2], extra), matrix.dtype  # n rows, as V
            normal = functools.partial(jax.random.normal, shape=shape, dtype=dtype)
            for _ in range(keys[i].ndim):  # a stack of matrices draws with a stack of keys
                normal = jax.vmap(normal)
            # The fresh columns are laid out as the warm start's (an Explicit mesh
            # refuses to join differently sharded arrays).
            fresh = _sharding.reshard_like(normal(keys[i]), _sharding.explicit_spec(warm))
            omega = jnp.concatenate([omega, fresh], axis=-1)
        omegas.append(omega)

    def products(fn, thin):
        """``fn(matrix, thin matrix, row axes)`` for every matrix."""
        return [fn(a, x, k) for a, x, k in zip(matrices, thin, splits, strict=True)]

    def rmatmul_t(a, q, k):
        """``(qᵀ M)ᵀ``: the sketch of the row space in a power iteration."""
        return rmatmul_any(a, q, k).mT

    qs = orthonormalize_many(products(matmul_any, omegas))

    def power_iteration(qs):
        zs = orthonormalize_many(products(rmatmul_t, qs))
        return orthonormalize_many(products(matmul_any, zs))

    for _ in range(power_iterations):
        qs = power_iteration(qs)
    if cold_start is not None:

        def cold(qs):
            for _ in range(cold_start[1]):
                qs = power_iteration(qs)
            return qs

        qs = jax.lax.cond(cold_start[0], cold, lambda qs: qs, qs)
    small = _small_svd_many(products(rmatmul_any, qs), rank)
    return [Decomposition(q @ ub, s, v) for q, (ub, s, v) in zip(qs, small, strict=True)]


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
    :func:`subspace_svd_many` runs it for several matrices at once (what the optimizer
    uses: one batched call per step for the small linear algebra of all leaves).

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
    return subspace_svd_many(
        [matrix],
        [warm_start],
        [rank],
        oversampling=oversampling,
        power_iterations=power_iterations,
        keys=None if key is None else [key],
        cold_start=cold_start,
    )[0]
